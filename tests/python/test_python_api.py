"""`import lwi`, the Python API (python/lwi), against this checkout's liblwi.so: volumes and their geometry against
nibabel and SimpleITK on real files, segmenting every kind of input with labels equal to `lwi segment`'s, training
with progress and cancel, Ctrl-C, threads, errors. tests/python/test_wheel.py checks the same package installed
from the wheel."""
import _thread
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from lwi_ctypes import ROOT, cli_path, plugin_path

os.environ.setdefault("LWI_PLUGIN", str(plugin_path()))
sys.path.insert(0, str(ROOT / "python"))
import lwi  # noqa: E402

TS = "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"
TINY_ARCH = {"img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 24, "mlp_dim": 48, "num_heads": 4}


@pytest.fixture(scope="module")
def ct(testdata):
    return testdata / TS / "example_ct.nii.gz"


@pytest.fixture(scope="module")
def model(coarse_model):
    with lwi.Model(coarse_model, device="cpu") as m:
        yield m


def real_files(testdata):
    return [testdata / TS / "example_ct.nii.gz", testdata / TS / "example_mr_sm.nii.gz",
            testdata / TS / "example_ct_sm.nii.gz"]


def test_read_gives_nibabels_voxels_and_affine(testdata):
    for f in real_files(testdata):
        v, img = lwi.read(f), nib.load(f)
        assert v.array.flags.f_contiguous and v.array.shape == img.shape
        np.testing.assert_allclose(v.affine, img.affine, atol=1e-5, err_msg=str(f))
        np.testing.assert_allclose(v.spacing, img.header.get_zooms()[:3], rtol=1e-6)
        assert np.array_equal(v.array, np.asanyarray(img.dataobj)), f
        w = lwi.Volume.from_nibabel(img)
        assert w.dtype == v.dtype and np.array_equal(w.array, v.array) and np.allclose(w.affine, v.affine, atol=1e-5)
        back = v.to_nibabel()
        assert np.allclose(back.affine, img.affine, atol=1e-5) and back.get_data_dtype() == v.dtype


def test_simpleitk_geometry_equals_simpleitks_own_reading(testdata):
    for f in real_files(testdata):
        v, ref = lwi.read(f), sitk.ReadImage(str(f))
        img = v.to_sitk()
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4, err_msg=str(f))
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
        assert np.array_equal(sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(ref))
        w = lwi.Volume.from_sitk(ref)
        assert np.allclose(w.affine, v.affine, atol=1e-4) and np.array_equal(w.array, v.array)
        assert np.shares_memory(w.array, sitk.GetArrayViewFromImage(ref)), "from_sitk copies no voxel"


def test_dicom_series_reads_as_simpleitk_reads_it(testdata):
    folder = testdata / TS / "example_ct_dicom"
    listing = lwi.dicom_series(folder)
    assert listing["series"] and listing["series"][0]["slices"] == 20
    v = lwi.read(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    img = v.to_sitk()
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)


def test_a_written_array_reads_back_with_its_geometry(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(-1000, 1000, size=(7, 6, 5)).astype(np.int16)
    lps = np.array([[-0.9, 0.1, 0, 10], [0.1, 0.9, 0, -20], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    for name in ("a.nii.gz", "a.nrrd"):
        lwi.Volume.from_array(data, lps, space="LPS").write(tmp_path / name)
        back = lwi.read(tmp_path / name)
        assert back.dtype == np.int16 and np.array_equal(back.array, data)
        np.testing.assert_allclose(back.affine_lps, lps, atol=1e-5)
    # SimpleITK's (k, j, i) order through axes="kji", without a copy
    kji = np.ascontiguousarray(data.T)
    v = lwi.Volume.from_array(kji, lps, space="LPS", axes="kji")
    assert np.shares_memory(v.array, kji) and np.array_equal(v.array, data)


def test_segmenting_any_input_gives_the_labels_of_lwi_segment(model, ct, tmp_path):
    out = tmp_path / "cli.nii.gz"
    r = subprocess.run([str(cli_path()), "segment", "--model", str(model.path), str(ct), "--out", str(out),
                        "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expected = np.asanyarray(nib.load(out).dataobj)
    assert len(np.unique(expected)) > 1, "the tiny model labels more than background"
    img = nib.load(ct)
    array = np.asanyarray(img.dataobj)
    inputs = {
        "path": (ct, {}),
        "volume": (lwi.read(ct), {}),
        "nibabel": (img, {}),
        "simpleitk": (sitk.ReadImage(str(ct)), {}),
        "array RAS": (array, {"affine": img.affine, "space": "RAS"}),
        "array LPS, C order": (np.ascontiguousarray(array), {"affine": np.diag([-1, -1, 1, 1]) @ img.affine,
                                                             "space": "LPS"}),
        "big-endian float": (array.astype(">f4"), {"affine": img.affine, "space": "RAS"}),
    }
    for what, (x, kw) in inputs.items():
        labels = model.segment(x, progress=False, **kw)
        assert labels.dtype == np.uint8 and labels.shape == expected.shape, what
        assert np.array_equal(labels.array, expected), what
        np.testing.assert_allclose(labels.affine, img.affine, atol=1e-5, err_msg=what)
    written = model.segment_files([ct], tmp_path / "batch", progress=False)
    assert [f.status for f in written] == ["written"]
    assert np.array_equal(np.asanyarray(nib.load(written[0].output).dataobj), expected)
    assert (tmp_path / "batch" / "example_ct.nii.gz.json").exists(), "the manifest beside the output"
    again = model.segment_files([ct, tmp_path / "missing.nii.gz"], tmp_path / "batch", on_error="skip", progress=False)
    assert [f.status for f in again] == ["skipped", "failed"]
    assert isinstance(again[1].error, lwi.Error) and "missing.nii.gz" in str(again[1].error)


def test_options_reach_the_engine_and_unknown_ones_are_its_error(model, ct):
    v = lwi.read(ct)
    plain = model.segment(v, progress=False)
    assert np.array_equal(model.segment(v, overlap=0.25, progress=False).array.shape, plain.array.shape)
    with pytest.raises(lwi.InvalidArgumentError, match="overlapp") as e:
        model.segment(v, overlapp=0.5, progress=False)
    assert isinstance(e.value, ValueError) and e.value.status == lwi.Status.INVALID_ARGUMENT


def test_bad_input_raises_naming_the_argument(model, tmp_path):
    good = np.zeros((8, 8, 8), np.float32)
    eye = np.eye(4)
    cases = [
        (lambda: lwi.Volume.from_array(np.zeros((8, 8)), eye, space="RAS"), ValueError, "3 dimensions"),
        (lambda: lwi.Volume.from_array(np.zeros((8, 8, 8), np.complex64), eye, space="RAS"), TypeError, "complex64"),
        (lambda: lwi.Volume.from_array([[[1.0]]], eye, space="RAS"), TypeError, "numpy.ndarray"),
        (lambda: lwi.Volume.from_array(good, np.eye(3), space="RAS"), ValueError, "4x4"),
        (lambda: lwi.Volume.from_array(good, np.diag([1, 1, 0, 1]), space="RAS"), ValueError, "singular"),
        (lambda: lwi.Volume.from_array(good, np.diag([1, np.nan, 1, 1]), space="RAS"), ValueError, "not finite"),
        (lambda: lwi.Volume.from_array(good, np.ones((4, 4)), space="RAS"), ValueError, "last row"),
        (lambda: lwi.Volume.from_array(good, eye, space="LPI"), ValueError, "world frame"),
        (lambda: model.segment(good), ValueError, "affine="),
        (lambda: model.segment(42), TypeError, "int"),
        (lambda: lwi.read(tmp_path / "nope.nii.gz"), FileNotFoundError, "nope.nii.gz"),
        (lambda: lwi.Model(tmp_path / "nope.safetensors"), FileNotFoundError, "nope.safetensors"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=words):
            call()
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"\0" * 400)
    with pytest.raises(lwi.FormatError, match="garbage.nii"):
        lwi.read(garbage)
    # bool and non-contiguous arrays are taken (a copy), and give what their plain twins give
    mask = np.zeros((8, 8, 8), bool)
    mask[2:5] = True
    assert lwi.Volume.from_array(mask, eye, space="RAS").dtype == np.uint8
    strided = np.zeros((16, 8, 8), np.float32)[::2]
    assert lwi.Volume.from_array(strided, eye, space="RAS").array.flags.f_contiguous


def test_progress_cancel_and_the_callbacks_own_error(model, ct):
    v = lwi.read(ct)
    seen = []
    model.segment(v, progress=seen.append)
    assert seen and all(isinstance(p, lwi.Progress) for p in seen)
    assert "infer" in {p.stage for p in seen} and seen[-1].rank is None

    def fails(p):
        raise ValueError("stop here, from the callback")

    with pytest.raises(ValueError, match="from the callback"):
        model.segment(v, progress=fails)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(lwi.CancelledError):
        model.segment(v, cancel=cancel, progress=False)


def test_ctrl_c_cancels_and_raises_keyboard_interrupt(model, ct):
    v = lwi.read(ct)

    def interrupt_once(p):
        if p.stage == "infer" and not interrupted:
            interrupted.append(1)
            threading.Timer(0.05, _thread.interrupt_main).start()
            time.sleep(0.2)  # the interrupt arrives while the engine runs, between two reports

    interrupted = []
    with pytest.raises(KeyboardInterrupt):
        model.segment(v, progress=interrupt_once)
    assert interrupted
    assert model.segment(v, progress=False).shape == v.shape, "the model works after an interrupted call"


def test_two_threads_segment_with_one_model_and_the_gil_is_released(model, ct):
    v = lwi.read(ct)
    alone = model.segment(v, progress=False).array
    results, ticks, gaps = {}, [0], []
    done = threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1

    last = [0]

    def watch(p):
        gaps.append(ticks[0] - last[0])
        last[0] = ticks[0]

    counter = threading.Thread(target=count)
    counter.start()
    workers = [threading.Thread(target=lambda k=k: results.__setitem__(k, model.segment(v, progress=watch if k == 0
                                                                                          else False).array))
               for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    counter.join()
    assert np.array_equal(results[0], alone) and np.array_equal(results[1], alone)
    assert max(gaps) > 1000, f"another Python thread ran while the engine worked (ticks between reports: {gaps[:8]})"


def test_a_closed_model_refuses_calls_and_errors_pickle(coarse_model, ct):
    m = lwi.Model(coarse_model, device="cpu")
    assert m.labels and m.info["arch"] == "unetr" and m.device == "cpu"
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.segment(ct)
    m.close()  # twice is harmless
    for cls in (lwi.InvalidArgumentError, lwi.FileAccessError, lwi.OutOfMemoryError, lwi.CancelledError):
        e = pickle.loads(pickle.dumps(cls("the message")))
        assert type(e) is cls and e.message == "the message" and str(e) == "the message"
    assert issubclass(lwi.FileAccessError, OSError) and issubclass(lwi.OutOfMemoryError, MemoryError)


def test_training_reports_progress_and_a_cancel_leaves_no_model(tmp_path):
    dataset = lwi.phantom_dataset(tmp_path / "data", cases=3, size=[24, 24, 16], spacing=[8, 8, 8])
    config = {"dataset": str(dataset), "arch": TINY_ARCH, "spacing": [8, 8, 8], "num_samples": 1,
              "val_every": 1, "device": "cpu"}
    events = []
    out = lwi.fine_tune(config, out=tmp_path / "m.safetensors", epochs=2, progress=events.append)
    assert out.exists() and {p.epoch for p in events if p.epoch is not None} == {0, 1}
    assert any(p.stage == "train" and p.loss is not None for p in events)
    m = lwi.Model(out, device="cpu")
    assert m.info["stage"] == "segmentation"

    def stop_in_epoch_two(p):
        if p.epoch == 1:
            raise KeyboardInterrupt

    target = tmp_path / "cancelled.safetensors"
    with pytest.raises(KeyboardInterrupt):
        lwi.fine_tune(config, out=target, epochs=5, checkpoint_every=1, progress=stop_in_epoch_two)
    assert not target.exists(), "no model file from a cancelled run"
    assert (tmp_path / "cancelled.safetensors.ckpt").exists(), "its last complete checkpoint stays"
    with pytest.raises(lwi.InvalidArgumentError, match="epochz"):
        lwi.fine_tune(config, out=tmp_path / "x.safetensors", epochz=1)
    report = lwi.evaluate(dataset.parent / "labelsTr", dataset.parent / "labelsTr")
    assert report["synapse_8_mean"]["dice"] == pytest.approx(1.0)


@pytest.mark.parametrize("order", ["import torch; import lwi", "import lwi; import torch"])
def test_torch_and_lwi_share_one_libtorch_in_either_import_order(order, tmp_path):
    code = (f"{order}\nimport json\nt = torch.ones(3) * 2\ninfo = lwi.build_info()\n"
            "maps = [l for l in open('/proc/self/maps') if 'libtorch_cpu.so' in l]\n"
            "print(json.dumps({'sum': float(t.sum()), 'libtorch': info['libtorch_version'],"
            " 'copies': len({l.split()[-1] for l in maps})}))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"sum": 6.0, "libtorch": torch_version(), "copies": 1}


def torch_version():
    return json.loads(subprocess.run([str(cli_path()), "info"], capture_output=True, text=True).stdout)[
        "libtorch_version"]

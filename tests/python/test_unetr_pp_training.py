"""UNETR++ trained the way the method trains it, both stages, through the lwi command on phantoms (a tiny UNETR++):
nnU-Net v1's dataset fingerprint (checked against nnunet 1.7.1's own cropping and statistics), learned initialization
with UNETR++'s order heads, fine-tuning with deep supervision from every stage-1 tensor, a resumed run equal to an
uninterrupted one, segmentation back on the input's grid, and clear refusals of bad configurations."""
import json
import signal
import subprocess

import nibabel as nib
import numpy as np
import pytest
from safetensors.numpy import load_file

from lwi_ctypes import cli_path

ARCH = {"arch": "unetr_pp", "img_size": [32, 32, 32], "feature_size": 2, "hidden_size": 32, "num_heads": 2,
        "dims": [4, 8, 16, 32], "depths": [1, 1, 1, 1], "proj_size": [16, 16, 16, 8]}
INIT = {"epochs": 3, "iterations_per_epoch": 4, "pretext": {"slabs": 2}}
FINE = {"epochs": 6, "iterations_per_epoch": 4, "val_every": 3}


def lwi(*args):
    return subprocess.run([str(cli_path()), *map(str, args)], capture_output=True, text=True)


def phantoms(folder, seed):
    """Four phantoms at spacings drawn per case (so the median spacing means something), 3 training, 1 validation."""
    r = lwi("phantom", "--out", folder, "--cases", 4, "--seed", seed, "--size", "48,48,32")
    assert r.returncode == 0, r.stderr
    return folder / "dataset.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("unetr_pp_train")
    dataset = phantoms(d / "data", 2)
    (d / "arch.json").write_text(json.dumps(ARCH))
    return d, dataset


def train(stage, d, dataset, out, config, *extra):
    path = out.with_suffix(".config.json")
    path.write_text(json.dumps(config))
    return lwi(stage, "--dataset", dataset, "--arch-config", d / "arch.json", "--config", path, "--seed", 3,
               "--device", "cpu", "--out", out, "--json", *extra)


def epoch_losses(stdout):
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [e["loss"] for e in events if e.get("stage") == "epoch"]


def info(model):
    r = lwi("info", model)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def nnunet_fingerprint(dataset):
    """nnunet 1.7.1: crop_to_nonzero, every 10th foreground voxel (DatasetAnalyzer._get_voxels_in_foreground),
    _compute_stats over all cases, the median spacing (np.percentile 50) in nnU-Net's (z, y, x) order."""
    import SimpleITK as sitk
    from nnunet.experiment_planning.DatasetAnalyzer import DatasetAnalyzer
    from nnunet.preprocessing.cropping import crop_to_nonzero
    doc = json.loads(dataset.read_text())
    voxels, spacings = [], []
    for case in doc["training"]:
        image = sitk.ReadImage(str(dataset.parent / case["image"]))
        data = sitk.GetArrayFromImage(image)[None].astype(np.float32)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.parent / case["label"])))[None].astype(np.float32)
        data, seg, _ = crop_to_nonzero(data, seg)
        voxels += list(data[0][seg[0] > 0][::10])
        spacings.append(np.array(image.GetSpacing())[::-1])
    _, mean, sd, _, _, upper, lower = DatasetAnalyzer._compute_stats(voxels)
    return np.percentile(np.vstack(spacings), 50, 0), (lower, upper, mean, sd)


def test_both_stages_train_with_nnunets_fingerprint(data, tmp_path, report):
    d, dataset = data
    init, model = tmp_path / "init.safetensors", tmp_path / "seg.safetensors"
    r = train("init-train", d, dataset, init, INIT)
    assert r.returncode == 0, r.stderr
    assert len(epoch_losses(r.stdout)) == 3
    r = train("fine-tune", d, dataset, model, FINE, "--init", init)
    assert r.returncode == 0, r.stderr
    losses = epoch_losses(r.stdout)
    report(f"\nUNETR++ fine-tune (tiny, 3 phantoms, nnU-Net recipe): epoch losses {[round(x, 3) for x in losses]}")
    assert losses[-1] < losses[0], losses

    spacing_zyx, (lower, upper, mean, sd) = nnunet_fingerprint(dataset)
    for m in (init, model):
        pre = info(m)["preprocessing"]
        assert pre["pipeline"] == "nn_unet"
        np.testing.assert_allclose(pre["spacing"], spacing_zyx[::-1], rtol=1e-12)
        ct = pre["ct_normalization"]
        np.testing.assert_allclose([ct["lower"], ct["upper"], ct["mean"], ct["sd"]], [lower, upper, mean, sd],
                                   rtol=1e-5)
    report(f"fingerprint: spacing {spacing_zyx[::-1].round(4).tolist()} mm, CT lower {lower:.2f} upper {upper:.2f} "
           f"mean {mean:.3f} sd {sd:.3f} (equal to nnU-Net's DatasetAnalyzer)")
    meta = info(model)
    assert meta["stage"] == "segmentation" and meta["config"]["out_channels"] == 12
    assert len(meta["provenance"]["history"]["init"]) == 3, "stage 1's history is carried"


def test_fine_tuning_starts_from_every_stage1_tensor(data, tmp_path):
    d, dataset = data
    init, model = tmp_path / "init.safetensors", tmp_path / "seg.safetensors"
    assert train("init-train", d, dataset, init, dict(INIT, epochs=1)).returncode == 0
    # a learning rate too small to move a float32 weight: what stage 2 starts from is what it writes
    r = train("fine-tune", d, dataset, model, {"epochs": 1, "iterations_per_epoch": 1, "lr": 1e-300}, "--init", init)
    assert r.returncode == 0, r.stderr
    before, after = load_file(init), load_file(model)
    heads = ("out1.", "out2.", "out3.")
    assert not any(k.startswith("temp_head") for k in after), "the order heads are not carried"
    assert {k for k in before if not k.startswith("temp_head")} == set(after)
    for k, v in before.items():
        if k.startswith("temp_head") or k.startswith(heads):
            continue
        if k.endswith(("running_mean", "running_var")):
            continue  # a training forward pass moves batch-norm statistics whatever the learning rate
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    for k in after:
        if k.startswith(heads) and k.endswith("weight"):
            assert after[k].shape[0] == 12 and before[k].shape[0] == 1, k


def test_a_killed_run_resumes_to_the_uninterrupted_runs_bytes(data, tmp_path):
    d, dataset = data
    config = {"epochs": 6, "iterations_per_epoch": 2, "val_every": 100}
    straight, again, resumed = (tmp_path / f"{n}.safetensors" for n in ("straight", "again", "resumed"))
    for out in (straight, again):
        assert train("fine-tune", d, dataset, out, config, "--from-scratch").returncode == 0
    assert straight.read_bytes() == again.read_bytes(), "one seed, two runs, the same bytes"
    path = tmp_path / "resumed.config.json"
    path.write_text(json.dumps(config))
    cmd = [str(c) for c in (cli_path(), "fine-tune", "--dataset", dataset, "--arch-config", d / "arch.json", "--config",
                            path, "--seed", 3, "--device", "cpu", "--out", resumed, "--json", "--from-scratch")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # an epoch event follows its checkpoint: kill right after epoch 2, without warning
        if line.startswith("{") and json.loads(line).get("stage") == "epoch" and json.loads(line)["done"] == 2:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not resumed.exists() and (tmp_path / "resumed.safetensors.ckpt").exists()
    r = train("fine-tune", d, dataset, resumed, config, "--from-scratch", "--resume")
    assert r.returncode == 0, r.stderr
    assert resumed.read_bytes() == straight.read_bytes(), "resumed run ends with the uninterrupted run's bytes"


def test_a_trained_model_segments_onto_the_input_grid(data, tmp_path):
    d, dataset = data
    model = tmp_path / "seg.safetensors"
    assert train("fine-tune", d, dataset, model, dict(FINE, epochs=2), "--from-scratch").returncode == 0
    case = dataset.parent / json.loads(dataset.read_text())["validation"][0]["image"]
    out = tmp_path / "labels.nii.gz"
    r = lwi("segment", "--model", model, "--out", out, "--device", "cpu", "--no-mirror", case)
    assert r.returncode == 0, r.stderr
    source, labels = nib.load(case), nib.load(out)
    assert labels.shape == source.shape
    np.testing.assert_allclose(labels.affine, source.affine, atol=1e-6)
    known = {int(k) for k in json.loads(dataset.read_text())["labels"]}
    assert set(np.unique(np.asarray(labels.dataobj)).tolist()) <= known


def test_a_patch_larger_than_the_cases_is_padded(data, tmp_path):
    d, dataset = data
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(dict(ARCH, img_size=[32, 64, 64])))
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"epochs": 1, "iterations_per_epoch": 2}))
    r = lwi("fine-tune", "--dataset", dataset, "--arch-config", wide, "--config", config, "--from-scratch",
            "--device", "cpu", "--out", tmp_path / "m.safetensors")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("config, words", [
    ({"batch_size": "two"}, ["batch_size"]),
    ({"oversample_foreground": 1.5}, ["oversample_foreground", "1.5"]),
    ({"nnunet_augment": {"gamma_p": -0.1}}, ["gamma_p", "-0.1"]),
    # any recipe trains any architecture whose shapes fit: MONAI's depth is UNETR++'s coarsest axis
    ({"recipe": "unetr"}, ["monai recipe", "axis 2", "slabs 2"]),
    ({"pretext": {"slabs": 3}}, ["slabs 3"]),
])
def test_bad_configurations_are_refused_naming_the_field(data, tmp_path, config, words):
    d, dataset = data
    out = tmp_path / "m.safetensors"
    r = train("init-train", d, dataset, out, dict(INIT, **config))
    assert r.returncode != 0
    for w in words:
        assert w in r.stderr, r.stderr
    assert not out.exists()


def test_validation_labels_must_be_the_datasets(data, tmp_path):
    d, dataset = data
    out = tmp_path / "m.safetensors"
    r = train("fine-tune", d, dataset, out, dict(FINE, val_labels=[1, 99]), "--from-scratch")
    assert r.returncode != 0 and "val_labels: 99" in r.stderr, r.stderr
    assert not out.exists()


def test_fine_tuning_on_other_cases_than_stage1_saw_is_refused(data, tmp_path):
    d, dataset = data
    other = phantoms(tmp_path / "other", 9)
    init, out = tmp_path / "init.safetensors", tmp_path / "seg.safetensors"
    assert train("init-train", d, dataset, init, dict(INIT, epochs=1)).returncode == 0
    r = train("fine-tune", d, other, out, FINE, "--init", init)
    assert r.returncode != 0
    assert "fingerprint" in r.stderr and str(init) in r.stderr, r.stderr
    assert not out.exists()


def test_the_preprocessed_cache_is_reused_rebuilt_when_broken_and_keyed_by_content(data, tmp_path):
    d, dataset = data
    config = {"epochs": 1, "iterations_per_epoch": 2, "val_every": 100, "cache_dir": str(tmp_path / "cache")}
    runs = [tmp_path / f"{n}.safetensors" for n in ("first", "second", "memory", "repaired")]
    assert train("fine-tune", d, dataset, runs[0], config, "--from-scratch").returncode == 0
    entries = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 3, "one entry per training case"
    stamps = [e.stat().st_mtime_ns for e in entries]
    assert train("fine-tune", d, dataset, runs[1], config, "--from-scratch").returncode == 0
    assert [e.stat().st_mtime_ns for e in entries] == stamps, "the second run reads the entries, it does not rewrite"
    assert train("fine-tune", d, dataset, runs[2], dict(config, cache=False), "--from-scratch").returncode == 0
    entries[0].write_bytes(entries[0].read_bytes()[:1000])  # a damaged entry
    r = train("fine-tune", d, dataset, runs[3], config, "--from-scratch")
    assert r.returncode == 0, r.stderr
    assert "unreadable" in r.stdout + r.stderr
    first = runs[0].read_bytes()
    for other in runs[1:]:
        assert other.read_bytes() == first, f"{other.name}: the cache changes nothing the run computes"

    # a changed file is prepared afresh under a new key
    doc = json.loads(dataset.read_text())
    image = dataset.parent / doc["training"][0]["image"]
    nii = nib.load(image)
    arr = np.asarray(nii.dataobj).copy()
    arr[arr.shape[0] // 2, arr.shape[1] // 2, arr.shape[2] // 2] += 7
    changed = tmp_path / "changed"
    (changed / "imagesTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(arr, nii.affine, nii.header), changed / "imagesTr" / image.name)
    for case in doc["training"][1:] + doc["validation"]:
        (changed / "imagesTr" / (dataset.parent / case["image"]).name).symlink_to(dataset.parent / case["image"])
    doc = json.loads(json.dumps(doc).replace("./labelsTr", str(dataset.parent / "labelsTr")))
    (changed / "dataset.json").write_text(json.dumps(doc))
    assert train("fine-tune", d, changed / "dataset.json", tmp_path / "c.safetensors", config,
                 "--from-scratch").returncode == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4, "only the changed case is prepared again"

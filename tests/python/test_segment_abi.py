"""lwi_segment and lwi_segment_file as a C host calls them: borrowed volumes in RAS or LPS, progress,
cancellation, and refusals of malformed arguments."""
import ctypes
import json

import nibabel as nib
import numpy as np

from lwi_ctypes import STATUS

PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p)


class LwiVolume(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("dtype", ctypes.c_int32), ("dims", ctypes.c_int64 * 3),
                ("data", ctypes.c_void_p), ("affine", ctypes.c_double * 16), ("space", ctypes.c_int32)]


class LwiProgress(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("stage", ctypes.c_char_p), ("done", ctypes.c_uint64),
                ("total", ctypes.c_uint64), ("epoch", ctypes.c_int64), ("loss", ctypes.c_double),
                ("metric", ctypes.c_double), ("message", ctypes.c_char_p)]


def open_model(lwi, path):
    L = lwi.lib
    L.lwi_engine_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    L.lwi_model_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    L.lwi_segment.argtypes = [ctypes.c_void_p, ctypes.POINTER(LwiVolume), ctypes.c_void_p, ctypes.c_int32, ctypes.c_size_t,
                              ctypes.c_char_p, PROGRESS_FN, ctypes.c_void_p]
    L.lwi_segment_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, PROGRESS_FN,
                                   ctypes.c_void_p]
    engine, model = ctypes.c_void_p(), ctypes.c_void_p()
    assert L.lwi_engine_create(b'{"device": "cpu"}', ctypes.byref(engine)) == 0
    assert L.lwi_model_load(engine, str(path).encode(), ctypes.byref(model)) == 0, L.lwi_last_error()
    return model


def phantom_like(shape=(30, 28, 20)):
    rng = np.random.default_rng(4)
    data = rng.normal(0, 30, shape).astype(np.float32)
    data[8:20, 6:18, 5:14] += 300
    ras = np.array([[4.0, 0, 0, -60], [0, 4.0, 0, -50], [0, 0, 4.0, -40], [0, 0, 0, 1]])
    return data, ras


def segment_borrowed(lwi, model, data, affine, space, progress=None, struct_size=None, out_bytes=None):
    vol = LwiVolume(struct_size or ctypes.sizeof(LwiVolume), 8, (ctypes.c_int64 * 3)(*data.shape),
                    data.ctypes.data, (ctypes.c_double * 16)(*affine.ravel()), space)
    out = np.zeros(data.shape, np.uint8, order="F")
    cb = PROGRESS_FN(progress) if progress else PROGRESS_FN()
    status = lwi.lib.lwi_segment(model, ctypes.byref(vol), out.ctypes.data, 0, out_bytes or out.nbytes, None, cb, None)
    return STATUS[status], out


def test_borrowed_volume_in_ras_and_lps_gives_the_same_labels_as_the_file(lwi, tiny_model, tmp_path):
    model = open_model(lwi, tiny_model)
    data, ras = phantom_like()
    data_f = np.asfortranarray(data)
    stages = []

    def progress(user, p):
        stages.append(ctypes.cast(p, ctypes.POINTER(LwiProgress)).contents.stage.decode())
        return 0

    status, from_ras = segment_borrowed(lwi, model, data_f, ras, 0, progress)
    assert status == "OK", lwi.lib.lwi_last_error()
    assert {"preprocess", "infer", "resample"} <= set(stages)
    lps = np.diag([-1.0, -1.0, 1, 1]) @ ras
    status, from_lps = segment_borrowed(lwi, model, data_f, lps, 1)
    assert status == "OK"
    np.testing.assert_array_equal(from_lps, from_ras)
    path, out = tmp_path / "in.nii.gz", tmp_path / "out.nii.gz"
    nib.save(nib.Nifti1Image(data, ras), str(path))
    assert lwi.lib.lwi_segment_file(model, str(path).encode(), str(out).encode(), b'{"manifest": false}', PROGRESS_FN(), None) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), from_ras)
    assert len(np.unique(from_ras)) > 1, "the seeded model predicts more than one class here"


def test_the_manifest_times_each_stage(lwi, tiny_model, tmp_path):
    model = open_model(lwi, tiny_model)
    data, ras = phantom_like()
    path, out = tmp_path / "in.nii.gz", tmp_path / "out.nii.gz"
    nib.save(nib.Nifti1Image(data, ras), str(path))
    assert lwi.lib.lwi_segment_file(model, str(path).encode(), str(out).encode(), None, PROGRESS_FN(), None) == 0
    timings = json.loads((tmp_path / "out.nii.gz.json").read_text())["timings_s"]
    stages = timings["segment_stages"]
    assert set(stages) == {"preprocess", "infer", "resample", "postprocess"}
    assert all(v >= 0 for v in stages.values()) and stages["infer"] > 0
    assert abs(sum(stages.values()) - timings["segment"]) < 1e-6


def test_cancelling_leaves_no_output(lwi, tiny_model, tmp_path):
    model = open_model(lwi, tiny_model)
    data, ras = phantom_like()
    path, out = tmp_path / "in.nii.gz", tmp_path / "out.nii.gz"
    nib.save(nib.Nifti1Image(data, ras), str(path))
    cancel = PROGRESS_FN(lambda user, p: 1 if ctypes.cast(p, ctypes.POINTER(LwiProgress)).contents.stage == b"infer" else 0)
    status = lwi.lib.lwi_segment_file(model, str(path).encode(), str(out).encode(), None, cancel, None)
    assert STATUS[status] == "CANCELLED" and b"cancelled" in lwi.lib.lwi_last_error()
    assert not out.exists() and not list(tmp_path.glob("*.json"))


def test_malformed_arguments_are_refused(lwi, tiny_model):
    model = open_model(lwi, tiny_model)
    data, ras = phantom_like()
    data_f = np.asfortranarray(data)
    status, _ = segment_borrowed(lwi, model, data_f, ras, 0, struct_size=12)
    assert status == "INVALID_ARGUMENT" and b"struct_size" in lwi.lib.lwi_last_error()
    status, _ = segment_borrowed(lwi, model, data_f, ras, 0, out_bytes=7)
    assert status == "INVALID_ARGUMENT" and b"out_bytes" in lwi.lib.lwi_last_error()
    status, _ = segment_borrowed(lwi, model, data_f, ras, 5)
    assert status == "INVALID_ARGUMENT" and b"space" in lwi.lib.lwi_last_error()
    bad = ras.copy()
    bad[0, 0] = np.nan
    status, _ = segment_borrowed(lwi, model, data_f, bad, 0)
    assert status == "INVALID_ARGUMENT" and b"non-finite" in lwi.lib.lwi_last_error()
    status = lwi.lib.lwi_segment(model, None, None, 0, 0, None, PROGRESS_FN(), None)
    assert STATUS[status] == "INVALID_ARGUMENT"

"""Every NIfTI in the fetched corpus: lwi convert then nibabel on both gives the same voxel values
(float32 tolerance) and affine (1e-5), or lwi refuses with a named reason for files that are not a
3-D scalar volume (RGB, true 4-D+, header-only, unreadable)."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

CORPUS = ["nibabel/nibabel/tests/data", "nifti-reader-js/package/tests/data",
          "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"]


def corpus_files(root: Path):
    files = []
    for sub in CORPUS:
        files += sorted(p for p in (root / sub).rglob("*") if p.name.endswith((".nii", ".nii.gz")))
    return files


def why_not_3d_scalar(path: Path):
    """The reason nibabel's view of this file is not a 3-D scalar volume, or None."""
    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - any failure of the reference counts
        return f"nibabel cannot load it ({type(e).__name__})"
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or img.header["magic"] in (b"ni1", b"ni2"):
        return "not a single-file NIfTI"
    dt = img.get_data_dtype()
    if dt.fields is not None or dt.kind == "c" or dt.itemsize > 8 or dt.kind == "b":
        return f"voxel type {dt}"
    if any(s > 1 for s in img.shape[3:]):
        return f"{len(img.shape)}-D shape {img.shape}"
    try:
        img.get_fdata()
    except Exception as e:  # noqa: BLE001
        return f"nibabel cannot read its voxels ({type(e).__name__})"
    return None


def test_every_corpus_nifti_converts_exactly_or_is_refused_with_a_reason(lwi, testdata, tmp_path, report):
    files = corpus_files(testdata)
    assert len(files) > 150, f"corpus incomplete: {len(files)} files under {testdata}"
    rows, failures = [], []
    for i, f in enumerate(files):
        name = str(f.relative_to(testdata)).replace("-2.18.0/tests/reference_files", "").replace("/tests/data", "")
        expected_refusal = why_not_3d_scalar(f)
        out = tmp_path / f"out{i}.nii.gz"
        try:
            lwi.convert(f, out)
        except Exception as e:  # noqa: BLE001
            status, message = getattr(e, "status", "?"), getattr(e, "message", str(e))
            rows.append((name, f"refused {status}", message.split(": ", 2)[-1][:90]))
            if expected_refusal is None:
                failures.append(f"{name}: lwi refused a 3-D scalar volume nibabel reads: {message}")
            elif status not in ("UNSUPPORTED", "FORMAT") or not message:
                failures.append(f"{name}: refusal without a named reason: {status} {message}")
            continue
        if expected_refusal is not None:
            failures.append(f"{name}: lwi converted it, but it is not a 3-D scalar volume: {expected_refusal}")
            continue
        ref = nib.load(str(f))
        got = nib.load(str(out))
        a = np.asarray(ref.get_fdata(), dtype=np.float64)
        b = np.asarray(got.get_fdata(), dtype=np.float64)
        a = a.reshape(a.shape[:3] + (1,) * (3 - min(a.ndim, 3)))
        if a.shape[:3] != b.shape or a.size != b.size:
            failures.append(f"{name}: shape {b.shape} != nibabel's {ref.shape}")
            continue
        a = a.reshape(b.shape)
        scale = max(1.0, float(np.nanmax(np.abs(a))) if np.isfinite(a).any() else 1.0)
        same_nan = np.array_equal(np.isnan(a), np.isnan(b))
        dv = float(np.nanmax(np.abs(a - b))) if np.isfinite(a).any() else 0.0
        da = float(np.max(np.abs(ref.affine - got.affine)))
        ok = same_nan and dv <= 1e-6 * scale and da <= 1e-5
        rows.append((name, "converted" if ok else "MISMATCH", f"max|dv|={dv:.3g} max|daffine|={da:.3g} {got.get_data_dtype()}"))
        if not ok:
            failures.append(f"{name}: values differ by {dv} (nan pattern same: {same_nan}), affine by {da}")
    width = max(len(r[0]) for r in rows)
    table = "\n".join(f"{n:<{width}}  {o:<22}  {d}" for n, o, d in rows)
    counts = {}
    for _, o, _ in rows:
        counts[o.split()[0]] = counts.get(o.split()[0], 0) + 1
    report(f"\nNIfTI corpus ({len(rows)} files; {counts}):\n{table}")
    assert not failures, "\n".join(failures)


def test_scaled_nifti_matches_nibabel(lwi, testdata, tmp_path):
    """A real CT stored as int16 with a non-trivial scl_slope/scl_inter (as scanners export)."""
    ct = nib.load(str(testdata / CORPUS[2] / "example_ct_sm.nii.gz"))
    data = ct.get_fdata()
    img = nib.Nifti1Image(data.astype(np.float32), ct.affine)
    img.set_data_dtype(np.int16)  # nibabel chooses slope and intercept to fit
    src = tmp_path / "scaled.nii"
    nib.save(img, str(src))
    hdr = nib.load(str(src)).header
    assert hdr["scl_slope"] not in (0, 1), "the fixture must carry real scaling"
    ref = nib.load(str(src)).get_fdata()
    got, affine = lwi.read(src)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(affine, ct.affine, atol=1e-5)


@pytest.mark.parametrize("codes", [(0, 0), (1, 0), (0, 2), (1, 2), (2, 1)])
def test_qform_sform_precedence_matches_nibabel(lwi, tmp_path, codes):
    """An oblique qform and a different sform: lwi picks what nibabel's .affine picks."""
    q_code, s_code = codes
    rng = np.random.default_rng(3)
    c, s = np.cos(0.4), np.sin(0.4)
    qaff = np.array([[c * 1.5, -s * 2.0, 0, 10], [s * 1.5, c * 2.0, 0, -20], [0, 0, -3.0, 30], [0, 0, 0, 1]])
    saff = np.diag([-2.0, 2.5, 3.5, 1.0])
    saff[:3, 3] = [5, 6, 7]
    img = nib.Nifti1Image(rng.normal(size=(5, 6, 7)).astype(np.float32), None)
    img.header.set_qform(qaff, code=q_code)
    img.header.set_sform(saff, code=s_code)
    img.header.set_qform(qaff, code=q_code)  # set_sform may touch the qform code; set it last
    src = tmp_path / "codes.nii.gz"
    nib.save(img, str(src))
    ref = nib.load(str(src))
    got, affine = lwi.read(src)
    np.testing.assert_allclose(affine, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(got, ref.get_fdata().astype(np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64,
                                   np.uint64, np.float32, np.float64])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_every_scalar_dtype_both_endians(lwi, tmp_path, dtype, endian):
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        data = rng.integers(max(info.min, -(2**62)), min(info.max, 2**62), size=(4, 5, 6), dtype=np.int64)
        data = data.astype(dtype)
        data.flat[0] = info.max if info.max < 2**63 else 2**62
        data.flat[1] = info.min
    else:
        data = rng.normal(scale=1000, size=(4, 5, 6)).astype(dtype)
    hdr = nib.Nifti1Header(endianness=endian)
    hdr.set_data_dtype(dtype)
    img = nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0]), header=hdr)
    src = tmp_path / "t.nii"
    nib.save(img, str(src))
    assert nib.load(str(src)).header.endianness == endian
    got, _ = lwi.read(src)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, data)
    out = tmp_path / "back.nii.gz"
    lwi.convert(src, out)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)


def test_nifti2_reads_like_nibabel(lwi, tmp_path):
    rng = np.random.default_rng(9)
    data = rng.normal(size=(7, 8, 9)).astype(np.float64)
    aff = np.array([[0, 0, 2.0, -5], [-1.5, 0, 0, 4], [0, 3.0, 0, 1], [0, 0, 0, 1]])
    src = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti2Image(data, aff), str(src))
    got, affine = lwi.read(src)
    np.testing.assert_array_equal(got, data)
    np.testing.assert_allclose(affine, nib.load(str(src)).affine, atol=1e-12)


def test_written_nifti_carries_both_sform_and_qform(lwi, testdata, tmp_path):
    src = testdata / CORPUS[2] / "example_ct.nii.gz"
    out = tmp_path / "ct.nii.gz"
    lwi.convert(src, out)
    hdr = nib.load(str(out)).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 2)
    ref = nib.load(str(src)).affine
    np.testing.assert_allclose(hdr.get_qform(), ref, atol=1e-4)
    np.testing.assert_allclose(hdr.get_sform(), ref, atol=1e-5)

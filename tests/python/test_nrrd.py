"""NRRD, hand-written in lwi, against pynrrd and SimpleITK: files they write from real volumes read
identically in lwi, and NRRD lwi writes reads identically in both."""
import subprocess

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from lwi_ctypes import LPS, RAS, cli_path

TS = "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


@pytest.fixture(scope="module", params=["example_ct.nii.gz", "example_mr_sm.nii.gz"])
def real_volume(request, testdata):
    img = nib.load(str(testdata / TS / request.param))
    return np.asanyarray(img.dataobj), img.affine


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior"])
@pytest.mark.parametrize("encoding", ["gzip", "raw"])
@pytest.mark.parametrize("detached", [False, True])
def test_pynrrd_files_read_identically(lwi, real_volume, tmp_path, space, encoding, detached):
    data, ras = real_volume
    m = FLIP @ ras if space.startswith("left") else ras
    header = {"space": space, "space directions": m[:3, :3].T, "space origin": m[:3, 3],
              "kinds": ["domain"] * 3, "encoding": encoding}
    path = tmp_path / ("v.nhdr" if detached else "v.nrrd")
    nrrd.write(str(path), data, header, detached_header=detached, index_order="F")
    got, affine = lwi.read(path)
    assert got.dtype == data.dtype
    np.testing.assert_array_equal(got, data)
    np.testing.assert_allclose(affine, ras, atol=1e-9)


@pytest.mark.parametrize("compress", [True, False])
def test_simpleitk_files_read_identically(lwi, real_volume, tmp_path, compress):
    data, ras = real_volume
    # An oblique direction too, as resliced volumes have.
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    for aff in (ras, rot @ ras):
        lps = FLIP @ aff
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
        img.SetSpacing(spacing.tolist())
        img.SetOrigin(lps[:3, 3].tolist())
        img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
        path = tmp_path / "itk.nrrd"
        sitk.WriteImage(img, str(path), compress)
        got, affine = lwi.read(path, space=LPS)
        np.testing.assert_array_equal(got, data)
        np.testing.assert_allclose(affine, lps, atol=1e-9)


@pytest.mark.parametrize("ext", [".nrrd", ".nhdr"])
def test_lwi_written_nrrd_reads_identically_in_pynrrd_and_simpleitk(lwi, testdata, tmp_path, ext):
    src = testdata / TS / "example_ct.nii.gz"
    ref = nib.load(str(src))
    data, ras = np.asanyarray(ref.dataobj), ref.affine
    out = tmp_path / f"ct{ext}"
    lwi.convert(src, out)

    pdata, hdr = nrrd.read(str(out), index_order="F")
    assert hdr["space"] == "left-posterior-superior"
    np.testing.assert_array_equal(pdata, data)
    m = np.eye(4)
    m[:3, :3] = np.asarray(hdr["space directions"]).T
    m[:3, 3] = hdr["space origin"]
    np.testing.assert_allclose(FLIP @ m, ras, atol=1e-6)

    img = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), data)
    lps = FLIP @ ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    np.testing.assert_allclose(img.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), lps[:3, 3], atol=1e-6)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), lps[:3, :3] / spacing, atol=1e-6)


def test_convert_between_nifti_and_nrrd_keeps_every_world_point(testdata, tmp_path):
    """Through the lwi command: NIfTI -> NRRD -> NIfTI. A world point sampled in the source (via
    nibabel, RAS) and in the NRRD (via pynrrd, LPS) lands on the same value."""
    src = testdata / TS / "example_mr_sm.nii.gz"
    mid, back = tmp_path / "mr.nrrd", tmp_path / "mr.nii.gz"
    for a, b in ((src, mid), (mid, back)):
        subprocess.run([str(cli_path()), "convert", str(a), str(b)], check=True)
    ref = nib.load(str(src))
    data = np.asanyarray(ref.dataobj)
    pdata, hdr = nrrd.read(str(mid), index_order="F")
    m = np.eye(4)
    m[:3, :3] = np.asarray(hdr["space directions"]).T
    m[:3, 3] = hdr["space origin"]
    rng = np.random.default_rng(0)
    ijk = np.stack([rng.integers(0, n, 500) for n in data.shape] + [np.ones(500, int)])
    world_ras = ref.affine @ ijk
    in_nrrd = np.linalg.solve(m, FLIP @ world_ras).round().astype(int)
    np.testing.assert_array_equal(pdata[tuple(in_nrrd[:3])], data[tuple(ijk[:3])])
    round_trip = nib.load(str(back))
    np.testing.assert_array_equal(np.asanyarray(round_trip.dataobj), data)
    np.testing.assert_allclose(round_trip.affine, ref.affine, atol=1e-5)


def test_nrrd_js_corpus_matches_pynrrd_or_is_refused(lwi, testdata, report):
    rows = []
    for f in sorted((testdata / "nrrd-js" / "package").glob("*.nrrd")):
        pdata, hdr = nrrd.read(str(f), index_order="F")
        nonspatial = [i for i, d in enumerate(hdr.get("space directions", [])) if d is None or np.isnan(d).all()]
        if any(pdata.shape[i] > 1 for i in nonspatial):
            with pytest.raises(Exception) as err:
                lwi.read(f)
            assert err.value.status == "UNSUPPORTED"
            rows.append(f"{f.name}: refused ({err.value.message.split(': ', 2)[-1]})")
            continue
        got, _ = lwi.read(f)
        expect = pdata.reshape(pdata.shape + (1,) * (3 - pdata.ndim))
        np.testing.assert_array_equal(got, expect)
        rows.append(f"{f.name}: read, {hdr['type']} {list(pdata.shape)} {hdr['encoding']} = pynrrd")
    report("\nnrrd-js corpus:\n" + "\n".join(rows))


def write_text(path, text: str, data: bytes = b""):
    path.write_bytes(text.encode() + data)
    return path


@pytest.mark.parametrize(
    "name, header, data, status, words",
    [
        ("truncated", "NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n", b"\0" * 10, "FORMAT", "truncated"),
        ("huge", "NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\nencoding: gzip\n\n", b"\x1f\x8b\x08\0" + b"\0" * 20, "FORMAT", "need"),
        ("nan spacing", "NRRD0004\ntype: uchar\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
         "space directions: (nan,0,0) (0,1,0) (0,0,1)\nencoding: raw\n\n", b"\0" * 8, "FORMAT", "finite"),
        ("zero spacing", "NRRD0004\ntype: uchar\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
         "space directions: (0,0,0) (0,1,0) (0,0,1)\nencoding: raw\n\n", b"\0" * 8, "FORMAT", "spacing"),
        ("bad gzip", "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: gzip\n\n", b"\x1f\x8bgarbage", "FORMAT", "gzip"),
        ("no type", "NRRD0004\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n\n", b"\0" * 8, "FORMAT", "type"),
        ("rgb", "NRRD0004\ntype: uchar\ndimension: 4\nspace: left-posterior-superior\nsizes: 3 2 2 2\n"
         "space directions: none (1,0,0) (0,1,0) (0,0,1)\nkinds: RGB-color domain domain domain\nencoding: raw\n\n",
         b"\0" * 24, "UNSUPPORTED", "not spatial"),
        ("missing data file", "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: nowhere.raw\n\n", b"", "IO", "nowhere.raw"),
        ("bzip2", "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: bzip2\n\n", b"", "UNSUPPORTED", "bzip2"),
        ("not nrrd", "P6\n2 2\n255\n", b"\0" * 12, "FORMAT", "NRRD000"),
    ],
)
def test_bad_nrrd_is_a_clear_error(lwi, tmp_path, name, header, data, status, words):
    path = write_text(tmp_path / "bad.nrrd", header, data)
    with pytest.raises(Exception) as err:
        lwi.read(path)
    assert err.value.status == status, err.value
    assert words in err.value.message, err.value

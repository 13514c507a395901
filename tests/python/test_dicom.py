"""DICOM in and out against the references: SimpleITK's ImageSeriesReader for series geometry and values, pydicom
(with the pylibjpeg codecs) for the pixels of every file of pydicom's and pydicom-data's corpora, highdicom for the
DICOM SEG lwi writes."""
import glob
import shutil
import subprocess

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lwi_ctypes import LPS, LwiError, cli_path

TS = "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"


@pytest.fixture(scope="module")
def ct_series(testdata):
    return testdata / TS / "example_ct_dicom"


def sitk_series(folder):
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    return r.Execute()


def lps_geometry(image):
    """SimpleITK's origin, spacing and direction as one LPS voxel->world matrix."""
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def test_ct_series_equals_simpleitk(lwi, ct_series):
    ref = sitk_series(ct_series)
    voxels, affine = lwi.read(ct_series, space=LPS)
    assert voxels.shape == ref.GetSize() == (512, 512, 20)
    np.testing.assert_array_equal(voxels, sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    np.testing.assert_allclose(affine, lps_geometry(ref), atol=1e-4)
    assert voxels.dtype == np.int16 and voxels.min() < -1000  # Hounsfield units: the rescale is applied


def test_slices_are_sorted_by_position_not_by_name_or_instance_number(lwi, ct_series, tmp_path):
    reference, _ = lwi.read(ct_series)
    files = sorted(ct_series.iterdir())
    for i, f in enumerate(files):  # reversed names, nested folders, InstanceNumber scrambled
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = (i * 7) % len(files) + 1
        (tmp_path / f"sub{i % 3}").mkdir(exist_ok=True)
        ds.save_as(tmp_path / f"sub{i % 3}" / f"{len(files) - i:03d}.dcm")
    voxels, _ = lwi.read(tmp_path)
    np.testing.assert_array_equal(voxels, reference)


def write_series(ct_series, out, change):
    """Copies the series through pydicom, letting `change(index, dataset)` alter or drop (return False) slices."""
    out.mkdir()
    files = sorted(ct_series.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if change(i, ds) is not False:
            ds.save_as(out / f.name)
    return out


@pytest.mark.parametrize("case, change, message", [
    ("missing slice", lambda i, ds: i != 7, "not a regular grid"),
    ("duplicate position", lambda i, ds: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2], -804.5])
     if i == 1 else None, "same position"),
    ("gantry tilt", lambda i, ds: setattr(ds, "ImagePositionPatient",
                                          [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) + 0.5 * i,
                                           ds.ImagePositionPatient[2]]), "gantry tilt"),
    ("uneven spacing", lambda i, ds: setattr(ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2],
                                                                          -804.5 + 2.0 * i + (0.3 if i > 10 else 0)]),
     "not a regular grid"),
])
def test_irregular_series_are_refused_saying_why(lwi, ct_series, tmp_path, case, change, message):
    folder = write_series(ct_series, tmp_path / "series", change)
    with pytest.raises(LwiError) as e:
        lwi.read(folder)
    assert message in str(e.value), str(e.value)


def test_bad_files_are_skipped_and_named(lwi, ct_series, testdata, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(ct_series, folder)
    files = testdata / "pydicom" / "pydicom" / "data" / "test_files"
    shutil.copy(files / "MR_truncated.dcm", folder)
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "half.dcm").write_bytes(next(ct_series.iterdir()).read_bytes()[:3000])
    voxels, _ = lwi.read(folder)  # the CT series is still read whole
    assert voxels.shape == (512, 512, 20)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(folder / "half.dcm", only_bad)
    with pytest.raises(LwiError) as e:
        lwi.read(only_bad)
    assert "half.dcm" in str(e.value) and "no readable DICOM image" in str(e.value)


def test_series_choice_and_listing(ct_series, testdata, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(ct_series, folder / "ct")
    mr = testdata / "pydicom" / "pydicom" / "data" / "test_files" / "MR_small.dcm"
    shutil.copy(mr, folder / "mr.dcm")
    info = subprocess.run([str(cli_path()), "info", str(folder)], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "CT" in info.stdout and "MR" in info.stdout and "20 slices" in info.stdout
    uid = str(pydicom.dcmread(mr).SeriesInstanceUID)
    out = tmp_path / "mr.nii.gz"
    r = subprocess.run([str(cli_path()), "convert", "--series", uid, str(folder), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert nib.load(out).shape == (64, 64, 1)
    default = tmp_path / "ct.nii.gz"
    subprocess.run([str(cli_path()), "convert", str(folder), str(default)], check=True, capture_output=True)
    assert nib.load(default).shape == (512, 512, 20), "the largest CT/MR series by default"


def test_a_list_of_files_reads_like_their_folder(ct_series, testdata, tmp_path):
    files = sorted(ct_series.iterdir(), reverse=True)
    stray = testdata / "pydicom" / "pydicom" / "data" / "test_files" / "MR_truncated.dcm"
    run = lambda *paths: subprocess.run([str(cli_path()), "convert", *map(str, paths)], capture_output=True, text=True)
    assert run(*files, stray, tmp_path / "files.nii.gz").returncode == 0
    assert run(ct_series, tmp_path / "folder.nii.gz").returncode == 0
    a, b = nib.load(tmp_path / "files.nii.gz"), nib.load(tmp_path / "folder.nii.gz")
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)
    r = run(*files[:5], *files[6:], tmp_path / "gap.nii.gz")  # a slice left out of the list
    assert r.returncode == 1 and "not a regular grid" in r.stderr


def test_dicomdir_is_accepted(lwi, testdata):
    d = testdata / "pydicom" / "pydicom" / "data" / "test_files" / "dicomdirtests"
    voxels, _ = lwi.read(d / "DICOMDIR")
    assert voxels.ndim == 3 and voxels.size > 0


def frame_rescale(ds, pf):
    """Rescale of a frame: its per-frame group, else the shared one, else the top level (the DICOM rule)."""
    for group in (pf, getattr(ds, "SharedFunctionalGroupsSequence", [None])[0], ds):
        seq = getattr(group, "PixelValueTransformationSequence", None) if group is not ds else [ds]
        if seq and "RescaleSlope" in seq[0]:
            return float(seq[0].RescaleSlope), float(seq[0].RescaleIntercept)
    return 1.0, 0.0


def frame_geometry(ds, pf):
    def find(attr, group):
        for g in (pf, getattr(ds, "SharedFunctionalGroupsSequence", [None])[0]):
            seq = getattr(g, group, None) if g is not None else None
            if seq and attr in seq[0]:
                return [float(v) for v in seq[0][attr].value]
        return [float(v) for v in ds[attr].value] if attr in ds else None
    return (find("ImagePositionPatient", "PlanePositionSequence"),
            find("ImageOrientationPatient", "PlaneOrientationSequence"))


def pydicom_volume(ds):
    """pydicom's pixels as lwi's volume should hold them: modality values, frames sorted along the normal."""
    pixels = ds.pixel_array.astype(np.float64)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    pixels = pixels.reshape(frames, ds.Rows, ds.Columns)
    per_frame = list(getattr(ds, "PerFrameFunctionalGroupsSequence", [None] * frames))
    keys, values = [], []
    for f in range(frames):
        slope, intercept = frame_rescale(ds, per_frame[f])
        position, orientation = frame_geometry(ds, per_frame[f])
        normal = np.cross(orientation[:3], orientation[3:])
        keys.append(float(np.dot(position, normal)))
        values.append(pixels[f] * slope + intercept)
    order = np.argsort(keys, kind="stable")
    return np.stack([values[i] for i in order]).transpose(2, 1, 0)


def corpus_files(testdata):
    files = sorted(glob.glob(str(testdata / "pydicom" / "pydicom" / "data" / "test_files" / "**" / "*.dcm"), recursive=True))
    files += sorted(glob.glob(str(testdata / "pydicom-data" / "data_store" / "data" / "*.dcm")))
    return files


def with_geometry(ds, path):
    """A copy of a projection/secondary-capture file given a slice geometry (data set only: the pixel data bytes and
    transfer syntax stay as they are), so its codec is exercised through the volume reader."""
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.save_as(path)
    return path


def test_every_corpus_file_decodes_like_pydicom_or_is_refused(lwi, testdata, report, tmp_path):
    rows, mismatches = [], []
    for f in corpus_files(testdata):
        name = f.split("/data/")[-1]
        try:
            ds = pydicom.dcmread(f)
            syntax = ds.file_meta.TransferSyntaxUID.name if "TransferSyntaxUID" in ds.file_meta else "?"
        except Exception as e:  # noqa: BLE001 - pydicom's own refusal
            ds, syntax = None, f"pydicom: {type(e).__name__}"
        try:
            voxels, _ = lwi.read(f, space=LPS)
            outcome = "equal"
        except LwiError as e:
            reason = str(e).split(": ", 2)[-1].splitlines()[-1].split(": ", 1)[-1]
            assert reason.strip(), f"{name}: refused without a reason"
            if "not a cross-sectional image" in reason and ds is not None and ds.get("SamplesPerPixel", 1) == 1:
                try:
                    voxels, _ = lwi.read(with_geometry(ds, tmp_path / f.replace("/", "_")), space=LPS)
                    outcome = "equal+geo"  # decoded once given a geometry
                except LwiError as e2:
                    rows.append((name, syntax, "refused", str(e2).splitlines()[-1].split(": ")[-1][:90]))
                    continue
            else:
                rows.append((name, syntax, "refused", reason[:90]))
                continue
        try:
            expected = pydicom_volume(ds)
        except Exception as e:  # noqa: BLE001
            mismatches.append(f"{name}: lwi decoded it, pydicom cannot ({e})")
            continue
        ok = voxels.shape == expected.shape and np.allclose(voxels.astype(np.float64), expected, rtol=1e-6, atol=1e-6)
        rows.append((name, syntax, outcome if ok else "MISMATCH", f"{voxels.shape} {voxels.dtype}"))
        if not ok:
            mismatches.append(f"{name}: values differ from pydicom")
    width = max(len(r[0]) for r in rows)
    table = "\n".join(f"  {r[0]:<{width}}  {r[1][:38]:<38}  {r[2]:<8}  {r[3]}" for r in rows)
    decoded = sum(r[2].startswith("equal") for r in rows)
    report(f"\nDICOM corpus (pydicom 3.0.2 + pydicom-data 1.0.0): {decoded} decoded equal to pydicom, "
           f"{sum(r[2] == 'refused' for r in rows)} refused with a reason, {len(mismatches)} mismatches\n{table}")
    assert not mismatches, "\n".join(mismatches)
    syntaxes = {r[1] for r in rows if r[2].startswith("equal")}
    for needed in ("Explicit VR Little Endian", "Implicit VR Little Endian", "Explicit VR Big Endian", "RLE Lossless",
                   "JPEG 2000 Image Compression (Lossless Only)", "JPEG 2000 Image Compression",
                   "JPEG-LS Lossless Image Compression", "JPEG-LS Lossy (Near-Lossless) Image Compression",
                   "Deflated Explicit VR Little Endian",
                   "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])"):
        assert needed in syntaxes, f"no grey-level file of {needed} decoded: {sorted(syntaxes)}"


def with_functional_groups(ds, path):
    """pydicom-data's Enhanced MR files come with their functional groups stripped (lwi refuses them: no geometry).
    This gives one back: an oblique shared orientation and pixel measures, per-frame positions listed out of order
    and a per-frame rescale; the pixel data (and its codec) stay as they are."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    row, col = np.array([0.8, 0.6, 0.0]), np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, col)

    def item(**attributes):
        d = Dataset()
        for k, v in attributes.items():
            setattr(d, k, v)
        return d

    shared = item(PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[*row, *col])]),
                  PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.7, 0.9], SliceThickness=3)]))
    order = [3, 0, 7, 1, 9, 2, 5, 4, 8, 6]
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        item(PlanePositionSequence=Sequence([item(ImagePositionPatient=list(np.array([10.0, -20.0, 30.0]) + 2.5 * k * normal))]),
             PixelValueTransformationSequence=Sequence([item(RescaleSlope=1 + k % 3, RescaleIntercept=-10 * k,
                                                             RescaleType="US")]))
        for k in order[:int(ds.NumberOfFrames)]])
    ds.save_as(path)
    return path


@pytest.mark.parametrize("name", ["eCT_Supplemental.dcm", "emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm",
                                  "emri_small_big_endian.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"])
def test_enhanced_multiframe_geometry_per_frame(lwi, testdata, name, tmp_path):
    f = testdata / "pydicom-data" / "data_store" / "data" / name
    if name.startswith("emri"):
        f = with_functional_groups(pydicom.dcmread(f), tmp_path / name)
    ds = pydicom.dcmread(f)
    voxels, affine = lwi.read(f, space=LPS)
    np.testing.assert_allclose(voxels, pydicom_volume(ds), rtol=1e-6)
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = [frame_geometry(ds, pf)[0] for pf in frames]
    orientation = frame_geometry(ds, frames[0])[1]
    normal = np.cross(orientation[:3], orientation[3:])
    positions.sort(key=lambda p: np.dot(p, normal))
    np.testing.assert_allclose(affine[:3, 3], positions[0], atol=1e-4)
    if len(positions) > 1:
        np.testing.assert_allclose(affine[:3, 2], (np.array(positions[-1]) - positions[0]) / (len(positions) - 1), atol=1e-4)
    np.testing.assert_allclose(affine[:3, 0] / np.linalg.norm(affine[:3, 0]), orientation[:3], atol=1e-6)


def test_segment_dicom_equals_segment_nifti_and_writes_a_valid_seg(ct_series, tiny_model, tmp_path):
    ref = sitk_series(ct_series)
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ref, str(nifti))
    run = lambda src, out: subprocess.run([str(cli_path()), "segment", "--model", str(tiny_model), str(src), "--out", str(out),
                                           "--device", "cpu", "--no-manifest"], capture_output=True, text=True)
    for src, out in ((ct_series, tmp_path / "from_dicom.nii.gz"), (nifti, tmp_path / "from_nifti.nii.gz"),
                     (ct_series, tmp_path / "seg.dcm")):
        r = run(src, out)
        assert r.returncode == 0, r.stderr
    a, b = nib.load(tmp_path / "from_dicom.nii.gz"), nib.load(tmp_path / "from_nifti.nii.gz")
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    labels = np.asarray(a.dataobj)
    assert len(np.unique(labels)) > 1

    seg = hd.seg.segread(tmp_path / "seg.dcm")  # highdicom parses and checks the structure
    assert seg.SegmentationType == "BINARY"
    source = sorted((pydicom.dcmread(f) for f in ct_series.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    uids = [d.file_meta.MediaStorageSOPInstanceUID for d in source]
    present = [v for v in np.unique(labels) if v != 0]
    assert len(seg.SegmentSequence) == len(present)
    for item, value in zip(seg.SegmentSequence, present):
        assert item.SegmentDescription == f"label value {value}"
        masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[item.SegmentNumber])
        np.testing.assert_array_equal(masks[..., 0].astype(bool), (labels == value).transpose(2, 1, 0))


def test_seg_output_needs_dicom_input(tiny_model, testdata, tmp_path):
    r = subprocess.run([str(cli_path()), "segment", "--model", str(tiny_model), str(testdata / TS / "example_ct_sm.nii.gz"),
                        "--out", str(tmp_path / "x.dcm"), "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode != 0 and "needs DICOM input" in r.stderr
    assert not (tmp_path / "x.dcm").exists()


def test_rounded_oblique_positions_read_as_a_grid(lwi, ct_series, tmp_path):
    """Positions stored to 0.1 mm along an oblique normal (as a GE MR series has them: steps scattering by
    ±1 %) are a regular grid: read, with the fitted step and the largest deviation in the listing."""
    normal = np.array([0.0, np.sin(0.3), np.cos(0.3)])
    row, col = np.array([1.0, 0.0, 0.0]), np.cross(normal, [1.0, 0.0, 0.0])

    def oblique(i, ds):
        ds.ImageOrientationPatient = [*row, *(-col)]
        ds.ImagePositionPatient = [round(float(v), 1) for v in np.array([-100.0, -50.0, -800.0]) + 7.0137 * i * normal]

    folder = write_series(ct_series, tmp_path / "oblique", oblique)
    voxels, affine = lwi.read(folder, space=LPS)
    assert voxels.shape == (512, 512, 20)
    assert abs(np.linalg.norm(affine[:3, 2]) - 7.0137) < 0.02
    r = subprocess.run([str(cli_path()), "info", str(folder)], capture_output=True, text=True)
    assert r.returncode == 0 and "scatter up to" in r.stdout, r.stdout + r.stderr


GE_SERIES = "pydicom/pydicom/data/test_files/dicomdirtests/98892001/CT5N"  # a real GE CT series, native pixels
PADDING = 2_500_000  # zero bytes after Pixel Data, as an old GE MR scanner writes its files


def padded_copy(files, folder, tail=b"\0" * PADDING):
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes() + tail)
    return folder


def pydicom_series(files):
    """pydicom's reading of a series as lwi's volume holds it: modality values, slices along the normal."""
    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        normal = np.cross(*np.array(ds.ImageOrientationPatient, dtype=float).reshape(2, 3))
        values = ds.pixel_array * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
        slices.append((float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)), values))
    slices.sort(key=lambda s: s[0])
    return np.stack([v for _, v in slices]).transpose(2, 1, 0)


@pytest.mark.parametrize("series", [GE_SERIES, f"{TS}/example_ct_dicom"], ids=["GE native", "Siemens JPEG 2000"])
def test_trailing_zero_padding_after_the_data_set_is_read_as_pydicom_reads_it(lwi, testdata, tmp_path, series):
    files = sorted((testdata / series).iterdir())
    folder = padded_copy(files, tmp_path / "padded")
    padded = sorted(folder.iterdir())
    voxels, affine = lwi.read(folder)
    np.testing.assert_array_equal(voxels, pydicom_series(padded))
    original, original_affine = lwi.read(testdata / series)
    np.testing.assert_array_equal(voxels, original)
    np.testing.assert_array_equal(affine, original_affine)
    one, _ = lwi.read(padded[0])  # a single file
    np.testing.assert_array_equal(one, pydicom_series(padded[:1]))


def test_a_padded_series_is_found_through_its_dicomdir(lwi, testdata, tmp_path):
    tree = tmp_path / "dicomdirtests"
    shutil.copytree(testdata / "pydicom" / "pydicom" / "data" / "test_files" / "dicomdirtests", tree)
    series = tree / "98892001" / "CT5N"
    padded_copy(sorted(series.iterdir()), series)
    uid = str(pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID)
    out = tmp_path / "ct.nii.gz"
    r = subprocess.run([str(cli_path()), "convert", "--series", uid, str(tree / "DICOMDIR"), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), pydicom_series(sorted(series.iterdir())))


@pytest.mark.parametrize("tail, message", [
    (b"\0" * 1008 + bytes.fromhex("10001000") + b"LO" + (0x7000).to_bytes(2, "little") + b"Doe",
     "element (0010,0010) at byte 4952 claims 28672 bytes, past the end of the data"),
    (b"\0" * 1000 + b"\x01\x02\x03\x04\x05\x06\x07", "Could not read"),
], ids=["an element running past the end", "bytes that are no element"])
def test_garbage_after_the_data_set_is_still_an_error(lwi, testdata, tmp_path, tail, message):
    f = sorted((testdata / GE_SERIES).iterdir())[0]
    bad = padded_copy([f], tmp_path / "bad", tail=tail) / f.name
    with pytest.raises(LwiError) as e:
        lwi.read(bad)
    assert message in str(e.value) and f.name in str(e.value), str(e.value)

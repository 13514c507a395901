"""Hostile and broken input as a host meets it — through the `lwi` command under an 8 GiB address-space
limit and a 60 s timeout, and through liblwi.so by ctypes: a crafted DICOM, NRRD or JSON document gets an
error naming the file or field and the value, never an abort, a stack overflow, an allocation sized by a
header's claim, a read past what the header describes, or a message that echoes the input whole."""
import ctypes
import gzip
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time

import pydicom
import pytest

from lwi_ctypes import cli_path

TESTDATA_SERIES = "pydicom/pydicom/data/test_files/dicomdirtests/98892001/CT5N"  # a real GE CT series
LIMIT = 8 << 30


def bounded(*args):
    """Runs `lwi ARGS` as a host would meet a hostile file: 8 GiB of address space, 60 s. Returns
    (exit code, stdout and stderr, peak resident MiB of that process, seconds); a signal (abort, stack
    overflow) or a panic fails the test."""
    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen([str(cli_path()), *map(str, args)], stdout=out, stderr=out, preexec_fn=limits)
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > 60:
                p.kill()
                pytest.fail(f"lwi {args} ran past 60 s")
            time.sleep(0.05)
        out.seek(0)
        text = out.read().decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    assert rc >= 0, f"lwi {args} killed by signal {-rc}: {text[-2000:]}"
    assert "panicked" not in text and "stack overflow" not in text, text[-2000:]
    return rc, text, usage.ru_maxrss / 1024, time.monotonic() - start


@pytest.fixture(scope="module")
def slice_file(testdata):
    return sorted((testdata / TESTDATA_SERIES).iterdir())[0]


def insert_before_pixels(src, dst, blob):
    b = src.read_bytes()
    i = b.rfind(bytes.fromhex("e07f1000"))  # (7FE0,0010) Pixel Data, explicit VR little endian
    dst.write_bytes(b[:i] + blob + b[i:])
    return dst


def nested_sequences(n):
    """n sequences, each in an item of the one before (undefined lengths, explicit VR little endian)."""
    opening = bytes.fromhex("08004011") + b"SQ\0\0" + b"\xff" * 4 + bytes.fromhex("feff00e0") + b"\xff" * 4
    closing = bytes.fromhex("feff0de000000000") + bytes.fromhex("feffdde000000000")
    return opening * n + closing * n


def test_a_dicom_sequence_nested_10000_deep_is_refused_not_a_stack_overflow(slice_file, tmp_path):
    deep = insert_before_pixels(slice_file, tmp_path / "deep.dcm", nested_sequences(10_000))
    for args in (("info", deep), ("convert", deep, tmp_path / "out.nii.gz")):
        rc, text, _, _ = bounded(*args)
        assert "sequences nested more than 64 deep" in text and "deep.dcm" in text, text
    assert rc == 1 and not (tmp_path / "out.nii.gz").exists()
    # Ordinary nesting (an Enhanced object's functional groups are three deep) still reads.
    shallow = insert_before_pixels(slice_file, tmp_path / "shallow.dcm", nested_sequences(5))
    rc, text, _, _ = bounded("convert", shallow, tmp_path / "shallow.nii.gz")
    assert rc == 0, text


@pytest.mark.parametrize("rows, frames, message", [
    (65535, None, "need more voxels than the 1073741824"),
    (4096, None, "Pixel Data holds 512 bytes; 4096 rows × 4096 columns × 1 frames of 16 bits need 33554432"),
    (16, 2 ** 31, "need more voxels than the 1073741824"),
    (16, 2 ** 20, "Pixel Data holds 512 bytes; 16 rows × 16 columns × 1048576 frames"),
])
def test_image_sizes_are_checked_against_the_pixel_data_before_allocating(slice_file, tmp_path, rows, frames,
                                                                          message):
    ds = pydicom.dcmread(slice_file)
    ds.Rows = ds.Columns = rows
    if frames:
        ds.NumberOfFrames = frames
    path = tmp_path / "claim.dcm"
    ds.save_as(path)
    for args in (("info", path), ("convert", path, tmp_path / "out.nii.gz")):
        rc, text, _, _ = bounded(*args)
        assert message in text, text
    assert rc == 1 and "claim.dcm" in text


def test_a_dicom_element_longer_than_its_file_is_refused_without_allocating_it(testdata, slice_file, tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(testdata / TESTDATA_SERIES, folder)
    ds = pydicom.dcmread(slice_file)
    ds.add_new(0x00091010, "OB", b"\0" * 8)
    ds.save_as(folder / "big.dcm")
    b = bytearray((folder / "big.dcm").read_bytes())
    i = b.find(bytes.fromhex("09001010") + b"OB")
    b[i + 8:i + 12] = (0xFFFFFFF0).to_bytes(4, "little")  # a 4 GiB element in a 4 KB file
    (folder / "big.dcm").write_bytes(bytes(b))
    rc, text, _, _ = bounded("info", folder)
    assert rc == 0 and "big.dcm" in text and "claims 4294967280 bytes, past the end of the data" in text, text
    rc, text, peak, _ = bounded("convert", folder, tmp_path / "out.nii.gz")
    assert rc == 0 and (tmp_path / "out.nii.gz").exists(), text
    assert peak < 1500, f"{peak:.0f} MiB resident: the claimed length was allocated"


def nrrd_header(fields):
    return ("NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "\n").encode()


GEOMETRY = {"dimension": 3, "space": "left-posterior-superior", "space directions": "(1,0,0) (0,1,0) (0,0,1)",
            "space origin": "(0,0,0)"}


def gzip_of_zeros(gib):
    """A real gzip stream of `gib` GiB of zeros, about 1 MB per GiB (gzip members concatenated)."""
    member = gzip.compress(b"\0" * (1 << 24), 9)
    return member * (gib * 64)


def test_a_gzip_nrrd_claiming_12_gib_is_refused_by_the_ceiling(tmp_path):
    bomb = tmp_path / "bomb.nrrd"
    bomb.write_bytes(nrrd_header({"type": "uint8", "sizes": "2048 2048 3072", "encoding": "gzip", **GEOMETRY})
                     + gzip_of_zeros(12))
    rc, text, _, _ = bounded("info", bomb)
    assert rc == 1 and "bomb.nrrd" in text and "sizes [2048, 2048, 3072] need more voxels than the 1073741824" in text


def test_an_allocation_beyond_memory_is_out_of_memory_not_an_abort(tmp_path):
    """Within the ceiling (2^30 doubles, 8 GiB) but beyond the 8 GiB address space: refused, not aborted."""
    big = tmp_path / "big.nrrd"
    big.write_bytes(nrrd_header({"type": "double", "sizes": "1024 1024 1024", "encoding": "gzip", **GEOMETRY})
                    + gzip_of_zeros(8))
    rc, text, _, _ = bounded("info", big)
    assert rc == 1 and "cannot allocate 8589934592 bytes" in text and "big.nrrd" in text, text


def test_a_detached_nrrd_reads_only_the_bytes_its_header_describes(tmp_path):
    (tmp_path / "one.nhdr").write_bytes(nrrd_header({"type": "uint8", "sizes": "1 1 1", "encoding": "raw",
                                                     "data file": "big.raw", **GEOMETRY}))
    with open(tmp_path / "big.raw", "wb") as f:  # 3 GiB, sparse: no disk is used
        f.write(b"\x07")
        f.truncate(3 << 30)
    rc, text, peak, seconds = bounded("convert", tmp_path / "one.nhdr", tmp_path / "one.nii.gz")
    assert rc == 0, text
    assert peak < 1000 and seconds < 5, f"{peak:.0f} MiB, {seconds:.1f} s: the whole data file was read"
    # byte skip -1 (the voxels end the file) reads the last voxel, also without the rest
    (tmp_path / "last.nhdr").write_bytes(nrrd_header({"type": "uint8", "sizes": "1 1 1", "encoding": "raw",
                                                      "byte skip": -1, "data file": "big.raw", **GEOMETRY}))
    rc, text, peak, _ = bounded("convert", tmp_path / "last.nhdr", tmp_path / "last.nii.gz")
    assert rc == 0 and peak < 1000, text


def engine_create(lwi, options):
    engine = ctypes.c_void_p()
    lwi.lib.lwi_engine_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lwi.lib.lwi_engine_free.argtypes = [ctypes.c_void_p]
    status = lwi.lib.lwi_engine_create(options.encode(), ctypes.byref(engine))
    if status == 0:
        lwi.lib.lwi_engine_free(engine)
    return status, lwi.lib.lwi_last_error().decode()


def test_a_duplicate_key_in_engine_options_is_invalid_argument_naming_it(lwi):
    status, message = engine_create(lwi, '{"device": "cpu", "device": "cpu"}')
    assert status == 1 and 'duplicate key "device"' in message, message
    assert engine_create(lwi, '{"device": "cpu"}')[0] == 0
    status, message = engine_create(lwi, "[" * 100_000 + "]" * 100_000)
    assert status == 1 and "nested more than 64" in message, message


ARCH = {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}


def test_duplicate_keys_in_every_document_the_command_reads_are_refused(tmp_path):
    dup = lambda text: text[:-1] + ', "epochs": 1}'
    (tmp_path / "train.json").write_text(dup(json.dumps({"epochs": 2})))
    (tmp_path / "arch.json").write_text(json.dumps(ARCH))
    rc, text, _, _ = bounded("fine-tune", "--from-scratch", "--dataset", tmp_path / "dataset.json", "--arch-config",
                             tmp_path / "arch.json", "--config", tmp_path / "train.json", "--device", "cpu",
                             "--out", tmp_path / "m.safetensors")
    assert rc != 0 and 'duplicate key "epochs"' in text and "train.json" in text, text
    (tmp_path / "labels.json").write_text('{"0": "background", "1": "liver", "1": "spleen"}')
    rc, text, _, _ = bounded("import", "--from", tmp_path / "none.pt", "--arch-config", tmp_path / "arch.json",
                             "--labels", tmp_path / "labels.json", "--out", tmp_path / "m.safetensors")
    assert rc != 0 and 'duplicate key "1"' in text and "labels.json" in text, text


def test_dataset_json_with_a_key_twice_is_refused(tmp_path):
    rc, _, _, _ = bounded("phantom", "--out", tmp_path / "data", "--cases", 2, "--size", "24,24,16",
                          "--spacing", "8,8,8")
    assert rc == 0
    ds = tmp_path / "data" / "dataset.json"
    doc = json.loads(ds.read_text())
    ds.write_text(json.dumps(doc)[:-1] + ', "training": []}')
    (tmp_path / "arch.json").write_text(json.dumps(ARCH))
    rc, text, _, _ = bounded("fine-tune", "--from-scratch", "--dataset", ds, "--arch-config", tmp_path / "arch.json",
                             "--epochs", 1, "--device", "cpu", "--out", tmp_path / "m.safetensors")
    assert rc == 1 and 'duplicate key "training"' in text and "dataset.json" in text, text


@pytest.mark.parametrize("where", ["value", "key"])
def test_a_100_mb_string_in_an_architecture_config_is_not_echoed(tmp_path, where):
    huge = "x" * (100 << 20)
    arch = {**ARCH, "num_heads": huge} if where == "value" else {**ARCH, huge: 1}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    (tmp_path / "labels.json").write_text('{"0": "background", "1": "organ"}')
    rc, text, _, _ = bounded("import", "--from", tmp_path / "none.pt", "--arch-config", tmp_path / "arch.json",
                             "--labels", tmp_path / "labels.json", "--out", tmp_path / "m.safetensors")
    assert rc != 0 and len(text) < 4000, f"{len(text)} bytes of message"
    assert "xxxxxxxx…\" (104857600 bytes)" in text, text

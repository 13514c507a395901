"""Model files and `lwi import` as hosts meet them: through the C ABI (ctypes) and the `lwi` command."""
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from lwi_ctypes import ROOT, STATUS, cli_path

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    subprocess.run([sys.executable, str(HERE / "monai_unetr_reference.py"), "--checkpoints", str(d)], check=True)
    return d


def lwi_cli(*args):
    return subprocess.run([str(cli_path()), *map(str, args)], capture_output=True, text=True)


def import_(d, ckpt, out):
    return lwi_cli("import", "--from", d / ckpt, "--arch-config", d / "arch.json", "--labels", d / "labels.json",
                   "--spacing", "1.5,1.5,2.0", "--window", "-175,250", "--out", out)


def load_through_abi(lwi, path):
    """lwi_engine_create + lwi_model_load + lwi_model_info_json, as a C host calls them."""
    L = lwi.lib
    L.lwi_engine_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    L.lwi_model_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    L.lwi_model_info_json.argtypes = [ctypes.c_void_p]
    L.lwi_model_info_json.restype = ctypes.c_char_p
    L.lwi_model_free.argtypes = [ctypes.c_void_p]
    L.lwi_engine_free.argtypes = [ctypes.c_void_p]
    engine, model = ctypes.c_void_p(), ctypes.c_void_p()
    assert L.lwi_engine_create(b'{"device": "cpu", "threads": 2}', ctypes.byref(engine)) == 0
    try:
        status = L.lwi_model_load(engine, str(path).encode(), ctypes.byref(model))
        if status != 0:
            return STATUS[status], L.lwi_last_error().decode()
        info = json.loads(L.lwi_model_info_json(model))
        L.lwi_model_free(model)
        return "OK", info
    finally:
        L.lwi_engine_free(engine)


@pytest.mark.parametrize("ckpt", ["monai_layout.pt", "lwi_vms_layout.pt"])
def test_import_then_info_through_cli_and_abi(lwi, checkpoints, tmp_path, ckpt):
    out = tmp_path / "model.safetensors"
    r = import_(checkpoints, ckpt, out)
    assert r.returncode == 0, r.stderr
    info = json.loads(lwi_cli("info", out).stdout)
    assert info["arch"] == "unetr" and info["stage"] == "segmentation"
    assert info["labels"] == {"0": "background", "1": "spleen", "2": "liver"}
    assert info["preprocessing"]["spacing"] == [1.5, 1.5, 2.0]
    assert info["preprocessing"]["intensity_window"] == [-175.0, 250.0]
    assert ckpt in info["provenance"]["source"]
    assert info["order_classes"] == (6 if ckpt.startswith("lwi") else None)
    status, abi_info = load_through_abi(lwi, out)
    assert status == "OK", abi_info
    assert abi_info["parameters"] == info["parameters"] and abi_info["device"] == "cpu"


def test_unknown_checkpoint_keys_are_named(checkpoints, tmp_path):
    out = tmp_path / "m.safetensors"
    r = import_(checkpoints, "unknown_keys.pt", out)
    assert r.returncode == 1
    assert "unexpected tensors: decoder9.extra.weight" in r.stderr
    assert not out.exists()


def test_broken_model_files_through_abi_and_cli(lwi, checkpoints, tmp_path):
    good = tmp_path / "good.safetensors"
    assert import_(checkpoints, "monai_layout.pt", good).returncode == 0
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 3])
    misshapen = tmp_path / "misshapen.safetensors"
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["vit.norm.weight"] = tensors["vit.norm.weight"][:10].clone()
    save_file(tensors, str(misshapen), metadata=meta)
    for path, status, words in [(truncated, "FORMAT", "not a readable model file"),
                                (misshapen, "MODEL_INCOMPATIBLE", "vit.norm.weight is [10]")]:
        got, message = load_through_abi(lwi, path)
        assert got == status and words in message, message
        r = lwi_cli("info", path)
        assert r.returncode == 1 and words in r.stderr, r.stderr


def test_unknown_device_is_named(lwi):
    L = lwi.lib
    L.lwi_engine_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    engine = ctypes.c_void_p()
    status = L.lwi_engine_create(b'{"device": "cuda:9"}', ctypes.byref(engine))
    assert STATUS[status] == "DEVICE_UNAVAILABLE" and b"cuda:9" in L.lwi_last_error()
    assert engine.value is None


def bounded(*args):
    """The lwi command as a host runs it on a hostile file: 8 GiB of address space, a minute."""
    return subprocess.run(["bash", "-c", 'ulimit -v 8388608; exec timeout 60 "$@"', "lwi", str(cli_path()),
                           *map(str, args)], capture_output=True, text=True)


def test_hostile_model_files_are_refused_not_aborted(checkpoints, tmp_path):
    """Absurd metadata and NaN weights through `lwi info`: exit 1 naming the file and the field or tensor, never an
    abort (num_layers 10^9 used to abort; img_size 16384^3 and mlp_dim 10^12 reached libtorch's allocator)."""
    good = tmp_path / "good.safetensors"
    assert import_(checkpoints, "monai_layout.pt", good).returncode == 0
    with safe_open(str(good), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    doc = json.loads(meta["lwi"])
    for field, value, words in [("num_layers", 10**9, "num_layers must be in [4, 64], got 1000000000"),
                                ("img_size", [16384] * 3, "img_size [16384, 16384, 16384]"),
                                ("mlp_dim", 10**12, "mlp_dim must be in [1, 16384], got 1000000000000"),
                                ("num_heads", 2**62, "num_heads must be in [1, 64], got 4611686018427387904")]:
        bad = tmp_path / f"{field}.safetensors"
        save_file(tensors, str(bad), metadata={"lwi": json.dumps(dict(doc, config=dict(doc["config"], **{field: value})))})
        r = bounded("info", bad)
        assert r.returncode == 1 and words in r.stderr and bad.name in r.stderr, (r.returncode, r.stderr[-2000:])
    nan = tmp_path / "nan.safetensors"
    weights = dict(tensors)
    weights["vit.blocks.3.mlp.linear1.bias"] = weights["vit.blocks.3.mlp.linear1.bias"].clone()
    weights["vit.blocks.3.mlp.linear1.bias"][5] = float("nan")
    weights["vit.norm.weight"] = weights["vit.norm.weight"] * float("inf")
    save_file(weights, str(nan), metadata=meta)
    r = bounded("info", nan)
    assert r.returncode == 1 and "tensor vit.blocks.3.mlp.linear1.bias holds NaN or infinite values" in r.stderr, r.stderr
    # a spacing within bounds but far finer than the volume's: refused before resampling, not a libtorch failure
    import nibabel as nib
    import numpy as np
    fine = tmp_path / "fine.safetensors"
    save_file(tensors, str(fine), metadata={"lwi": json.dumps(dict(doc, preprocessing=dict(
        doc["preprocessing"], spacing=[0.01, 0.01, 0.01])))})
    image = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 18, 12), 100, np.int16), np.diag([4.0, 4.0, 4.0, 1.0])), image)
    out = tmp_path / "labels.nii.gz"
    r = bounded("segment", "--model", fine, image, "--out", out, "--device", "cpu")
    assert r.returncode == 1 and "spacing [0.01, 0.01, 0.01] mm gives a grid of" in r.stderr, r.stderr[-2000:]
    assert "libtorch" not in r.stderr and not out.exists()


def test_import_refuses_a_label_name_its_reader_could_not_read_back(checkpoints, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "background", "1": "x" * (100 << 20)}))
    out = tmp_path / "m.safetensors"
    r = lwi_cli("import", "--from", checkpoints / "monai_layout.pt", "--arch-config", checkpoints / "arch.json",
                "--labels", labels, "--out", out)
    assert r.returncode == 1 and "label 1" in r.stderr and "256 bytes" in r.stderr, r.stderr[:500]
    assert len(r.stderr) < 1000 and not out.exists()
    labels.write_text(json.dumps({"0": "background", "1": "x" * 256}))
    assert lwi_cli("import", "--from", checkpoints / "monai_layout.pt", "--arch-config", checkpoints / "arch.json",
                   "--labels", labels, "--out", out).returncode == 0
    assert json.loads(lwi_cli("info", out).stdout)["labels"]["1"] == "x" * 256

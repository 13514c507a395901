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

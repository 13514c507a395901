"""Hostile pickles as `lwi import` meets them (the `lwi` command, through liblwi.so), each run as a host would
be: under an 8 GiB address-space limit and a 60 s timeout. A checkpoint (`.pt`, nnU-Net's `.model`) or a plans
pickle that names any global outside its allow-list is refused, naming the global, wherever in the pickle it is
and whether or not its value is used; nesting, memo repeats and tensor views cannot make the reader overflow its
stack or allocate without bound (docs/formats.md). The files are written here with Python's pickle and torch.save
and never loaded: what they would run is only named."""
import json
import os
import pickle
import resource
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from lwi_ctypes import cli_path
from test_unetr_pp import REDUCED, nnunet_checkpoint, nnunet_plans, upstream_state_dict

HERE = Path(__file__).parent
PAYLOAD = "touch /tmp/lwi-ran-a-pickle"


class Call:
    """Pickles as `fn(*args)`, then BUILD with `state` when given: what a hostile file asks its loader to run."""

    def __init__(self, fn, *args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def limited():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def lwi(*args):
    """The `lwi` command under `ulimit -v 8 GiB` and `timeout 60`."""
    r = subprocess.run([str(cli_path()), *map(str, args)], capture_output=True, text=True, timeout=60,
                       preexec_fn=limited)
    assert r.returncode in (0, 1), f"exit {r.returncode} (a signal, or an abort): {r.stderr[-2000:]}"
    assert "panicked" not in r.stderr, r.stderr
    assert len(r.stderr) < 4000, f"a {len(r.stderr)}-byte message"
    return r


@pytest.fixture(scope="module")
def unetr(tmp_path_factory):
    """The tiny UNETR's checkpoint files (monai_unetr_reference.py) and its state dict."""
    d = tmp_path_factory.mktemp("unetr")
    subprocess.run([sys.executable, str(HERE / "monai_unetr_reference.py"), "--checkpoints", str(d)], check=True)
    return d, torch.load(d / "monai_layout.pt", weights_only=True)


def import_unetr(d, ckpt):
    out = ckpt.with_suffix(".safetensors")
    r = lwi("import", "--from", ckpt, "--arch-config", d / "arch.json", "--labels", d / "labels.json", "--out", out)
    assert (r.returncode == 0) == out.exists(), r.stderr
    return r


def module_state(sd):
    """A torch.nn.Module's pickled state: what a loader reads as that module's state dict."""
    return {"_parameters": OrderedDict(sd), "_buffers": OrderedDict(), "_modules": OrderedDict(), "training": False}


def hostile_checkpoints(sd):
    """(name, object torch.save writes, the global to be named): foreign globals nested inside allowed calls, and
    a foreign call whose result is BUILT with module state, at the top or under state_dict. torch.save writes
    protocol 2, which spells modules as Python 2 did (subprocess is `commands`; Python maps it back on load)."""
    run = Call(os.system, PAYLOAD)
    nnunet = {"epoch": 1000, "state_dict": sd, "plot_stuff": ([np.float64(0.5)], [0.6], [0.7], [0.8])}
    return [
        ("device.pt", {"state_dict": sd, "device": Call(torch.device, run)}, "posix.system"),
        ("dtype.model", {**nnunet, "best_stuff": (1, Call(np.dtype, run), 0.8)}, "posix.system"),
        ("module.pt", Call(os.system, PAYLOAD, state=module_state(sd)), "posix.system"),
        ("module_under_state_dict.model", {**nnunet, "state_dict": Call(os.system, PAYLOAD, state=module_state(sd))},
         "posix.system"),
        ("popen_in_a_list.pt", {"state_dict": sd, "log": [1, 2, Call(subprocess.Popen, ["sh"])]}, "commands.Popen"),
        ("legacy.pt", {"state_dict": sd, "device": Call(torch.device, run)}, "posix.system"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_a_checkpoint_naming_a_foreign_global_anywhere_is_refused(unetr, tmp_path, case):
    d, sd = unetr
    name, obj, culprit = hostile_checkpoints(sd)[case]
    ckpt = tmp_path / name
    torch.save(obj, ckpt, _use_new_zipfile_serialization=not name.startswith("legacy"))
    r = import_unetr(d, ckpt)
    assert r.returncode == 1 and f"names the Python global {culprit}" in r.stderr, r.stderr
    assert "checkpoint does not hold" in r.stderr and name in r.stderr, r.stderr


@pytest.mark.parametrize("zip_container", [True, False])
def test_the_checkpoints_torch_and_nnunet_write_still_import(unetr, tmp_path, zip_container):
    """What the allow-list lets through: a state dict beside a trainer's numbers, numpy scalars and arrays,
    tensors of every width, a device, a dtype and a size, as torch.save writes them (ZIP and legacy)."""
    d, sd = unetr
    ckpt = tmp_path / "bookkeeping.model"
    torch.save({"epoch": 7, "state_dict": sd, "best": np.float64(0.5), "curve": np.array([0.1, 0.2]),
                "step": np.int64(3), "device": torch.device("cpu"), "dtype": torch.float16, "size": torch.Size([2]),
                "grad_scale": torch.ones(2, dtype=torch.bfloat16), "mask": torch.zeros(2, dtype=torch.bool)}, ckpt,
               _use_new_zipfile_serialization=zip_container)
    r = import_unetr(d, ckpt)
    assert r.returncode == 0, r.stderr


def test_a_stride_0_view_beyond_the_file_is_refused_before_it_is_read(unetr, tmp_path):
    """4 bytes of storage viewed with stride 0 as 2.5e9 elements: 10 GB if materialised."""
    d, sd = unetr
    ckpt = tmp_path / "expanded.pt"
    torch.save({"state_dict": {**sd, "vit.norm.weight": torch.zeros(1).expand(2_500_000_000)}}, ckpt)
    r = import_unetr(d, ckpt)
    assert r.returncode == 1, r.stderr
    assert "vit.norm.weight" in r.stderr and "10000000000 bytes" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def unetr_pp(tmp_path_factory):
    d = tmp_path_factory.mktemp("unetr_pp")
    nnunet_checkpoint(upstream_state_dict(["synapse_reduced.weights.safetensors"]), d / "model_final_checkpoint.model")
    (d / "arch.json").write_text(json.dumps({**REDUCED, "out_channels": 3}))
    (d / "labels.json").write_text(json.dumps({"0": "background", "1": "a", "2": "b"}))
    return d


def import_with_plans(d, plans):
    out = plans.with_suffix(".safetensors")
    r = lwi("import", "--from", d / "model_final_checkpoint.model", "--arch-config", d / "arch.json",
            "--labels", d / "labels.json", "--plans", plans, "--out", out)
    assert (r.returncode == 0) == out.exists(), r.stderr
    return r


def plans():
    return nnunet_plans([2.0, 0.76, 0.76], [64, 128, 128])


@pytest.mark.parametrize("culprit,call", [
    ("posix.system", Call(os.system, PAYLOAD)),
    ("builtins.eval", Call(eval, "__import__('os').system('true')")),
    ("subprocess.Popen", Call(subprocess.Popen, ["sh", "-c", PAYLOAD])),
])
def test_plans_naming_a_foreign_global_are_refused(unetr_pp, tmp_path, culprit, call):
    """In a key lwi never reads: the global is refused all the same."""
    path = tmp_path / "plans.pkl"
    path.write_bytes(pickle.dumps({**plans(), "experiment": {"hook": call}}))
    r = import_with_plans(unetr_pp, path)
    assert r.returncode == 1 and f"names the Python global {culprit}" in r.stderr, r.stderr
    assert "plans.pkl" in r.stderr and "nnU-Net plans do not hold" in r.stderr, r.stderr


def test_plans_naming_a_global_by_inst_are_refused(unetr_pp, tmp_path):
    """Protocol 1's INST names the global on its own line (Python 3's pickler no longer writes it)."""
    path = tmp_path / "inst.pkl"
    call = b"(X" + len(PAYLOAD).to_bytes(4, "little") + PAYLOAD.encode() + b"iposix\nsystem\n"
    path.write_bytes(b"}(X\x04\x00\x00\x00hook" + call + b"u.")
    r = import_with_plans(unetr_pp, path)
    assert r.returncode == 1 and "names the Python global posix.system" in r.stderr, r.stderr


def test_plans_nested_100000_deep_are_refused(unetr_pp, tmp_path):
    """{"transpose_forward": [[[...]]]} 100,000 lists deep (written opcode by opcode: pickle.dumps would recurse)."""
    depth = 100_000
    body = b"\x8c\x11transpose_forward" + b"]" * depth + b"a" * (depth - 1)
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x04}" + body + b"s.")
    r = import_with_plans(unetr_pp, path)
    assert r.returncode == 1 and "deep.pkl" in r.stderr and "nest" in r.stderr, r.stderr


def test_plans_whose_memo_repeats_an_8_mb_object_2000_times_are_read_once(unetr_pp, tmp_path):
    """pickle.dumps memoises the bytes once and fetches them 2,000 times: Python holds one object, and so does
    lwi (16 GB if each fetch copied it)."""
    path = tmp_path / "memo.pkl"
    path.write_bytes(pickle.dumps({**plans(), "cache": [b"\0" * 8_000_000] * 2000}))
    r = import_with_plans(unetr_pp, path)
    assert r.returncode == 0, r.stderr

"""Data-parallel training launched as users launch it: `torchrun --no-python lwi fine-tune …` with torch's own
torchrun (its agent hosts the store), 2 Gloo ranks on this machine, against one `lwi fine-tune` with twice the
batch: the same weights, the same validation Dice, rank 0 alone writing, --json lines tagged with the rank."""
import json
import socket
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from lwi_ctypes import cli_path

ARCH = {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
# SGD: AdamW would turn the rounding-level differences of a batch of 2 against two of 1 into lr-sized ones
CONFIG = {"spacing": [8.0, 8.0, 8.0], "num_samples": 2, "optimizer": "sgd", "momentum": 0.9, "lr": 1e-2,
          "warmup_epochs": 0, "val_every": 1, "epochs": 2}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fine_tune(d, dataset, batch_size, launcher=()):
    config = d / "config.json"
    config.write_text(json.dumps({**CONFIG, "batch_size": batch_size}))
    (d / "arch.json").write_text(json.dumps(ARCH))
    cmd = [*launcher, str(cli_path()), "fine-tune", "--from-scratch", "--dataset", str(dataset), "--arch-config",
           "arch.json", "--config", "config.json", "--seed", "4", "--device", "cpu", "--threads", "1",
           "--out", "model.safetensors", "--json"]
    r = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_torchrun_launches_two_ranks_that_train_what_one_process_trains(tmp_path, report):
    r = subprocess.run([str(cli_path()), "phantom", "--out", tmp_path / "data", "--cases", "12", "--seed", "3",
                        "--size", "48,48,32", "--spacing", "6,6,8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dataset = tmp_path / "data" / "dataset.json"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    alone = fine_tune(one, dataset, 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", "--no-python"]
    events = fine_tune(two, dataset, 1, torchrun)

    ranks = {e.get("rank") for e in events if e["event"] == "progress"}
    assert ranks == {0, 1}, ranks
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    report(f"torchrun, 2 Gloo ranks x batch 1 vs 1 process x batch 2 (UNETR, 2 epochs of SGD): max |dw| = {worst:.2e}")
    assert worst <= 1e-5, worst

    def dice(evs):
        return [e["metric"] for e in evs if e["event"] == "progress" and e["stage"] == "validate"
                and e["metric"] is not None and e.get("rank", 0) == 0]

    assert len(dice(events)) == 2 and np.allclose(dice(events), dice(alone), atol=1e-5)
    assert sorted(p.name for p in two.iterdir()) == ["arch.json", "config.json", "model.best.safetensors",
                                                       "model.safetensors", "model.safetensors.ckpt"]

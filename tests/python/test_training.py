"""init-train and fine-tune on phantoms, through the lwi command and the C ABI: the loss falls, a fixed seed
gives identical weights, a run killed mid-way and resumed ends where an uninterrupted run ends, and a
cancelled run stops with its last checkpoint intact."""
import ctypes
import json
import signal
import subprocess

import pytest

from lwi_ctypes import STATUS, cli_path

ARCH = {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
CONFIG = {"spacing": [8.0, 8.0, 8.0], "num_samples": 2, "pretext": {"slabs": 2}, "warmup_epochs": 2, "lr": 1e-3,
          "val_every": 2}
PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p)


class LwiProgress(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("stage", ctypes.c_char_p), ("done", ctypes.c_uint64),
                ("total", ctypes.c_uint64), ("epoch", ctypes.c_int64), ("loss", ctypes.c_double),
                ("metric", ctypes.c_double), ("message", ctypes.c_char_p)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    r = subprocess.run([str(cli_path()), "phantom", "--out", d / "data", "--cases", "4", "--seed", "2", "--size", "48,48,32",
                        "--spacing", "6,6,8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (d / "arch.json").write_text(json.dumps(ARCH))
    (d / "config.json").write_text(json.dumps(CONFIG))
    return d


def init_train(d, out, epochs, *extra, popen=False):
    cmd = [str(cli_path()), "init-train", "--dataset", d / "data" / "dataset.json", "--arch-config", d / "arch.json",
           "--config", d / "config.json", "--epochs", str(epochs), "--seed", "3", "--device", "cpu", "--out", out,
           "--json", *extra]
    cmd = [str(c) for c in cmd]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True)


def epoch_losses(stdout):
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [e["loss"] for e in events if e.get("stage") == "epoch"]


def test_init_train_loss_falls_and_a_seed_fixes_the_weights(data, tmp_path, report):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ra = init_train(data, a, 8)
    assert ra.returncode == 0, ra.stderr
    losses = epoch_losses(ra.stdout)
    assert len(losses) == 8
    report(f"\ninit-train (tiny UNETR, 3 phantoms): epoch losses {[round(x, 3) for x in losses]}")
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    rb = init_train(data, b, 8)
    assert rb.returncode == 0, rb.stderr
    assert a.read_bytes() == b.read_bytes(), "same seed, same data, CPU: identical weights"
    info = json.loads(subprocess.run([str(cli_path()), "info", str(a)], capture_output=True, text=True).stdout)
    assert info["stage"] == "init" and info["order_classes"] == 2 and info["config"]["out_channels"] == 1


def test_a_killed_run_resumes_to_the_same_weights(data, tmp_path):
    whole, resumed = tmp_path / "whole.safetensors", tmp_path / "resumed.safetensors"
    assert init_train(data, whole, 8).returncode == 0
    p = init_train(data, resumed, 8, popen=True)
    for line in p.stdout:  # an epoch event follows its checkpoint: kill right after epoch 3, without warning
        if line.startswith("{") and json.loads(line).get("stage") == "epoch" and json.loads(line)["done"] == 3:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not resumed.exists(), "the run was killed before writing its model"
    ckpt = tmp_path / "resumed.safetensors.ckpt"
    assert ckpt.exists()
    r = init_train(data, resumed, 8, "--resume")
    assert r.returncode == 0, r.stderr
    epochs = [json.loads(l)["epoch"] for l in r.stdout.splitlines() if l.startswith("{") and json.loads(l).get("stage") == "epoch"]
    assert epochs[0] >= 3, f"resumed at epoch {epochs[0]}, before the last checkpoint"
    assert resumed.read_bytes() == whole.read_bytes(), "resumed run ends with the uninterrupted run's weights"


def test_fine_tune_through_the_c_abi_and_cancellation(lwi, data, tmp_path):
    init = tmp_path / "init.safetensors"
    assert init_train(data, init, 2).returncode == 0
    L = lwi.lib
    L.lwi_engine_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    L.lwi_fine_tune.argtypes = [ctypes.c_void_p, ctypes.c_char_p, PROGRESS_FN, ctypes.c_void_p]
    engine = ctypes.c_void_p()
    assert L.lwi_engine_create(b'{"device": "cpu"}', ctypes.byref(engine)) == 0
    out = tmp_path / "model.safetensors"
    config = dict(CONFIG, dataset=str(data / "data" / "dataset.json"), out=str(out), arch=ARCH, init=str(init), epochs=4,
                  seed=1)
    events = []

    def progress(user, p):
        e = ctypes.cast(p, ctypes.POINTER(LwiProgress)).contents
        events.append((e.stage.decode(), e.epoch, e.loss, e.metric))
        return 0

    status = L.lwi_fine_tune(engine, json.dumps(config).encode(), PROGRESS_FN(progress), None)
    assert STATUS[status] == "OK", L.lwi_last_error()
    assert out.exists() and (tmp_path / "model.best.safetensors").exists()
    metrics = [m for s, _, _, m in events if s == "epoch" and m == m]  # NaN when no validation ran
    assert len(metrics) == 2 and all(0.0 <= m <= 1.0 for m in metrics)
    info = json.loads(subprocess.run([str(cli_path()), "info", str(out)], capture_output=True, text=True).stdout)
    assert info["stage"] == "segmentation" and info["config"]["out_channels"] == 12

    # Cancel after the fifth training iteration: CANCELLED, no model file, the checkpoint loadable.
    out2 = tmp_path / "cancelled.safetensors"
    config.update(out=str(out2))
    seen = []

    def cancel(user, p):
        e = ctypes.cast(p, ctypes.POINTER(LwiProgress)).contents
        seen.append(e.stage)
        return 1 if seen.count(b"train") >= 5 else 0

    status = L.lwi_fine_tune(engine, json.dumps(config).encode(), PROGRESS_FN(cancel), None)
    assert STATUS[status] == "CANCELLED"
    assert seen.count(b"train") == 5, "stopped within one iteration"
    assert not out2.exists()
    ckpt = tmp_path / "cancelled.safetensors.ckpt"
    assert ckpt.exists(), "the epoch completed before the cancel left its checkpoint"
    config.update(resume=True)
    assert L.lwi_fine_tune(engine, json.dumps(config).encode(), PROGRESS_FN(), None) == 0, L.lwi_last_error()
    assert out2.exists()


def test_fine_tune_takes_the_architecture_of_its_init_model(lwi, data, tmp_path):
    """`lwi fine-tune --init I` without --arch-config trains I's architecture (not the default full-size UNETR); an
    architecture that disagrees is refused before any work, naming both; the C ABI's config alike."""
    init = tmp_path / "init.safetensors"
    assert init_train(data, init, 1).returncode == 0
    out = tmp_path / "model.safetensors"
    base = [str(cli_path()), "fine-tune", "--dataset", str(data / "data" / "dataset.json"), "--init", str(init),
            "--config", str(data / "config.json"), "--epochs", "1", "--device", "cpu"]
    r = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    info = json.loads(subprocess.run([str(cli_path()), "info", str(out)], capture_output=True, text=True).stdout)
    assert info["config"] == dict(info["config"], **ARCH, out_channels=12)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(dict(ARCH, feature_size=16)))
    refused = tmp_path / "refused.safetensors"
    r = subprocess.run([*base, "--arch-config", str(wrong), "--out", str(refused)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "differs from the architecture of init" in r.stderr, r.stderr
    assert '"feature_size":16' in r.stderr and '"feature_size":8' in r.stderr, r.stderr
    assert not refused.exists() and not (tmp_path / "lwi-cache").exists()
    # through the C ABI: no "arch" takes the init model's; one that agrees (out_channels aside) is accepted
    L = lwi.lib
    L.lwi_engine_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    L.lwi_fine_tune.argtypes = [ctypes.c_void_p, ctypes.c_char_p, PROGRESS_FN, ctypes.c_void_p]
    engine = ctypes.c_void_p()
    assert L.lwi_engine_create(b'{"device": "cpu"}', ctypes.byref(engine)) == 0
    for name, arch in [("abi", None), ("agreeing", dict(ARCH, out_channels=5))]:
        config = dict(CONFIG, dataset=str(data / "data" / "dataset.json"), out=str(tmp_path / f"{name}.safetensors"),
                      init=str(init), epochs=1)
        if arch:
            config["arch"] = arch
        status = L.lwi_fine_tune(engine, json.dumps(config).encode(), PROGRESS_FN(), None)
        assert STATUS[status] == "OK", L.lwi_last_error()
    config = dict(CONFIG, dataset=str(data / "data" / "dataset.json"), out=str(refused), init=str(init),
                  arch={"arch": "unetr_pp"})
    status = L.lwi_fine_tune(engine, json.dumps(config).encode(), PROGRESS_FN(), None)
    message = L.lwi_last_error().decode()
    assert STATUS[status] == "MODEL_INCOMPATIBLE" and '"arch":"unetr_pp"' in message and str(init) in message, message
    L.lwi_engine_free.argtypes = [ctypes.c_void_p]
    L.lwi_engine_free(engine)

"""`lwi segment --precision bf16` on the CPU (libtorch's CPU autocast, oneDNN's bfloat16 kernels) against fp32, on
TotalSegmentator's real CT with a tiny UNETR trained on that CT's organs: the labels agree on at least 99 % of the
voxels and every organ it finds keeps a Dice of at least 0.9 against the fp32 labels, a floor that a broken path
(casts that corrupt weights or activations, an accumulator in bfloat16) falls through, yet they are not fp32's
labels bit for bit (a network left in fp32 would give those). Where the
processor has neither AVX512-BF16 nor AMX-BF16, bf16 is refused naming them. No timing: `make bench` times it."""
import json
import subprocess

import nibabel as nib
import numpy as np
import pytest

from lwi_ctypes import cli_path

TS = "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"
# TotalSegmentator label -> ours: liver, spleen, kidneys (right and left), stomach, aorta.
ORGANS = {"liver": (5,), "spleen": (1,), "kidney": (2, 3), "stomach": (6,), "aorta": (52,)}
ARCH = {"img_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
CONFIG = {"spacing": [6.0, 6.0, 6.0], "num_samples": 4, "warmup_epochs": 1, "lr": 2e-3, "iterations_per_epoch": 10,
          "val_every": 1000, "checkpoint_every": 1000, "window": [-175, 250]}


def cpu_flags():
    """The flags the kernel lists for this processor (an oracle independent of lwi's CPUID reading)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {w for line in text.splitlines() if line.startswith("flags") for w in line.split()[2:]}


HAS_BF16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this processor has neither AVX512-BF16 nor AMX-BF16: bf16 on "
                                "the CPU is refused here (test_bf16_is_refused_without_the_instructions)")


def lwi(*args):
    r = subprocess.run([str(cli_path()), *map(str, args)], capture_output=True, text=True)
    return r


@pytest.fixture(scope="module")
def trained(testdata, tmp_path_factory):
    """A tiny UNETR fine-tuned from scratch on the real CT and its organ labels (40 iterations at 6 mm): trained,
    so that its labels are not the near-ties of random weights."""
    d = tmp_path_factory.mktemp("bf16")
    seg = nib.load(str(testdata / TS / "example_seg_fast_force_split.nii.gz"))
    ts = np.asarray(seg.dataobj)
    labels = np.zeros(ts.shape, np.uint8)
    for i, ids in enumerate(ORGANS.values(), 1):
        labels[np.isin(ts, ids)] = i
    nib.save(nib.Nifti1Image(labels, seg.affine), str(d / "labels.nii.gz"))
    names = {"0": "background", **{str(i): n for i, n in enumerate(ORGANS, 1)}}
    (d / "dataset.json").write_text(json.dumps({"labels": names, "training": [
        {"image": str(testdata / TS / "example_ct.nii.gz"), "label": "labels.nii.gz"}]}))
    (d / "arch.json").write_text(json.dumps(ARCH))
    (d / "config.json").write_text(json.dumps(CONFIG))
    r = lwi("fine-tune", "--from-scratch", "--dataset", d / "dataset.json", "--arch-config", d / "arch.json",
            "--config", d / "config.json", "--epochs", 4, "--seed", 4, "--device", "cpu", "--out",
            d / "model.safetensors")
    assert r.returncode == 0, r.stderr[-4000:]
    return d


def segment(model, image, out, precision):
    r = lwi("segment", "--model", model, image, "--out", out, "--device", "cpu", "--precision", precision)
    assert r.returncode == 0, r.stderr[-4000:]
    manifest = json.loads(out.with_name(out.name + ".json").read_text())
    return np.asarray(nib.load(str(out)).dataobj), manifest


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@needs_bf16
def test_bf16_labels_agree_with_fp32_on_a_trained_model(trained, testdata, tmp_path, report):
    ct = testdata / TS / "example_ct.nii.gz"
    fp32, m32 = segment(trained / "model.safetensors", ct, tmp_path / "fp32.nii.gz", "fp32")
    bf16, m16 = segment(trained / "model.safetensors", ct, tmp_path / "bf16.nii.gz", "bf16")
    assert (m32["precision"], m16["precision"]) == ("fp32", "bf16")
    auto, mauto = segment(trained / "model.safetensors", ct, tmp_path / "auto.nii.gz", "auto")
    assert mauto["precision"] == "bf16" and np.array_equal(auto, bf16)
    agree = (fp32 == bf16).mean()
    # Organs the model finds (>= 1000 voxels): a handful of voxels would make the Dice a coin toss.
    organs = {name: dice(fp32 == i, bf16 == i) for i, name in enumerate(ORGANS, 1) if (fp32 == i).sum() >= 1000}
    report(f"bf16 vs fp32 on the real CT, trained tiny UNETR: voxels agree {agree:.4%}; Dice per organ "
           + ", ".join(f"{k} {v:.4f}" for k, v in organs.items()))
    # The trained model finds the liver at least (else agreeing on background alone would pass).
    assert "liver" in organs, organs
    assert 0.99 <= agree < 1, "bf16 gave exactly fp32's labels: did the network run in bf16?"
    assert min(organs.values()) >= 0.9, organs


def test_fp16_on_the_cpu_is_refused_with_why(tiny_model, testdata, tmp_path):
    r = lwi("segment", "--model", tiny_model, testdata / TS / "example_ct.nii.gz", "--out", tmp_path / "x.nii.gz",
            "--device", "cpu", "--precision", "fp16")
    assert r.returncode != 0 and "CUDA only" in r.stderr and "bf16" in r.stderr, r.stderr
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.skipif(HAS_BF16, reason="this processor has AVX512-BF16 or AMX-BF16: bf16 runs here")
def test_bf16_is_refused_without_the_instructions(tiny_model, testdata, tmp_path):
    r = lwi("segment", "--model", tiny_model, testdata / TS / "example_ct.nii.gz", "--out", tmp_path / "x.nii.gz",
            "--device", "cpu", "--precision", "bf16")
    assert r.returncode != 0 and "AVX512-BF16 or AMX-BF16" in r.stderr, r.stderr
    auto = lwi("segment", "--model", tiny_model, testdata / TS / "example_ct.nii.gz", "--out", tmp_path / "a.nii.gz",
               "--device", "cpu", "--precision", "auto")
    assert auto.returncode == 0, auto.stderr
    assert json.loads((tmp_path / "a.nii.gz.json").read_text())["precision"] == "fp32"

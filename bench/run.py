"""lwi benchmarks against the reference implementations, in the same run, interleaved.

Prints medians and the lwi/reference ratio (lower is better). No benchmark is a test and no test
asserts a time. Usage: .venv/bin/python bench/run.py [--reps N] [--only NAME] [--toy]
Record results with the command and machine in docs/performance.md. A failing program's command and the end of its
stderr are raised, never only its exit status. --toy: tiny models, small volumes, one pass (the GPU check's dry run on
the CPU, scripts/gpu-check.sh --dry-run: it proves programs, imports and files; its figures mean nothing).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Benchmark programs (plugin/examples); on a GPU machine, the carried bundle's bin/.
BIN = Path(os.environ.get("LWI_BENCH_BIN", ROOT / "target" / "release" / "examples"))
sys.path.insert(0, str(ROOT / "tests" / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from lwi_ctypes import Lwi, cli_path, plugin_path  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(name, lwi_fn, ref_fn, ref_name, reps):
    """Runs the two interleaved `reps` times after one warm-up each; prints medians and ratio."""
    lwi_fn(), ref_fn()
    a, b = [], []
    for _ in range(reps):
        a.append(timed(lwi_fn))
        b.append(timed(ref_fn))
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{name:<44} lwi {ma * 1e3:9.1f} ms   {ref_name:<10} {mb * 1e3:9.1f} ms   ratio {ma / mb:5.2f}", flush=True)
    return ma / mb


def bench_volume_read(lwi, work, reps):
    import nrrd  # pynrrd: only here, so the GPU machine (no pynrrd) runs the other benchmarks
    ct = work / "ct"
    if not (ct / "imagesTr" / "phantom_000.nii.gz").exists():
        subprocess.run([str(cli_path()), "phantom", "--out", str(ct), "--cases", "1", "--size", "512,512,200",
                        "--spacing", "0.8,0.8,2.5"], check=True)
    nii = ct / "imagesTr" / "phantom_000.nii.gz"
    nrrd_path = work / "ct.nrrd"
    lwi.convert(nii, nrrd_path)
    print(f"volume read: CT-sized phantom 512x512x200 int16 ({nii.stat().st_size / 1e6:.0f} MB .nii.gz)")
    compare("  .nii.gz -> voxels in memory", lambda: lwi.read(nii),
            lambda: np.asanyarray(nib.load(str(nii)).dataobj), "nibabel", reps)
    compare("  .nrrd (gzip) -> voxels in memory", lambda: lwi.read(nrrd_path),
            lambda: nrrd.read(str(nrrd_path), index_order="F"), "pynrrd", reps)


def bench_cold_start(work, reps):
    """A fresh process: dlopen liblwi.so (and libtorch) and read a small volume, vs a fresh Python
    importing nibabel and reading the same file."""
    small = work / "small"
    if not small.exists():
        subprocess.run([str(cli_path()), "phantom", "--out", str(small), "--cases", "1", "--size", "64,64,48"], check=True)
    f = small / "imagesTr" / "phantom_000.nii.gz"
    py = sys.executable
    lwi_cmd = [py, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'tests' / 'python')!r}); "
               f"from lwi_ctypes import Lwi; from pathlib import Path; Lwi(Path({str(plugin_path())!r})).read({str(f)!r})"]
    ref_cmd = [py, "-c", f"import nibabel, numpy; numpy.asanyarray(nibabel.load({str(f)!r}).dataobj)"]
    print("cold start: new process, load library, read a 64x64x48 volume")
    compare("  python+ctypes+liblwi.so vs python+nibabel", lambda: subprocess.run(lwi_cmd, check=True),
            lambda: subprocess.run(ref_cmd, check=True), "nibabel", reps)


def checked(cmd, env=None, timeout=None):
    """Runs `cmd`, returns its stdout; raises with the command and the end of its stderr when it fails or outlasts
    `timeout` seconds (an ImportError in a reference program must show, not only its exit status)."""
    try:
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        raise RuntimeError(f"{' '.join(map(str, cmd))} did not finish in {timeout} s; its stderr ends:\n"
                           f"{err[-2000:]}") from None
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit status {r.returncode}); its stderr ends:\n"
                           f"{r.stderr[-2000:]}")
    return r.stdout


def last_json(cmd, env=None, timeout=None):
    """The JSON line a benchmark program prints last."""
    out = checked(cmd, env, timeout).strip()
    try:
        return json.loads(out.splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"{' '.join(map(str, cmd))} printed no JSON line; its stdout ends:\n{out[-2000:]}") from None


def alternate(name, lwi_cmd, ref_cmd, ref_name, rounds):
    """Runs two benchmark programs (each printing a JSON line with `median_ms`) in turn `rounds` times,
    each in its own process; prints the medians of their medians and the ratio."""
    a, b = [], []
    for _ in range(rounds):
        a.append(last_json(lwi_cmd)["median_ms"])
        b.append(last_json(ref_cmd)["median_ms"])
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{name:<44} lwi {ma:9.1f} ms   {ref_name:<10} {mb:9.1f} ms   ratio {ma / mb:5.2f}", flush=True)


def bench_unetr_forward(device, batch, precision, rounds=3, reps=3):
    """Full-size UNETR (92.8 M parameters, 96^3) forward, no grad: lwi vs MONAI 1.6.1, each side in
    its own process, alternated `rounds` times; each process reports the median of `reps` passes."""
    tail = [device, str(batch), precision, str(reps)]
    alternate(f"  UNETR forward {device} batch {batch} {precision}", [str(BIN / "unetr_forward"), *tail],
              [sys.executable, str(ROOT / "bench" / "monai_unetr_forward.py"), *tail], "MONAI", rounds)


def bench_unetr_pp_forward(device, batch, precision, rounds=3, reps=3):
    """The Synapse UNETR++ (42.95 M parameters, 64x128x128) forward, no grad: lwi vs the PyTorch UNETR++ of
    bench/pytorch_unetr_pp.py (proved equal to the upstream code on its fixtures), each in its own process."""
    tail = [device, str(batch), precision, str(reps)]
    alternate(f"  UNETR++ forward {device} batch {batch} {precision}", [str(BIN / "unetr_pp_forward"), *tail],
              [sys.executable, str(ROOT / "bench" / "pytorch_unetr_pp.py"), *tail], "PyTorch", rounds)


TINY = dict(size=64, feature=16, hidden=192, mlp=768, heads=4)
FULL = dict(size=96, feature=16, hidden=768, mlp=3072, heads=12)
# --toy: a UNETR of seconds on the CPU, 32^3; the programs' other sizes from the environment (scripts/gpu-check.sh
# --dry-run exports the same): UNETR++ patches, the sliding-window volume, the flat all-reduce's floats.
TOY = dict(size=32, feature=8, hidden=48, mlp=96, heads=4)
TOY_ENV = {"LWI_BENCH_PATCH": "16,32,32", "LWI_BENCH_VOLUME": "48,48,40", "LWI_BENCH_FLAT": "100000"}
TOY_CT = "48,48,24"


def shape_args(shape):
    return [str(shape[k]) for k in ("size", "feature", "hidden", "mlp", "heads")]


def bench_train_step(device, batch, precision, shape, rounds=3, reps=3):
    """A segmentation training step (forward, DiceCE, backward, AdamW): lwi
    (plugin/examples/train_step.rs) vs a PyTorch loop with MONAI's UNETR and DiceCELoss
    (bench/monai_train_step.py), each in its own process, alternated `rounds` times."""
    tail = [device, str(batch), precision, str(reps), *shape_args(shape)]
    alternate(f"  train step {device} batch {batch} {shape['size']}^3 {precision}", [str(BIN / "train_step"), *tail],
              [sys.executable, str(ROOT / "bench" / "monai_train_step.py"), *tail],
              "MONAI+AMP" if precision != "fp32" else "MONAI", rounds)


def bench_unetr_pp_train_step(device, batch, precision, feature, depths, rounds=3, reps=3):
    """A UNETR++ training step as the unetr_pp recipe runs it (deep-supervision Dice + CE, backward, clipping, SGD
    with Nesterov momentum) on 64x128x128 patches: lwi (plugin/examples/unetr_pp_train_step.rs) vs the PyTorch
    UNETR++ with nnunet 1.7.1's loss and torch.optim.SGD (bench/pytorch_unetr_pp_train_step.py)."""
    tail = [device, str(batch), precision, str(reps), str(feature), *map(str, depths)]
    ref = "PyTorch+AMP" if precision != "fp32" else "PyTorch"
    # lwi's fp16 step has no loss scaler (the recipe trains bf16, or fp32 before Ampere); PyTorch's has a GradScaler
    scaler = " (lwi without loss scaler)" if precision == "fp16" else ""
    alternate(f"  UNETR++ train step {device} batch {batch} feature {feature} {precision}{scaler}",
              [str(BIN / "unetr_pp_train_step"), *tail],
              [sys.executable, str(ROOT / "bench" / "pytorch_unetr_pp_train_step.py"), *tail], ref, rounds)


def bench_train_cache(work, cases=100):
    """Fine-tuning a tiny UNETR++ (unetr_pp recipe) on `cases` phantoms, twice, the cache fresh before the first:
    the peak RSS of each run and how long preparation takes without and with the cache's entries (from the
    process's start, libtorch's loading included, to its last "preprocess" event)."""
    data = work / f"cache-phantoms-{cases}"
    if not (data / "dataset.json").exists():
        subprocess.run([str(cli_path()), "phantom", "--out", str(data), "--cases", str(cases), "--seed", "4",
                        "--size", "128,128,64"], check=True, capture_output=True)
    arch = work / "cache-arch.json"
    arch.write_text(json.dumps({"arch": "unetr_pp", "img_size": [32, 64, 64], "feature_size": 2, "hidden_size": 32,
                                "num_heads": 2, "dims": [4, 8, 16, 32], "depths": [1, 1, 1, 1],
                                "proj_size": [16, 16, 16, 8]}))
    cache = work / "cache-entries"
    shutil.rmtree(cache, ignore_errors=True)
    config = work / "cache-config.json"
    config.write_text(json.dumps({"epochs": 1, "iterations_per_epoch": 2, "val_every": 100, "cache_dir": str(cache)}))
    cmd = [str(cli_path()), "fine-tune", "--from-scratch", "--dataset", str(data / "dataset.json"), "--arch-config",
           str(arch), "--config", str(config), "--device", "cpu", "--json", "--out", str(work / "cache-model.safetensors")]
    results = []
    for run in ("first (prepares)", "second (cache)"):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first, last = 0.0, None
        for line in p.stdout:
            if line.startswith("{") and json.loads(line).get("stage") == "preprocess":
                last = time.perf_counter() - t0
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(p.stderr.read()[-2000:])
        results.append((last - first, usage.ru_maxrss / 1024))
        print(f"  {run:<17} preparation {last - first:7.2f} s, peak RSS {usage.ru_maxrss / 1024:7.0f} MB", flush=True)
    print(f"  {cases} cases of 128x128x64: second preparation {results[0][0] / results[1][0]:.1f}x faster "
          f"(target >= 10); peak RSS {max(r[1] for r in results):.0f} MB (target <= 3072)", flush=True)


def bench_sliding_window(device, reps=3, shape=FULL):
    """Sliding-window inference alone on a 273x273x250 volume already on the GPU (full UNETR, roi 96^3,
    overlap 0.5, gaussian): lwi (plugin/examples/sliding_window.rs) in several settings vs MONAI's
    sliding_window_inference (bench/monai_sliding_window.py), every setting once per round, each process
    reporting the median of `reps` passes after two warm-ups. Ratios are against MONAI with window batch 4
    in the same precision (bf16 for both autocast precisions). On the CPU (--toy) the fp32 settings only."""
    def run(cmd, env):
        return last_json(cmd, env={**os.environ, **env})

    def lwi(batch, precision, fused):
        return ([str(BIN / "sliding_window"), device, str(batch), precision, str(reps), *shape_args(shape)],
                {"LWI_BENCH_FUSED": "1" if fused else "0"})

    def monai(batch, precision, *flags):
        return [sys.executable, str(ROOT / "bench" / "monai_sliding_window.py"), device, str(batch), precision,
                str(reps), *shape_args(shape), *flags], {}

    settings = [
        ("MONAI batch 4 fp32", monai(4, "fp32")),
        ("lwi   batch 4 fp32", lwi(4, "fp32", True)),
        ("MONAI batch 4 bf16", monai(4, "bf16")),
        ("lwi   batch 4 bf16, ATen norms", lwi(4, "bf16", False)),
        ("lwi   batch 4 bf16", lwi(4, "bf16", True)),
        ("MONAI batch 16 bf16 channels-last", monai(16, "bf16", "--channels-last")),
        ("lwi   batch 16 bf16", lwi(16, "bf16", True)),
        ("lwi   batch 16 fp16", lwi(16, "fp16", True)),
    ]
    if device == "cpu":
        settings = [(name, cmd) for name, cmd in settings if name.endswith("batch 4 fp32")]
    results = {name: run(*cmd) for name, cmd in settings}
    for name, r in results.items():
        ref = results["MONAI batch 4 fp32" if "fp32" in name else "MONAI batch 4 bf16"]["median_ms"]
        extra = "" if name.startswith("MONAI") else f"   fused kernels {r['fused_calls']}"
        if r.get("fused_failure"):
            extra += f" (fused failed: {r['fused_failure']})"
        print(f"  sliding window {name:<36} {r['median_ms']:8.1f} ms   ratio {r['median_ms'] / ref:5.2f}{extra}",
              flush=True)


def run_measured(cmd):
    """Wall time (s) and peak resident memory (MB) of one child process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - t
    out, err = p.stdout.read(), p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024, out


def segment_model(work, shape, spacing):
    """Seeded MONAI UNETR weights, and the same weights imported as an lwi model (`spacing` mm, HU -175..250)."""
    import torch
    from monai.networks.nets import UNETR
    d = work / f"segment-model-{shape['size']}-{shape['hidden']}-{spacing.replace(',', 'x')}"
    if not (d / "model.safetensors").exists():
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(in_channels=1, out_channels=14, img_size=[shape["size"]] * 3, feature_size=shape["feature"],
                   hidden_size=shape["hidden"], mlp_dim=shape["mlp"], num_heads=shape["heads"], proj_type="perceptron")
        torch.manual_seed(3)
        torch.save(UNETR(**cfg).state_dict(), d / "unetr.pt")
        (d / "arch.json").write_text(json.dumps(cfg))
        (d / "labels.json").write_text(json.dumps({str(i): f"class {i}" for i in range(14)}))
        checked([cli_path(), "import", "--from", d / "unetr.pt", "--arch-config", d / "arch.json", "--labels",
                 d / "labels.json", "--spacing", spacing, "--window=-175,250", "--out", d / "model.safetensors"])
    return d


def interleaved(lwi_cmd, ref_cmd, reps):
    """Both commands `reps` times, alternating: (median s, peak MB) of lwi's, (median s, peak MB, last stdout) of
    the reference's."""
    a, b, ra, rb = [], [], [], []
    for _ in range(reps):
        t, rss, _ = run_measured(lwi_cmd)
        a.append(t), ra.append(rss)
        t, rss, out = run_measured(ref_cmd)
        b.append(t), rb.append(rss)
    return (statistics.median(a), max(ra)), (statistics.median(b), max(rb), out)


def phantom_ct(work, size="512,512,200"):
    """A 512x512x200 CT phantom (or `size`) at 0.8x0.8x2.5 mm, made once (scripts/gpu-check.sh makes the same)."""
    ct = work / "ct" / "imagesTr" / "phantom_000.nii.gz"
    if not ct.exists():
        checked([cli_path(), "phantom", "--out", work / "ct", "--cases", "1", "--size", size, "--spacing",
                 "0.8,0.8,2.5"])
    return ct


def bench_real_ct():
    """TotalSegmentator's example CT (122x101x112 at 3 mm) from the test data."""
    real = os.environ.get("LWI_BENCH_REAL_CT")  # set where there is no network (the GPU bundle carries it)
    if real is None:
        data = Path(subprocess.run([str(ROOT / "scripts" / "fetch-test-data")], check=True, capture_output=True,
                                   text=True).stdout.strip())
        real = data / "totalsegmentator" / "totalsegmentator-2.18.0" / "tests" / "reference_files" / "example_ct.nii.gz"
    return real


def bench_segment(work, device, shape, spacing, sw_batch, precision, reps, ct_size="512,512,200"):
    """File in -> label file out: `lwi segment` vs MONAI's pipeline (bench/monai_segment.py), same weights and
    model spacing, overlap 0.5, gaussian, each a fresh process (library and model load included), interleaved."""
    d = segment_model(work, shape, spacing)
    ct, real = phantom_ct(work, ct_size), bench_real_ct()
    for name, image in (("real CT 122x101x112 @3 mm", real), (f"CT phantom {ct_size.replace(',', 'x')} @0.8x0.8x2.5", ct)):
        lwi_cmd = [str(cli_path()), "segment", "--model", str(d / "model.safetensors"), str(image), "--out",
                   str(work / "lwi_labels.nii.gz"), "--device", device, "--sw-batch", str(sw_batch), "--precision",
                   precision, "--overwrite", "--no-manifest"]
        ref_cmd = [sys.executable, str(ROOT / "bench" / "monai_segment.py"), str(image), str(d / "unetr.pt"),
                   str(d / "arch.json"), spacing, "-175,250", str(work / "monai_labels.nii.gz"), device,
                   str(sw_batch), precision]
        (ma, rss_a), (mb, rss_b, out) = interleaved(lwi_cmd, ref_cmd, reps)
        same = (np.asarray(nib.load(str(work / "lwi_labels.nii.gz")).dataobj)
                == np.asarray(nib.load(str(work / "monai_labels.nii.gz")).dataobj)).mean()
        print(f"  segment {device} {name:<36} lwi {ma:6.2f} s {rss_a:6.0f} MB   MONAI {mb:6.2f} s {rss_b:6.0f} MB"
              f"   ratio {ma / mb:5.2f}   labels agree {same:.2%}   (MONAI stages {out.strip()})", flush=True)


def cpu_bf16():
    """The processor's bfloat16 instructions as `lwi info` reports them; empty where it has none."""
    cpu = json.loads(checked([cli_path(), "info"]))["cpu"]
    return [name for name, has in sorted(cpu.items()) if has]


def bench_cpu_bf16(work, shape, spacing, reps, rounds):
    """bf16 on the CPU: the full UNETR on the real CT, file in -> label file out, `lwi segment --precision bf16`
    against MONAI's pipeline in fp32 and under torch.autocast("cpu", torch.bfloat16) (bench/monai_segment.py), with
    lwi's fp32 beside; the four each a fresh process, interleaved `reps` times (median). Then the window forward
    alone (96^3, batch 1, median of 2 passes after 2 warm-ups): lwi bf16 against MONAI fp32 and MONAI bf16, alternated
    `rounds` times."""
    has = cpu_bf16()
    if not has:
        print("  skipped: this processor has neither AVX512-BF16 nor AMX-BF16 (lwi info), so bf16 on the CPU is "
              "refused", flush=True)
        return
    print(f"  the processor offers {', '.join(has)}", flush=True)
    d, real = segment_model(work, shape, spacing), bench_real_ct()

    def lwi(precision):
        return [str(cli_path()), "segment", "--model", str(d / "model.safetensors"), str(real), "--out",
                str(work / f"lwi_{precision}.nii.gz"), "--device", "cpu", "--precision", precision, "--overwrite",
                "--no-manifest"]

    def monai(precision):
        return [sys.executable, str(ROOT / "bench" / "monai_segment.py"), str(real), str(d / "unetr.pt"),
                str(d / "arch.json"), spacing, "-175,250", str(work / f"monai_{precision}.nii.gz"), "cpu", "1", precision]

    cmds = {"lwi bf16": lwi("bf16"), "lwi fp32": lwi("fp32"), "MONAI fp32": monai("fp32"), "MONAI bf16": monai("bf16")}
    times = {name: [] for name in cmds}
    for _ in range(reps):
        for name, cmd in cmds.items():
            times[name].append(run_measured(cmd)[0])
    t = {name: statistics.median(v) for name, v in times.items()}

    def labels(name):
        return np.asarray(nib.load(str(work / f"{name.replace(' ', '_').lower()}.nii.gz")).dataobj)

    print("  end to end, real CT 122x101x112 @3 mm: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)
    print(f"  lwi bf16 / MONAI fp32 {t['lwi bf16'] / t['MONAI fp32']:5.2f} (target <= 0.4)   "
          f"lwi bf16 / MONAI bf16 {t['lwi bf16'] / t['MONAI bf16']:5.2f} (target <= 0.8)   "
          f"lwi bf16 / lwi fp32 {t['lwi bf16'] / t['lwi fp32']:5.2f}   MONAI bf16 / MONAI fp32 "
          f"{t['MONAI bf16'] / t['MONAI fp32']:5.2f}", flush=True)
    print(f"  labels agree: lwi bf16 vs lwi fp32 {(labels('lwi bf16') == labels('lwi fp32')).mean():.2%}, "
          f"lwi bf16 vs MONAI bf16 {(labels('lwi bf16') == labels('MONAI bf16')).mean():.2%}, "
          f"lwi fp32 vs MONAI fp32 {(labels('lwi fp32') == labels('MONAI fp32')).mean():.2%}", flush=True)
    args = ["cpu", "1"], shape_args(shape)
    fwd = {"lwi bf16": [str(BIN / "unetr_forward"), *args[0], "bf16", "2", *args[1]],
           "MONAI fp32": [sys.executable, str(ROOT / "bench" / "monai_unetr_forward.py"), *args[0], "fp32", "2", *args[1]],
           "MONAI bf16": [sys.executable, str(ROOT / "bench" / "monai_unetr_forward.py"), *args[0], "bf16", "2", *args[1]]}
    ms = {name: [] for name in fwd}
    for _ in range(rounds):
        for name, cmd in fwd.items():
            ms[name].append(last_json(cmd)["median_ms"])
    m = {name: statistics.median(v) for name, v in ms.items()}
    print(f"  window forward {shape['size']}^3: " + ", ".join(f"{k} {v:.0f} ms" for k, v in m.items())
          + f"   lwi bf16 / MONAI fp32 {m['lwi bf16'] / m['MONAI fp32']:5.2f}   lwi bf16 / MONAI bf16 "
          f"{m['lwi bf16'] / m['MONAI bf16']:5.2f}", flush=True)


def unetr_pp_segment_model(work, arch):
    """Seeded UNETR++ weights (bench/pytorch_unetr_pp.py), and the same weights imported as an lwi model at
    1.5 x 1.5 x 2 mm with a CT normalisation."""
    import torch
    from pytorch_unetr_pp import UnetrPP
    d = work / f"segment-unetr-pp-{arch['feature_size']}-{'-'.join(map(str, arch['depths'] + arch['img_size']))}"
    if not (d / "model.safetensors").exists():
        d.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(3)
        net = UnetrPP(out_channels=arch["out_channels"], img_size=arch["img_size"], feature_size=arch["feature_size"],
                      depths=arch["depths"])
        torch.save(net.state_dict(), d / "unetr_pp.pt")
        (d / "arch.json").write_text(json.dumps(arch))
        (d / "labels.json").write_text(json.dumps({str(i): f"class {i}" for i in range(arch["out_channels"])}))
        checked([cli_path(), "import", "--from", d / "unetr_pp.pt", "--arch-config", d / "arch.json", "--labels",
                 d / "labels.json", "--spacing", PP_SPACING, "--ct-norm", PP_NORM, "--out", d / "model.safetensors"])
    return d


PP_SPACING, PP_NORM = "1.5,1.5,2", "-958,327,82.9,136.9"
PP_REDUCED = {"arch": "unetr_pp", "in_channels": 1, "out_channels": 14, "img_size": [64, 128, 128], "feature_size": 4,
              "hidden_size": 64, "num_heads": 4, "depths": [1, 1, 2, 2], "dims": [8, 16, 32, 64]}
PP_SYNAPSE = {"arch": "unetr_pp", "in_channels": 1, "out_channels": 14, "img_size": [64, 128, 128],
              "feature_size": 16, "hidden_size": 256, "num_heads": 4, "depths": [3, 3, 3, 3],
              "dims": [32, 64, 128, 256]}
PP_TOY = dict(PP_REDUCED, img_size=[16, 32, 32])


def bench_unetr_pp_cpu_bf16(work, arch, reps):
    """The reduced UNETR++ on the real CT without mirroring (as the segment-unetr-pp benchmark): `lwi segment
    --precision bf16` against nnU-Net v1's inference in fp32 and under torch.autocast("cpu", torch.bfloat16)
    (bench/nnunet_segment.py), each a fresh process, interleaved `reps` times (median)."""
    if not cpu_bf16():
        print("  skipped: this processor has neither AVX512-BF16 nor AMX-BF16", flush=True)
        return
    d, real = unetr_pp_segment_model(work, arch), bench_real_ct()
    cmds = {"lwi bf16": [str(cli_path()), "segment", "--model", str(d / "model.safetensors"), str(real), "--out",
                         str(work / "pp_lwi_bf16.nii.gz"), "--device", "cpu", "--precision", "bf16", "--no-mirror",
                         "--overwrite", "--no-manifest"]}
    for precision in ("fp32", "bf16"):
        cmds[f"nnU-Net {precision}"] = [sys.executable, str(ROOT / "bench" / "nnunet_segment.py"), str(real),
                                        str(d / "unetr_pp.pt"), str(d / "arch.json"), PP_SPACING, PP_NORM,
                                        str(work / f"pp_nnunet_{precision}.nii.gz"), "cpu", "0", precision]
    times = {name: [] for name in cmds}
    for _ in range(reps):
        for name, cmd in cmds.items():
            times[name].append(run_measured(cmd)[0])
    t = {name: statistics.median(v) for name, v in times.items()}
    same = (np.asarray(nib.load(str(work / "pp_lwi_bf16.nii.gz")).dataobj)
            == np.asarray(nib.load(str(work / "pp_nnunet_bf16.nii.gz")).dataobj)).mean()
    print("  UNETR++ end to end, real CT: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
          + f"   lwi bf16 / nnU-Net fp32 {t['lwi bf16'] / t['nnU-Net fp32']:5.2f}   lwi bf16 / nnU-Net bf16 "
          f"{t['lwi bf16'] / t['nnU-Net bf16']:5.2f}   labels agree with nnU-Net bf16 {same:.2%}", flush=True)


def bench_segment_unetr_pp(work, device, image, name, arch, mirror, reps):
    """File in -> label file out with a UNETR++ model: `lwi segment` vs nnU-Net v1's own inference
    (bench/nnunet_segment.py), same weights, each a fresh process, interleaved; the labels compared."""
    d = unetr_pp_segment_model(work, arch)
    lwi_out, ref_out = work / "lwi_pp_labels.nii.gz", work / "nnunet_pp_labels.nii.gz"
    lwi_cmd = [str(cli_path()), "segment", "--model", str(d / "model.safetensors"), str(image), "--out", str(lwi_out),
               "--device", device, "--overwrite", "--no-manifest"] + ([] if mirror else ["--no-mirror"])
    ref_cmd = [sys.executable, str(ROOT / "bench" / "nnunet_segment.py"), str(image), str(d / "unetr_pp.pt"),
               str(d / "arch.json"), PP_SPACING, PP_NORM, str(ref_out), device, "1" if mirror else "0"]
    (ma, rss_a), (mb, rss_b, out) = interleaved(lwi_cmd, ref_cmd, reps)
    same = (np.asarray(nib.load(str(lwi_out)).dataobj) == np.asarray(nib.load(str(ref_out)).dataobj)).mean()
    print(f"  segment {device} {name:<36} lwi {ma:6.2f} s {rss_a:6.0f} MB   nnU-Net {mb:6.2f} s {rss_b:6.0f} MB"
          f"   ratio {ma / mb:5.2f}   labels agree {same:.4%}   (nnU-Net stages {out.strip().splitlines()[-1]})",
          flush=True)


def bench_dist_step(device, batch, shape, ranks, backend, rounds=2, reps=3, job_s=180):
    """Data-parallel UNETR training steps under torchrun, `ranks` ranks: lwi (plugin/examples/dist_step.rs: the
    gradients averaged after the backward pass in 25 MiB buckets) vs PyTorch's DistributedDataParallel on MONAI's
    UNETR (all-reduce overlapped with the backward pass), each job in turn `rounds` times; plus one all-reduce of
    92.8 M floats (371 MB, the full UNETR's gradient) on each side. Fails unless lwi ran a `backend` group of
    `ranks` (one rank included: torchrun's world of one is a group of one there). Each torchrun job has `job_s`
    seconds: a rank that waits on a lost peer must not hang the run."""
    tail = [device, str(batch), "fp32" if device == "cpu" else "bf16", str(reps), *shape_args(shape)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = dict(os.environ, LWI_DIST_BACKEND=backend, GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks))))
    run = lambda cmd: last_json(cmd, env, job_s)
    a, b = [], []
    for _ in range(rounds):
        a.append(run([*torchrun, "--no-python", str(BIN / "dist_step"), *tail]))
        b.append(run([*torchrun, str(ROOT / "bench" / "torch_dist_step.py"), *tail]))
    if (a[0]["backend"], a[0]["world"]) != (backend, ranks):
        raise RuntimeError(f"lwi's dist_step ran with backend {a[0]['backend']} and world {a[0]['world']}, "
                           f"not a {backend} group of {ranks}")
    print(f"  lwi: a {a[0]['backend']} group of {a[0]['world']} rank(s); PyTorch: {b[0]['backend']}, world "
          f"{b[0]['world']}", flush=True)
    m = lambda runs, key: statistics.median(r[key] for r in runs)
    for key, what in [("step_ms", "step, gradients not averaged"), ("synced_ms", "step, gradients averaged"),
                      ("flat_ms", f"all-reduce of {a[0]['flat_floats'] / 1e6:.1f} M floats")]:
        ref = "DDP" if key == "synced_ms" else "PyTorch"
        print(f"  {ranks} ranks {backend} {device}: {what:<31} lwi {m(a, key):9.1f} ms   {ref:<8} {m(b, key):9.1f} ms"
              f"   ratio {m(a, key) / m(b, key):5.2f}", flush=True)
    over_a, over_b = m(a, "synced_ms") - m(a, "step_ms"), m(b, "synced_ms") - m(b, "step_ms")
    print(f"  per-step cost of averaging {a[0]['gradient_floats'] / 1e6:.1f} M gradient floats: lwi {over_a:.1f} ms "
          f"(the averaging alone {m(a, 'averaging_ms'):.1f} ms), DDP {over_b:.1f} ms", flush=True)


BENCHES = {"dist-step", "volume-read", "cold-start", "unetr-forward", "unetr-pp-forward", "train-step", "sliding-window", "segment",
           "segment-unetr-pp", "unetr-pp-train-step", "train-cache", "python-api", "cpu-bf16"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=sorted(BENCHES))
    ap.add_argument("--device", default="cpu", help="for unetr-forward: cpu or cuda")
    ap.add_argument("--batch", type=int, default=1, help="for unetr-forward")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="for unetr-forward (autocast on cuda)")
    ap.add_argument("--ranks", type=int, default=2, help="for dist-step")
    ap.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="for dist-step (default: gloo on cpu, nccl on cuda)")
    ap.add_argument("--rounds", type=int, default=None, help="for dist-step (default 2)")
    ap.add_argument("--toy", action="store_true", help="tiny sizes, one pass: the plumbing only (see above)")
    args = ap.parse_args()
    toy, gpu = args.toy, args.device != "cpu"
    if toy:
        for k, v in TOY_ENV.items():
            os.environ.setdefault(k, v)
    once = 1 if toy else None  # rounds (and passes) when the figures mean nothing
    lwi = Lwi(plugin_path())
    work = Path(os.environ.get("LWI_BENCH_DIR", ROOT / "target" / "bench"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"lwi {lwi.lib.lwi_version_json().decode()}")
    if args.only in (None, "volume-read"):
        bench_volume_read(lwi, work, args.reps)
    if args.only in (None, "cold-start"):
        bench_cold_start(work, args.reps)
    if args.only in (None, "unetr-forward"):
        print("UNETR forward: full size, 96^3, random weights, no grad")
        bench_unetr_forward(args.device, args.batch, args.precision)
    if args.only in (None, "unetr-pp-forward"):
        print("UNETR++ forward: the Synapse model, 64x128x128, random weights, no grad")
        bench_unetr_pp_forward(args.device, args.batch, args.precision)
    if args.only in (None, "train-step"):
        shape = TOY if toy else FULL if gpu else TINY
        print(f"training step (DiceCE + AdamW), UNETR {shape}")
        bench_train_step(args.device, args.batch if gpu else 2, args.precision, shape,
                         rounds=once or (1 if gpu else 3), reps=once or 3)
    if args.only in (None, "unetr-pp-train-step"):
        # 2 CPU cores: the reduced UNETR++ in fp32; a GPU: the Synapse model, lwi's bf16 against PyTorch's AMP.
        feature, depths = (16, (3, 3, 3, 3)) if gpu and not toy else (4, (1, 1, 2, 2))
        precision = "bf16" if gpu else args.precision
        print(f"UNETR++ training step (nnU-Net's deep-supervision loss, SGD), feature {feature}, depths {depths}")
        bench_unetr_pp_train_step(args.device, 2, precision, feature, depths, rounds=once or (1 if gpu else 3),
                                  reps=once or 3)
        if gpu:
            bench_unetr_pp_train_step(args.device, 2, "fp16", feature, depths, rounds=1, reps=once or 3)
    if args.only in (None, "train-cache") and not gpu and not toy:
        print("preprocessed cache: fine-tuning UNETR++ (unetr_pp recipe) on 100 phantoms, first and second run")
        bench_train_cache(work)
    if args.only in (None, "dist-step"):
        shape = TOY if toy else FULL if gpu else TINY
        backend = args.backend or ("nccl" if gpu else "gloo")
        print(f"data-parallel training step (DiceCE + AdamW), UNETR {shape}, batch 2 per rank")
        bench_dist_step(args.device, 2, shape, args.ranks, backend, rounds=once or args.rounds or 2, reps=once or 3,
                        job_s=60 if toy else 180)
    if args.only in (None, "sliding-window") and (gpu or toy):
        # 125 full-size windows: minutes per pass on 2 CPU cores, so a GPU benchmark only (or a toy's plumbing).
        print("sliding-window inference alone, full UNETR, 273x273x250 on the device, overlap 0.5, gaussian")
        bench_sliding_window(args.device, reps=once or 3, shape=TOY if toy else FULL)
    if args.only in (None, "segment"):
        # On 2 CPU cores a smaller UNETR at 3 mm keeps the run to minutes; the GPU runs the full one at 1.5x1.5x2 mm.
        shape, spacing = (TOY, "6,6,6") if toy else (FULL, "1.5,1.5,2") if gpu else (dict(TINY, size=96), "3,3,3")
        print(f"end-to-end segmentation, file in -> label file out, UNETR {shape} at {spacing} mm, overlap 0.5, peak RSS")
        bench_segment(work, args.device, shape, spacing, args.batch, args.precision, once or max(1, args.reps // 2),
                      TOY_CT if toy else "512,512,200")
    if args.only in (None, "cpu-bf16") and not gpu:
        shape = TOY if toy else FULL
        print(f"bf16 on the CPU (autocast, oneDNN): UNETR {shape} at 3 mm on the real CT, overlap 0.5, gaussian")
        bench_cpu_bf16(work, shape, "3,3,3", once or 3, once or 3)
        print("bf16 on the CPU: the reduced UNETR++ on the real CT, no mirroring, against nnU-Net v1's inference")
        bench_unetr_pp_cpu_bf16(work, PP_TOY if toy else PP_REDUCED, once or 3)
    if args.only in (None, "python-api") and args.device == "cpu" and not toy:
        shape, spacing = dict(TINY, size=96), "3,3,3"
        print(f"Python API (import lwi; Model.segment) on the real CT, UNETR {shape} at {spacing} mm, peak RSS")
        d = segment_model(work, shape, spacing)
        subprocess.run([sys.executable, str(ROOT / "bench" / "python_api.py"), str(d / "model.safetensors"),
                        str(bench_real_ct()), str(work), "--reps", str(args.reps)], check=True)
    if args.only in (None, "segment-unetr-pp"):
        # The CPU: the reduced UNETR++ on the real CT (3 mm, so resampled to 1.5x1.5x2 mm) without mirroring; the
        # GPU: the Synapse UNETR++ with mirroring on the 512x512x200 phantom.
        real = bench_real_ct()
        if not gpu:
            print("end-to-end UNETR++ segmentation (nnU-Net v1 pipeline), reduced model, no mirroring, peak RSS")
            bench_segment_unetr_pp(work, "cpu", real, "real CT 122x101x112 @3 mm", PP_TOY if toy else PP_REDUCED,
                                   False, once or max(1, args.reps // 2))
        else:
            print("end-to-end UNETR++ segmentation (nnU-Net v1 pipeline), Synapse model, 8 mirrorings, peak RSS")
            bench_segment_unetr_pp(work, args.device, phantom_ct(work), "CT phantom 512x512x200 @0.8x0.8x2.5",
                                   PP_SYNAPSE, True, 1)


if __name__ == "__main__":
    main()

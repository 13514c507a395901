"""lwi benchmarks against the reference implementations, in the same run, interleaved.

Prints medians and the lwi/reference ratio (lower is better). No benchmark is a test and no test
asserts a time. Usage: .venv/bin/python bench/run.py [--reps N] [--only NAME]
Record results with the command and machine in docs/performance.md.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

import nibabel as nib  # noqa: E402
import nrrd  # noqa: E402
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


def bench_unetr_forward(device, batch, precision, rounds=3, reps=3):
    """Full-size UNETR (92.8 M parameters, 96^3) forward, no grad: lwi vs MONAI 1.6.1, each side in
    its own process, alternated `rounds` times; each process reports the median of `reps` passes."""
    lwi_cmd = [str(ROOT / "target" / "release" / "examples" / "unetr_forward"), device, str(batch), precision, str(reps)]
    ref_cmd = [sys.executable, str(ROOT / "bench" / "monai_unetr_forward.py"), device, str(batch), precision, str(reps)]
    run = lambda cmd: json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    a, b = [], []
    for _ in range(rounds):
        a.append(run(lwi_cmd)["median_ms"])
        b.append(run(ref_cmd)["median_ms"])
    ma, mb = statistics.median(a), statistics.median(b)
    name = f"  UNETR forward {device} batch {batch} {precision}"
    print(f"{name:<44} lwi {ma:9.1f} ms   {'MONAI':<10} {mb:9.1f} ms   ratio {ma / mb:5.2f}", flush=True)


BENCHES = {"volume-read", "cold-start", "unetr-forward"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=sorted(BENCHES))
    ap.add_argument("--device", default="cpu", help="for unetr-forward: cpu or cuda")
    ap.add_argument("--batch", type=int, default=1, help="for unetr-forward")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="for unetr-forward (autocast on cuda)")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()

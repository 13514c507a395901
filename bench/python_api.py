"""The Python API's costs (docs/python.md), each against what it wraps, in one run:

- `import lwi` cold start (a fresh interpreter: the package and liblwi.so with libtorch), against `import torch`;
- a fresh process segmenting a real CT file through the API (`lwi.Model(...).segment(path).write(out)`) against
  `lwi segment` on the same file and model, interleaved, with each process's peak RSS;
- in one process, `Model.segment` of the CT already in memory as a numpy array against `Model.segment_files` of the
  same file (the engine's own file path, lwi_segment_file), interleaved.

Usage: .venv/bin/python bench/python_api.py MODEL CT WORK [--reps N]  (bench/run.py --only python-api calls it)."""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from lwi_ctypes import cli_path, plugin_path  # noqa: E402


def child(cmd, env):
    """(wall s, peak RSS MB) of one child process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed: {p.stderr.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


def alternate(a_cmd, b_cmd, env, reps):
    a, b = [], []
    child(a_cmd, env), child(b_cmd, env)  # warm the page cache
    for _ in range(reps):
        a.append(child(a_cmd, env))
        b.append(child(b_cmd, env))
    med = lambda xs: (statistics.median(x[0] for x in xs), max(x[1] for x in xs))  # noqa: E731
    return med(a), med(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ct")
    ap.add_argument("work", type=Path)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), LWI_PLUGIN=str(plugin_path()))
    py = sys.executable

    (lwi_s, lwi_mb), (torch_s, torch_mb) = alternate([py, "-c", "import lwi; lwi.build_info()"],
                                                     [py, "-c", "import torch; torch.ones(1)"], env, a.reps)
    print(f"  import lwi (+ build_info) {lwi_s * 1e3:8.0f} ms {lwi_mb:5.0f} MB   import torch {torch_s * 1e3:8.0f} ms "
          f"{torch_mb:5.0f} MB   ratio {lwi_s / torch_s:5.2f}", flush=True)

    api_out, cli_out = a.work / "api_labels.nii.gz", a.work / "cli_labels.nii.gz"
    api = [py, "-c", f"import lwi; lwi.Model({a.model!r}, device='cpu').segment({a.ct!r}, progress=False)"
                     f".write({str(api_out)!r})"]
    cli = [str(cli_path()), "segment", "--model", a.model, a.ct, "--out", str(cli_out), "--device", "cpu",
           "--overwrite", "--no-manifest"]
    (api_s, api_mb), (cli_s, cli_mb) = alternate(api, cli, env, a.reps)
    print(f"  new process, file -> labels file: Python API {api_s:6.2f} s {api_mb:5.0f} MB   lwi segment {cli_s:6.2f} s "
          f"{cli_mb:5.0f} MB   ratio {api_s / cli_s:5.2f}", flush=True)

    os.environ["LWI_PLUGIN"] = str(plugin_path())
    sys.path.insert(0, str(ROOT / "python"))
    import lwi
    import numpy as np

    model = lwi.Model(a.model, device="cpu")
    v = lwi.read(a.ct)
    in_memory = lambda: model.segment(v.array, affine=v.affine, space="RAS", progress=False)  # noqa: E731
    from_file = lambda: model.segment_files([a.ct], a.work / "file_labels.nii.gz", overwrite=True,  # noqa: E731
                                            manifest=False, progress=False)
    in_memory(), from_file()
    t_mem, t_file = [], []
    for _ in range(a.reps):
        t = time.perf_counter()
        labels = in_memory()
        t_mem.append(time.perf_counter() - t)
        t = time.perf_counter()
        from_file()
        t_file.append(time.perf_counter() - t)
    same = np.array_equal(labels.array, lwi.read(a.work / "file_labels.nii.gz").array)
    m, f = statistics.median(t_mem), statistics.median(t_file)
    print(f"  one process: Model.segment(array) {m:6.2f} s   segment_files (read + segment + write) {f:6.2f} s   "
          f"ratio {m / f:5.2f}   labels equal {same}", flush=True)


if __name__ == "__main__":
    main()

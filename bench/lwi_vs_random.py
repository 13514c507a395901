"""Evidence that the method works (a study, not a test): a paired comparison of fine-tuning from the learned
initialization (init-train on the same training cases) against fine-tuning from random initialization, in
low-data regimes, for either architecture. For each seed, one pool of phantoms (8 training, 4 held-out cases);
for each training-set size n (2, 4, 8 by default) the first n training cases; init-train on them, then two
fine-tunes with the same seed, configuration and budget — one from the init-train model, one from scratch — and
both scored on the same held-out cases. Reported: per n, the mean held-out Dice (8 organs) of each arm and the
mean paired difference (lwi − random) with its 95 % confidence interval (Student's t over the seeds).

Usage: .venv/bin/python bench/lwi_vs_random.py [--arch unetr|unetr_pp] [--seeds 0,1,2,3,4] [--train-cases 2,4,8]
                                               [--init-epochs N] [--ft-epochs N] [--full]
--full: the full-size model and the method's patch (a GPU run, hours: its own device call; `scripts/gpu-check.sh
study` is a smoke run of a few epochs that measures the time per epoch to size it). Each init-train and fine-tune
prints its time per epoch, and the end an estimate of the study at the recipe's epochs. Record the table and the
command in docs/results.md, whatever it shows. Imports nothing beyond the standard library (scipy only for the
confidence interval of two seeds or more), so that it runs where only torch and the GPU bundle are installed.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LWI = os.environ.get("LWI_CLI", str(ROOT / "target" / "release" / "lwi"))
ORGANS = {1: "spleen", 2: "kidney R", 3: "kidney L", 4: "gallbladder", 6: "liver", 7: "stomach", 8: "aorta", 11: "pancreas"}
POOL_TRAIN, POOL_TEST = 8, 4

# Tiny configurations sized so that one study (5 seeds x 3 sizes) runs in about an hour on 2 CPU cores.
TINY = {
    "unetr": dict(
        arch={"img_size": [32, 32, 32], "feature_size": 16, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4},
        init={"spacing": [6.0, 6.0, 6.0], "num_samples": 4, "lr": 1e-3, "warmup_epochs": 2, "pretext": {"slabs": 2},
              "iterations_per_epoch": 8},
        fine={"spacing": [6.0, 6.0, 6.0], "num_samples": 4, "lr": 1e-3, "warmup_epochs": 2, "val_every": 10000,
              "iterations_per_epoch": 8},
        init_epochs=8, ft_epochs=20),
    "unetr_pp": dict(
        arch={"arch": "unetr_pp", "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 64, "num_heads": 4,
              "dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "proj_size": [32, 32, 32, 16]},
        init={"iterations_per_epoch": 8, "pretext": {"slabs": 2}, "spacing": [6.0, 6.0, 6.0]},
        fine={"iterations_per_epoch": 8, "val_every": 10000, "spacing": [6.0, 6.0, 6.0]},
        init_epochs=8, ft_epochs=20),
}
# The method's models and patches (GPU): UNETR 96^3 at 1.5 x 1.5 x 2 mm; the Synapse UNETR++ at 64 x 128 x 128.
FULL = {
    "unetr": dict(arch={"img_size": [96, 96, 96]}, init={"pretext": {"slabs": 6}, "iterations_per_epoch": 50},
                  fine={"val_every": 10000, "iterations_per_epoch": 50}, init_epochs=40, ft_epochs=100),
    "unetr_pp": dict(arch={"arch": "unetr_pp"}, init={"iterations_per_epoch": 50},
                     fine={"val_every": 10000, "iterations_per_epoch": 50}, init_epochs=40, ft_epochs=100),
}


def run(*args):
    r = subprocess.run([LWI, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"lwi {args[0]} failed: {r.stderr[-2000:]}")


EPOCH_TIMES = {"init-train": [], "fine-tune": []}


def train_timed(command, *args):
    """`lwi COMMAND ARGS --json`; prints and records the seconds of each epoch (from the first training event to
    the epoch's end, then from epoch to epoch: the preparation before the first step is left out)."""
    start, ends = None, []
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a full pipe would stall lwi
        with subprocess.Popen([LWI, command, *map(str, args), "--json"], stdout=subprocess.PIPE, stderr=err,
                              text=True) as p:
            for line in p.stdout:
                stage = json.loads(line).get("stage") if line.startswith("{") else None
                if stage == "train" and start is None:
                    start = time.perf_counter()
                elif stage == "epoch":
                    ends.append(time.perf_counter())
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"lwi {command} failed: {err.read()[-2000:]}")
    epochs = [b - a for a, b in zip([start, *ends], ends)] if start is not None else []
    EPOCH_TIMES[command].extend(epochs)
    print(f"  {command}: {len(epochs)} epochs, seconds each: {', '.join(f'{t:.1f}' for t in epochs)}", flush=True)


def held_out_dice(model, data, cases, work, tag, device):
    """Mean Dice over the organs and the held-out cases, as `lwi evaluate` scores them."""
    seg, ref = work / f"seg-{tag}", work / "ref"
    seg.mkdir(exist_ok=True)
    ref.mkdir(exist_ok=True)
    for e in cases:
        run("segment", "--model", model, data / e["image"], "--out", seg, "--device", device, "--no-manifest",
            "--overwrite", "--no-mirror")
        (ref / Path(e["image"]).name).write_bytes((data / e["label"]).read_bytes())
    run("evaluate", "--pred", seg, "--ref", ref, "--labels", ",".join(map(str, ORGANS)), "--json", work / f"{tag}.json")
    per_organ = json.loads((work / f"{tag}.json").read_text())["mean"]
    return statistics.mean(v["dice"] or 0.0 for v in per_organ.values())


def one_pair(arch, recipe, seed, n, pool, work, init_epochs, ft_epochs, device):
    """Init-train on n cases, then both arms; returns (lwi Dice, random Dice)."""
    doc = json.loads((pool / "dataset.json").read_text())
    cases = doc["training"] + doc.get("validation", [])
    train, test = cases[:n], cases[POOL_TRAIN:POOL_TRAIN + POOL_TEST]
    work.mkdir(parents=True, exist_ok=True)
    data = dict(doc, training=train, validation=test, numTraining=n)
    (pool / f"dataset-{n}.json").write_text(json.dumps(data))
    for name, cfg in (("arch", arch), ("init", recipe["init"]), ("fine", recipe["fine"])):
        (work / f"{name}.json").write_text(json.dumps(cfg))
    common = ["--dataset", pool / f"dataset-{n}.json", "--arch-config", work / "arch.json", "--seed", seed,
              "--device", device]
    train_timed("init-train", *common, "--config", work / "init.json", "--epochs", init_epochs, "--out",
                work / "init.safetensors")
    for tag, start in (("lwi", ["--init", work / "init.safetensors"]), ("random", ["--from-scratch"])):
        train_timed("fine-tune", *common, "--config", work / "fine.json", "--epochs", ft_epochs, *start,
            "--out", work / f"{tag}.safetensors")
    return tuple(held_out_dice(work / f"{tag}.safetensors", pool, test, work, tag, device) for tag in ("lwi", "random"))


def confidence_interval(diffs):
    """Mean and 95 % Student-t interval of paired differences."""
    m = statistics.mean(diffs)
    if len(diffs) < 2:
        return m, float("nan"), float("nan")
    from scipy import stats  # only here: the GPU machine's Python has no scipy

    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return m, m - half, m + half


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="unetr", choices=sorted(TINY))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--train-cases", default="2,4,8")
    ap.add_argument("--init-epochs", type=int)
    ap.add_argument("--ft-epochs", type=int)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iterations", type=int, help="per epoch, instead of the recipe's (a run of the plumbing only)")
    a = ap.parse_args()
    recipe = (FULL if a.full else TINY)[a.arch]
    if a.iterations:
        recipe = dict(recipe, init=dict(recipe["init"], iterations_per_epoch=a.iterations),
                      fine=dict(recipe["fine"], iterations_per_epoch=a.iterations))
    init_epochs, ft_epochs = a.init_epochs or recipe["init_epochs"], a.ft_epochs or recipe["ft_epochs"]
    sizes, seeds = [int(v) for v in a.train_cases.split(",")], [int(v) for v in a.seeds.split(",")]
    base = Path(os.environ.get("LWI_BENCH_DIR", ROOT / "target" / "bench")) / f"study-{a.arch}{'-full' if a.full else ''}"
    size = "128,128,96" if a.full else "64,64,48"
    spacing = "1.5,1.5,2" if a.full else "6,6,8"
    results = {n: [] for n in sizes}
    t0 = time.time()
    for seed in seeds:
        pool = base / f"pool-{seed}"
        if not (pool / "dataset.json").exists():
            run("phantom", "--out", pool, "--cases", POOL_TRAIN + POOL_TEST, "--seed", 100 + seed, "--size", size,
                "--spacing", spacing)
        for n in sizes:
            pair = one_pair(recipe["arch"], recipe, seed, n, pool, base / f"seed-{seed}-n{n}", init_epochs,
                            ft_epochs, a.device)
            results[n].append(pair)
            print(f"seed {seed} n {n}: held-out Dice lwi {pair[0]:.4f} random {pair[1]:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    print(f"\n{a.arch}{' (full)' if a.full else ''}: init-train {init_epochs} epochs, fine-tune {ft_epochs} epochs, "
          f"seeds {a.seeds}, {POOL_TEST} held-out cases per seed, {time.time() - t0:.0f} s")
    print("| training cases | lwi init | random init | paired difference (95 % CI) |")
    print("|---|---|---|---|")
    for n in sizes:
        lwi, rnd = [p[0] for p in results[n]], [p[1] for p in results[n]]
        m, lo, hi = confidence_interval([x - y for x, y in results[n]])
        print(f"| {n} | {statistics.mean(lwi):.3f} | {statistics.mean(rnd):.3f} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    print_estimate((FULL if a.full else TINY)[a.arch], recipe)


def print_estimate(full, ran):
    """The median epoch of each command (the first, with cuDNN's search, left out where there are more) and the
    training time of the default study with recipe `full` (5 seeds x 3 training-set sizes, each one init-train and
    two fine-tunes), epochs scaled from the iterations `ran` had to the recipe's."""
    def per_epoch(times, stage):
        t = statistics.median(times[1:] if len(times) > 1 else times) if times else float("nan")
        return t * full[stage]["iterations_per_epoch"] / ran[stage]["iterations_per_epoch"]

    init, fine = per_epoch(EPOCH_TIMES["init-train"], "init"), per_epoch(EPOCH_TIMES["fine-tune"], "fine")
    total = 5 * 3 * (full["init_epochs"] * init + 2 * full["ft_epochs"] * fine)
    print(f"seconds per epoch of {full['fine']['iterations_per_epoch']} iterations: init-train {init:.1f}, fine-tune "
          f"{fine:.1f}; the default study (seeds 0-4, 2,4,8 training cases, {full['init_epochs']} + 2 x "
          f"{full['ft_epochs']} epochs): about {total / 3600:.1f} h of training")


if __name__ == "__main__":
    main()

"""Evidence that the method works (a benchmark, not a test): on phantoms, a tiny UNETR fine-tuned from its
learned initialization (init-train) vs the same fine-tuning from random initialization, same fine-tuning
budget, several seeds, scored on held-out cases. Prints mean ± sd Dice per organ.

Usage: .venv/bin/python bench/lwi_vs_random.py [--seeds 0,1,2] [--init-epochs 15] [--ft-epochs 50]
Record the table and the command in docs/results.md, whatever it shows.
"""
import argparse
import json
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LWI = str(ROOT / "target" / "release" / "lwi")
CFG = ROOT / "scripts" / "demo"
ORGANS = {1: "spleen", 2: "kidney R", 3: "kidney L", 4: "gallbladder", 6: "liver", 7: "stomach", 8: "aorta", 11: "pancreas"}


def run(*args):
    subprocess.run([LWI, *map(str, args)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dice_of(model, data, work, tag):
    ds = json.loads((data / "dataset.json").read_text())
    seg, ref = work / f"seg-{tag}", work / "ref"
    seg.mkdir(exist_ok=True)
    ref.mkdir(exist_ok=True)
    for e in ds["validation"]:
        run("segment", "--model", model, data / e["image"], "--out", seg, "--device", "cpu", "--no-manifest", "--overwrite")
        (ref / Path(e["image"]).name).write_bytes((data / e["label"]).read_bytes())
    run("evaluate", "--pred", seg, "--ref", ref, "--labels", ",".join(map(str, ORGANS)), "--json", work / f"{tag}.json")
    return {int(k): v["dice"] for k, v in json.loads((work / f"{tag}.json").read_text())["mean"].items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--init-epochs", type=int, default=15)
    ap.add_argument("--ft-epochs", type=int, default=50)
    ap.add_argument("--cases", type=int, default=10)
    a = ap.parse_args()
    results = {"lwi": [], "random": []}
    for seed in map(int, a.seeds.split(",")):
        work = ROOT / "target" / "bench" / f"lwi-vs-random-{seed}"
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data"
        run("phantom", "--out", data, "--cases", a.cases, "--seed", 100 + seed, "--size", "64,64,48", "--spacing", "6,6,8")
        common = ["--dataset", data / "dataset.json", "--arch-config", CFG / "arch.json", "--seed", seed, "--device", "cpu"]
        run("init-train", *common, "--config", CFG / "init-train.json", "--epochs", a.init_epochs, "--out", work / "init.safetensors")
        run("fine-tune", *common, "--config", CFG / "fine-tune.json", "--epochs", a.ft_epochs, "--init", work / "init.safetensors",
            "--out", work / "lwi.safetensors")
        run("fine-tune", *common, "--config", CFG / "fine-tune.json", "--epochs", a.ft_epochs, "--from-scratch",
            "--out", work / "random.safetensors")
        for tag in results:
            results[tag].append(dice_of(work / f"{tag}.safetensors", data, work, tag))
        print(f"seed {seed}: mean Dice lwi {statistics.mean(results['lwi'][-1].values()):.4f}, "
              f"random {statistics.mean(results['random'][-1].values()):.4f}", flush=True)
    print(f"\nheld-out Dice, mean ± sd over seeds {a.seeds} (init-train {a.init_epochs} epochs, fine-tune {a.ft_epochs}):")
    print(f"{'organ':<12} {'lwi init':>16} {'random init':>16}")
    fmt = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"
    for label, name in list(ORGANS.items()) + [(0, "mean")]:
        col = lambda tag: [statistics.mean(r.values()) if label == 0 else r[label] for r in results[tag]]
        print(f"{name:<12} {fmt(col('lwi')):>16} {fmt(col('random')):>16}")


if __name__ == "__main__":
    main()

"""Labels of `lwi segment --precision bf16` against fp32 on the CPU, for docs/segmentation.md: voxel agreement, and
per label the Dice of bf16 against fp32 and, where a reference segmentation is given, the Dice of each precision
against it and their difference.
Usage: bf16_accuracy.py MODEL IMAGE WORKDIR [REFERENCE LABELMAP_JSON]
LABELMAP_JSON maps the model's label ids to the reference's ids, e.g. {"1": [5], "3": [2, 3]}."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from lwi_ctypes import cli_path  # noqa: E402


def segment(model, image, out, precision):
    subprocess.run([str(cli_path()), "segment", "--model", str(model), str(image), "--out", str(out), "--device", "cpu",
                    "--precision", precision, "--overwrite"], check=True, capture_output=True)
    manifest = json.loads(out.with_name(out.name + ".json").read_text())
    return np.asarray(nib.load(str(out)).dataobj), manifest


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def main():
    model, image, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    fp32, m32 = segment(model, image, work / "fp32.nii.gz", "fp32")
    bf16, m16 = segment(model, image, work / "bf16.nii.gz", "bf16")
    assert (m32["precision"], m16["precision"]) == ("fp32", "bf16"), (m32["precision"], m16["precision"])
    ref = labelmap = None
    if len(sys.argv) > 5:
        ref = np.asarray(nib.load(sys.argv[4]).dataobj)
        labelmap = {int(k): v for k, v in json.loads(sys.argv[5]).items()}
    names = json.loads(json.dumps(m32.get("labels", {})))
    print(f"{model.name} on {image.name}: voxels agree {(fp32 == bf16).mean():.4%} "
          f"({int((fp32 != bf16).sum())} of {fp32.size} differ); infer {m32['timings_s']['segment_stages']['infer']:.2f} s "
          f"fp32, {m16['timings_s']['segment_stages']['infer']:.2f} s bf16")
    for label in sorted(set(np.unique(fp32)) | set(np.unique(bf16))):
        if label == 0:
            continue
        line = f"  label {label} {names.get(str(label), '')}: {int((fp32 == label).sum())} voxels fp32, " \
               f"Dice(bf16, fp32) {dice(fp32 == label, bf16 == label):.4f}"
        if ref is not None and label in labelmap:
            truth = np.isin(ref, labelmap[label])
            d32, d16 = dice(fp32 == label, truth), dice(bf16 == label, truth)
            line += f"; vs reference fp32 {d32:.4f} bf16 {d16:.4f} difference {d16 - d32:+.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

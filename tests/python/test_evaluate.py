"""`lwi evaluate` against MONAI's compute_dice and compute_hausdorff_distance(percentile=95, spacing=...) on
the same masks: TotalSegmentator's real multi-organ label map as the reference, perturbed copies as predictions."""
import json
import subprocess

import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from lwi_ctypes import cli_path

TS = "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"
LABELS = [1, 2, 3, 5, 6, 7, 52]  # spleen, kidneys, liver, stomach, pancreas, aorta in TotalSegmentator's ids


def perturb(ref: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pred = ref.copy()
    pred[np.roll(ref == 5, 2, axis=0)] = 5  # liver grown 2 voxels along x
    pred[(ref == 1) & (rng.random(ref.shape) < 0.2)] = 0  # spleen with holes
    pred[np.roll(ref == 2, -1, axis=2) & (ref == 0)] = 2  # a kidney leaking one slice
    pred[ref == 52] = 0
    pred[np.roll(ref == 52, 3, axis=1)] = 52  # aorta displaced 3 voxels
    return pred


def test_dice_and_hd95_equal_monais(testdata, tmp_path, report):
    ref_img = nib.load(str(testdata / TS / "example_seg_fast_force_split.nii.gz"))
    ref = np.asarray(ref_img.dataobj).astype(np.uint8)
    spacing = tuple(float(s) for s in ref_img.header.get_zooms()[:3])
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    preds = {}
    for i in range(2):
        name = f"case{i}.nii.gz"
        pred = perturb(ref, i)
        preds[name] = pred
        nib.save(nib.Nifti1Image(pred, ref_img.affine), str(tmp_path / "pred" / name))
        nib.save(nib.Nifti1Image(ref, ref_img.affine), str(tmp_path / "ref" / name))
    out = tmp_path / "report.json"
    r = subprocess.run([str(cli_path()), "evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref",
                        "--labels", ",".join(map(str, LABELS)), "--json", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    lines, worst_d, worst_h = [], 0.0, 0.0
    for case in got["cases"]:
        pred = preds[case["case"]]
        for label in LABELS:
            yp = torch.from_numpy(pred == label)[None, None].float()
            yt = torch.from_numpy(ref == label)[None, None].float()
            d = compute_dice(torch.cat([1 - yp, yp], 1), torch.cat([1 - yt, yt], 1), include_background=False).item()
            h = compute_hausdorff_distance(torch.cat([1 - yp, yp], 1), torch.cat([1 - yt, yt], 1),
                                           include_background=False, percentile=95, spacing=spacing).item()
            mine = case["labels"][str(label)]
            worst_d, worst_h = max(worst_d, abs(mine["dice"] - d)), max(worst_h, abs(mine["hd95"] - h))
            lines.append(f"{case['case']} label {label:>2}: dice {mine['dice']:.6f} (MONAI {d:.6f}), "
                         f"hd95 {mine['hd95']:.4f} mm (MONAI {h:.4f})")
    report("\nevaluate vs MONAI metrics (spacing %s mm):\n%s\nworst |Δdice| %.1e, worst |Δhd95| %.1e mm"
           % (spacing, "\n".join(lines), worst_d, worst_h))
    assert worst_d < 1e-6 and worst_h < 1e-4


def test_grids_must_match(testdata, tmp_path):
    ref_img = nib.load(str(testdata / TS / "example_seg_fast_force_split.nii.gz"))
    data = np.asarray(ref_img.dataobj)
    nib.save(nib.Nifti1Image(data, ref_img.affine @ np.diag([1, 1, 1.1, 1])), str(tmp_path / "p.nii.gz"))
    r = subprocess.run([str(cli_path()), "evaluate", "--pred", tmp_path / "p.nii.gz", "--ref",
                        testdata / TS / "example_seg_fast_force_split.nii.gz"], capture_output=True, text=True)
    assert r.returncode == 1 and "different grids" in r.stderr

"""`lwi segment` against MONAI's own pipeline (LoadImaged, Orientationd RAS, Spacingd, ScaleIntensityRanged,
CropForegroundd, sliding_window_inference, Invertd) with the same UNETR weights, on TotalSegmentator's real CT
and on LPS and oblique versions of it. Compares the preprocessed network input (grid and values) and the final
label maps on the input grid."""
import json
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNETR
from monai.transforms import (AsDiscreted, Compose, CropForegroundd, EnsureChannelFirstd, Invertd, LoadImaged,
                              Orientationd, ScaleIntensityRanged, Spacingd)

from lwi_ctypes import cli_path

TS = "totalsegmentator/totalsegmentator-2.18.0/tests/reference_files"
SPACING = (2.5, 2.5, 3.5)
WINDOW = (-175.0, 250.0)
CFG = dict(in_channels=1, out_channels=4, img_size=[64, 64, 64], feature_size=8, hidden_size=48, mlp_dim=96,
           num_heads=4, proj_type="perceptron")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A UNETR with seeded weights, as MONAI builds it and as `lwi import` converts it."""
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(11)
    net = UNETR(**CFG).eval()
    torch.save(net.state_dict(), d / "unetr.pt")
    (d / "arch.json").write_text(json.dumps(CFG))
    (d / "labels.json").write_text(json.dumps({"0": "background", "1": "a", "2": "b", "3": "c"}))
    r = subprocess.run([str(cli_path()), "import", "--from", d / "unetr.pt", "--arch-config", d / "arch.json",
                        "--labels", d / "labels.json", "--spacing", ",".join(map(str, SPACING)),
                        "--window", ",".join(map(str, WINDOW)), "--out", d / "model.safetensors"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return net, d / "model.safetensors"


def variants(testdata, tmp):
    ct = nib.load(str(testdata / TS / "example_ct.nii.gz"))
    data = np.asanyarray(ct.dataobj).astype(np.float32)
    yield "RAS (original int32 file)", testdata / TS / "example_ct.nii.gz"
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    shape = np.array(data.shape)
    # the same voxels stored LPS: reverse x and y, move the origin to the old far corner
    lps_aff = ct.affine @ np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    p = tmp / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data[::-1, ::-1, :].copy(), lps_aff), str(p))
    assert np.allclose(flip @ lps_aff @ [0, 0, 0, 1], flip @ ct.affine @ [shape[0] - 1, shape[1] - 1, 0, 1])
    yield "LPS", p
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    p = tmp / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, rot @ ct.affine), str(p))
    yield "oblique (17 degrees about z)", p


def monai_pipeline(net, path):
    keys = ["image"]
    pre = Compose([
        LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=SPACING, mode="bilinear"),
        ScaleIntensityRanged(keys, a_min=WINDOW[0], a_max=WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys, source_key="image"),
    ])
    d = pre({"image": str(path)})
    x = d["image"]
    with torch.no_grad():
        logits = sliding_window_inference(x[None].float(), CFG["img_size"], 1, net, overlap=0.5, mode="gaussian")
    d["pred"] = torch.softmax(logits[0], 0)
    post = Compose([Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
                    AsDiscreted("pred", argmax=True)])
    out = post(d)
    return x, np.asarray(out["pred"][0]).astype(np.uint8)


def test_segment_matches_monais_pipeline(model, testdata, tmp_path, report):
    net, model_file = model
    lines = []
    for name, path in variants(testdata, tmp_path):
        out, pre = tmp_path / "labels.nii.gz", tmp_path / "pre.nii.gz"
        options = ["--overwrite", "--no-manifest", "--device", "cpu", "--save-preprocessed", pre]
        r = subprocess.run([str(cli_path()), "segment", "--model", model_file, path, "--out", out, *options],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        x, ref_labels = monai_pipeline(net, path)
        mine = nib.load(str(pre))
        ref_img = np.asarray(x[0])
        assert mine.shape == ref_img.shape, f"{name}: preprocessed shape {mine.shape} vs MONAI {ref_img.shape}"
        d_aff = np.abs(mine.affine - np.asarray(x.affine)).max()
        d_val = np.abs(mine.get_fdata() - ref_img).max()
        got = np.asarray(nib.load(str(out)).dataobj)
        src = nib.load(str(path))
        assert got.shape == src.shape and np.allclose(nib.load(str(out)).affine, src.affine, atol=1e-6)
        agree = float((got == ref_labels).mean())
        classes = np.bincount(ref_labels.ravel(), minlength=4)
        lines.append(f"{name:<30} preprocessed {ref_img.shape}: max|Δaffine| {d_aff:.1e} max|Δvalue| {d_val:.1e}; "
                     f"labels agree on {100 * agree:.3f}% of {got.size} voxels (MONAI class counts {classes.tolist()})")
        assert d_aff < 1e-4 and d_val < 1e-4, lines[-1]
        assert agree >= 0.995, lines[-1]
    report("\nsegment vs MONAI's pipeline (tiny UNETR, seeded weights, spacing 2.5x2.5x3.5, roi 64):\n" + "\n".join(lines))

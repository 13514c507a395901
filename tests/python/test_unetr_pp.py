"""UNETR++ through the C ABI as a user reaches it: an nnU-Net v1 checkpoint (the dict `save_checkpoint` writes:
state_dict with the tied EPA `F.*` and `num_batches_tracked`, optimizer state, plot_stuff, …) built with torch from
the upstream fixtures' weights, imported by `lwi import --arch unetr_pp`, run by `lwi forward`: every output equals
the upstream code's (shared/fixtures/unetrpp, README tolerances)."""
import json
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lwi_ctypes import ROOT, cli_path

sys.path.insert(0, str(ROOT / "bench"))
from nnunet_segment import ct_preprocessor, nnunet_network  # noqa: E402
from pytorch_unetr_pp import UnetrPP  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "unetrpp"
REDUCED = {"arch": "unetr_pp", "in_channels": 1, "img_size": [64, 128, 128], "feature_size": 4, "hidden_size": 64,
           "num_heads": 4, "depths": [1, 1, 2, 2], "dims": [8, 16, 32, 64]}
# synapse_heads2: num_heads 2 reaches the encoder stages only; the decoders keep upstream's 4 heads.
HEADS2 = {**REDUCED, "num_heads": 2, "depths": [1, 1, 1, 1]}


def lwi(*args):
    r = subprocess.run([str(cli_path()), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert "panicked" not in r.stderr, r.stderr
    return r


def upstream_state_dict(files):
    """The upstream state dict: F.* re-tied to E.* (the same tensors), num_batches_tracked present."""
    sd = OrderedDict()
    for f in files:
        sd.update(load_file(FIXTURES / f))
    for k in [k for k in sd if ".epa_block.E." in k]:
        sd[k.replace(".epa_block.E.", ".epa_block.F.")] = sd[k]
    for k in [k for k in sd if k.endswith("running_var")]:
        sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.int64)
    return sd


def nnunet_checkpoint(state_dict, path):
    """As nnU-Net v1's NetworkTrainer.save_checkpoint writes it."""
    params = [v for k, v in state_dict.items() if v.dtype == torch.float32][:3]
    optimizer = {"state": {i: {"momentum_buffer": torch.zeros_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 0.01, "momentum": 0.99, "dampening": 0, "weight_decay": 3e-5,
                                   "nesterov": True, "maximize": False, "foreach": None, "differentiable": False,
                                   "fused": None, "params": list(range(len(params)))}]}
    torch.save({"epoch": 1000, "state_dict": state_dict, "optimizer_state_dict": optimizer,
                "lr_scheduler_state_dict": None, "plot_stuff": ([1.0, 0.5], [1.1, 0.6], [1.2, 0.7], [0.1, 0.8]),
                "best_stuff": (999, 0.5, 0.8)}, path)


@pytest.fixture(scope="module")
def io():
    assert FIXTURES.is_dir(), f"{FIXTURES} is missing: the UNETR++ fixtures come with shared/"
    return load_file(FIXTURES / "synapse_reduced.io.safetensors")


def import_model(tmp_path, state_dict, out_channels, name, config=REDUCED):
    ckpt, arch, labels = tmp_path / f"{name}.model", tmp_path / f"{name}.json", tmp_path / "labels.json"
    nnunet_checkpoint(state_dict, ckpt)
    arch.write_text(json.dumps({**config, "out_channels": out_channels}))
    labels.write_text(json.dumps({str(i): f"organ{i}" for i in range(out_channels)}))
    out = tmp_path / f"{name}.safetensors"
    r = lwi("import", "--from", ckpt, "--arch-config", arch, "--labels", labels, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def forward(tmp_path, model, x):
    src, dst = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    save_file({"x": x.contiguous()}, src)
    r = lwi("forward", "--model", model, "--input", src, "--out", dst)
    assert r.returncode == 0, r.stderr
    return load_file(dst)


def test_an_imported_nnunet_checkpoint_computes_what_upstream_computes(tmp_path, io):
    model = import_model(tmp_path, upstream_state_dict(["synapse_reduced.weights.safetensors"]), 3, "synapse")
    info = json.loads(lwi("info", model).stdout)
    assert info["arch"] == "unetr_pp" and info["stage"] == "segmentation" and info["parameters"] == 11_931_973
    y = forward(tmp_path, model, io["x"])
    assert sorted(y) == ["out1", "out2", "out3"]
    for k in y:
        assert (y[k] - io[k]).abs().max().item() <= 5e-5, k


def test_num_heads_reaches_only_the_encoder_through_import_and_the_c_abi(tmp_path):
    """An upstream checkpoint with num_heads 2 (2-head encoder EPAs, 4-head decoder EPAs) imports and computes what
    upstream computes."""
    io = load_file(FIXTURES / "synapse_heads2.io.safetensors")
    model = import_model(tmp_path, upstream_state_dict(["synapse_heads2.weights.safetensors"]), 3, "heads2", HEADS2)
    info = json.loads(lwi("info", model).stdout)
    assert info["config"]["num_heads"] == 2 and info["parameters"] == 11_568_485
    y = forward(tmp_path, model, io["x"])
    assert sorted(y) == ["out1", "out2", "out3"]
    for k in y:
        assert (y[k] - io[k]).abs().max().item() <= 5e-5, k


def test_the_lwi_stage1_checkpoint_imports_as_an_init_model(tmp_path):
    io = load_file(FIXTURES / "lwi_pretext_reduced.io.safetensors")
    sd = upstream_state_dict(["synapse_reduced.weights.safetensors", "lwi_pretext_reduced.weights.safetensors"])
    model = import_model(tmp_path, sd, 1, "pretext")
    info = json.loads(lwi("info", model).stdout)
    assert info["stage"] == "init" and info["order_classes"] == 4
    y = forward(tmp_path, model, io["x_in"])
    assert sorted(y) == ["out2", "out3", "recon", "t1", "t2", "t3", "t4"]
    for k in ["recon", "out2", "out3"]:
        assert (y[k] - io[k]).abs().max().item() <= 5e-5, k
    for k in ["t1", "t2", "t3", "t4"]:
        assert (y[k] - io[k]).abs().max().item() <= 5e-6, k
    loss = torch.mean((y["recon"] - io["target"]) ** 2) + sum(
        torch.nn.functional.cross_entropy(y[f"t{j}"].reshape(4, 4), io["perm"]) for j in range(1, 5))
    assert abs(loss.item() - io["loss"].item()) <= 1e-5 * abs(io["loss"].item())


def test_bad_checkpoints_are_refused_naming_the_key(tmp_path, io):
    sd = upstream_state_dict(["synapse_reduced.weights.safetensors"])
    untied = OrderedDict(sd)
    key = "unetr_pp_encoder.stages.0.0.epa_block.F.bias"
    untied[key] = sd[key] + 1
    ckpt = tmp_path / "untied.model"
    nnunet_checkpoint(untied, ckpt)
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({**REDUCED, "out_channels": 3}))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"0": "background", "1": "a", "2": "b"}))
    r = lwi("import", "--from", ckpt, "--arch-config", arch, "--labels", labels, "--out", tmp_path / "m.safetensors")
    assert r.returncode == 1 and key in r.stderr, r.stderr
    missing = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("out3."))
    nnunet_checkpoint(missing, ckpt)
    r = lwi("import", "--from", ckpt, "--arch-config", arch, "--labels", labels, "--out", tmp_path / "m.safetensors")
    assert r.returncode == 1 and "out3.conv.conv.weight" in r.stderr, r.stderr
    (tmp_path / "bad.json").write_text(json.dumps({**REDUCED, "out_channels": 3, "dims": [8, 16, 32, 128]}))
    r = lwi("import", "--from", ckpt, "--arch-config", tmp_path / "bad.json", "--labels", labels,
            "--out", tmp_path / "m.safetensors")
    assert r.returncode == 1 and "dims" in r.stderr, r.stderr
    assert not (tmp_path / "m.safetensors").exists()


class Foreign:
    def __reduce__(self):
        return (print, ("a pickle that runs code",))


def test_a_pickle_naming_a_foreign_global_is_refused(tmp_path):
    ckpt = tmp_path / "foreign.model"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Foreign()}, ckpt)
    arch, labels = tmp_path / "arch.json", tmp_path / "labels.json"
    arch.write_text(json.dumps({**REDUCED, "out_channels": 3}))
    labels.write_text(json.dumps({"0": "background"}))
    r = lwi("import", "--from", ckpt, "--arch-config", arch, "--labels", labels, "--out", tmp_path / "m.safetensors")
    assert r.returncode == 1 and "print, which a checkpoint does not hold" in r.stderr, r.stderr
    assert "a pickle that runs code" not in r.stdout + r.stderr
    assert not (tmp_path / "m.safetensors").exists()


NORM = (-958.0, 327.0, 82.9, 136.9)  # percentile_00_5, percentile_99_5, mean, sd of a CT plans file


def ct_case(path):
    """An int16 CT-like volume at 1.5 x 1.5 x 2 mm with a zero border (the non-zero crop matters)."""
    rng = np.random.default_rng(5)
    arr = np.zeros((136, 132, 76), np.int16)
    body = rng.normal(40, 300, (128, 128, 70)).clip(-1024, 1500)
    body[40:80, 50:90, 20:50] += 400  # a bright organ
    arr[4:132, 2:130, 3:73] = body.astype(np.int16)
    import nibabel as nib
    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 2.0, 1.0])), path)
    return arr


def nnunet_segmentation(arr, weights, spacing_xyz=(1.5, 1.5, 2.0)):
    """nnunet==1.7.1's own code: crop_to_nonzero, GenericPreprocessor (CT; resample_patient: cubic spline, nearest
    along an anisotropic axis), SegmentationNetwork.predict_3D with step 0.5, the Gaussian and the 8 mirrorings,
    the probabilities resampled back as save_segmentation_nifti_from_softmax does (linear; separate z), argmax,
    pasted back into the crop box."""
    from nnunet.preprocessing.cropping import crop_to_nonzero
    from nnunet.preprocessing.preprocessing import get_do_separate_z, get_lowres_axis, resample_data_or_seg

    net = UnetrPP(out_channels=3, feature_size=4, depths=(1, 1, 2, 2))
    net.load_state_dict(weights)
    net = nnunet_network(net, 3).eval()
    data = arr.transpose(2, 1, 0)[None].astype(np.float32)  # SimpleITK's (z, y, x)
    cropped, _, bbox = crop_to_nonzero(data)
    pre = ct_preprocessor(NORM)
    original, target = np.array(spacing_xyz[::-1]), np.array([2.0, 1.5, 1.5])
    prepared, _, _ = pre.resample_and_normalize(cropped, target, {"original_spacing": original}, None)
    with torch.no_grad():
        _, softmax = net.predict_3D(prepared, do_mirroring=True, mirror_axes=(0, 1, 2), use_sliding_window=True,
                                    step_size=0.5, patch_size=(64, 128, 128), use_gaussian=True,
                                    pad_border_mode="constant", pad_kwargs={"constant_values": 0}, verbose=False,
                                    mixed_precision=False)
    axis = None
    for s in (original, target):
        if get_do_separate_z(s):
            axis = get_lowres_axis(s)
            break
    separate = axis is not None and len(axis) == 1
    seg = resample_data_or_seg(softmax, cropped.shape[1:], False, axis, 1, separate, order_z=0).argmax(0)
    full = np.zeros(data.shape[1:], np.uint8)
    full[bbox[0][0]:bbox[0][1], bbox[1][0]:bbox[1][1], bbox[2][0]:bbox[2][1]] = seg
    return full.transpose(2, 1, 0), prepared[0].transpose(2, 1, 0)


def import_ct_model(tmp_path, weights):
    """The reduced UNETR++ imported from an nnU-Net checkpoint at 1.5 x 1.5 x 2 mm with NORM."""
    ckpt, arch, labels = tmp_path / "pp.model", tmp_path / "arch.json", tmp_path / "labels.json"
    nnunet_checkpoint(weights, ckpt)
    arch.write_text(json.dumps({**REDUCED, "out_channels": 3}))
    labels.write_text(json.dumps({"0": "background", "1": "a", "2": "b"}))
    model = tmp_path / "pp.safetensors"
    r = lwi("import", "--from", ckpt, "--arch-config", arch, "--labels", labels, "--spacing", "1.5,1.5,2",
            "--ct-norm", ",".join(map(str, NORM)), "--out", model)
    assert r.returncode == 0, r.stderr
    return model


def test_segmenting_with_a_unetr_pp_model_is_nnunets_inference(tmp_path, io):
    """`lwi segment` of a UNETR++ model equals nnU-Net v1's pipeline (its own code as the oracle) on a CT at the
    model's spacing, label for label, and lands on the input's grid."""
    import nibabel as nib
    model = import_ct_model(tmp_path, upstream_state_dict(["synapse_reduced.weights.safetensors"]))
    image = tmp_path / "ct.nii.gz"
    arr = ct_case(image)
    out = tmp_path / "labels.nii.gz"
    r = lwi("segment", "--model", model, image, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    got = nib.load(out)
    np.testing.assert_array_equal(got.affine, nib.load(image).affine)
    manifest = json.loads((tmp_path / "labels.nii.gz.json").read_text())
    assert manifest["arch"] == "unetr_pp" and manifest["pipeline"] == "nn_unet"
    want, _ = nnunet_segmentation(arr, upstream_state_dict(["synapse_reduced.weights.safetensors"]))
    agree = (np.asarray(got.dataobj) == want).mean()
    assert agree == 1.0, f"labels agree on {agree:.6%} of voxels"
    assert len(np.unique(want)) > 1
    # The same voxels as an LPS NRRD (what Slicer writes): the same labels, on that file's grid.
    nrrd_in, nrrd_out = tmp_path / "ct.nrrd", tmp_path / "labels.nrrd"
    assert lwi("convert", image, nrrd_in).returncode == 0
    r = lwi("segment", "--model", model, nrrd_in, "--out", nrrd_out, "--device", "cpu", "--no-manifest")
    assert r.returncode == 0, r.stderr
    import nrrd
    labels_nrrd, header = nrrd.read(str(nrrd_out), index_order="F")
    np.testing.assert_array_equal(labels_nrrd, want)
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space directions"], np.diag([-1.5, -1.5, 2.0]))
    # nnU-Net never reorients: the same voxels placed elsewhere in the world (an oblique rotation, an LAS
    # x-flip) give the same labels, written on each input's own grid.
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    for name, linear in (("oblique", rot @ np.diag([1.5, 1.5, 2.0])), ("las", np.diag([-1.5, 1.5, 2.0]))):
        affine = np.eye(4)
        affine[:3, :3], affine[:3, 3] = linear, [10.0, -20.0, 30.0]
        moved, moved_out = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_labels.nii.gz"
        nib.save(nib.Nifti1Image(arr, affine), moved)
        r = lwi("segment", "--model", model, moved, "--out", moved_out, "--device", "cpu", "--no-manifest")
        assert r.returncode == 0, r.stderr
        result = nib.load(moved_out)
        np.testing.assert_allclose(result.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(result.dataobj), want, err_msg=name)


@pytest.mark.parametrize("spacing, shape", [((1.2, 1.25, 1.6), (136, 132, 76)),  # resampled on every axis
                                            ((1.0, 1.0, 5.0), (120, 124, 22))])   # anisotropic: z on its own
def test_a_ct_at_another_spacing_is_resampled_as_nnunet_does(tmp_path, spacing, shape):
    """Away from the model's spacing nnU-Net resamples the image with a cubic spline (nearest along z when the
    spacing is anisotropic) and the probabilities back linearly: lwi's labels equal its pipeline's."""
    import nibabel as nib
    weights = upstream_state_dict(["synapse_reduced.weights.safetensors"])
    model = import_ct_model(tmp_path, weights)
    rng = np.random.default_rng(11)
    arr = np.zeros(shape, np.int16)
    body = rng.normal(40, 300, (shape[0] - 8, shape[1] - 4, shape[2] - 4)).clip(-1024, 1500)
    body[30:70, 40:80, 5:15] += 400
    arr[4:-4, 2:-2, 2:-2] = body.astype(np.int16)
    image, out, pre = tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz", tmp_path / "pre.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), image)
    r = lwi("segment", "--model", model, image, "--out", out, "--device", "cpu", "--no-manifest",
            "--save-preprocessed", pre)
    assert r.returncode == 0, r.stderr
    got = nib.load(out)
    assert got.shape == arr.shape
    want, prepared = nnunet_segmentation(arr, weights, spacing)
    # The network's input itself: nnU-Net's preprocessed array, to float32 rounding, on the resampled crop's grid.
    mine = nib.load(pre)
    assert mine.shape == prepared.shape
    np.testing.assert_allclose(np.asarray(mine.dataobj), prepared, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.abs(np.diag(mine.affine)[:3]), np.array(spacing) * (np.array(arr.shape) - [8, 4, 4])
                               / prepared.shape, rtol=1e-6)
    agree = (np.asarray(got.dataobj) == want).mean()
    assert len(np.unique(want)) > 1
    assert agree == 1.0, f"labels agree on {agree:.6%} of voxels"


def test_a_unetr_pp_model_without_ct_normalisation_says_what_is_missing(tmp_path, io):
    model = import_model(tmp_path, upstream_state_dict(["synapse_reduced.weights.safetensors"]), 3, "seg")
    image = tmp_path / "ct.nii.gz"
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), image)
    r = lwi("segment", "--model", model, image, "--out", tmp_path / "labels.nii.gz")
    assert r.returncode == 1 and "--ct-norm" in r.stderr, r.stderr
    assert not (tmp_path / "labels.nii.gz").exists()


def test_the_benchmarks_pytorch_unetr_pp_is_the_upstream_network(io):
    """bench/pytorch_unetr_pp.py, the reference of the UNETR++ benchmarks, computes what upstream computes."""
    net = UnetrPP(out_channels=3, feature_size=4, depths=(1, 1, 2, 2)).eval()
    net.load_state_dict(upstream_state_dict(["synapse_reduced.weights.safetensors"]))
    with torch.no_grad():
        out = net(io["x"])
    for name, t in zip(["out1", "out2", "out3"], out):
        assert (t - io[name]).abs().max().item() <= 5e-5, name
    full = UnetrPP()
    assert sum(p.numel() for p in full.parameters()) == 42_952_850


def test_the_benchmarks_pytorch_unetr_pp_gives_its_decoders_four_heads():
    io = load_file(FIXTURES / "synapse_heads2.io.safetensors")
    net = UnetrPP(out_channels=3, feature_size=4, num_heads=2, depths=(1, 1, 1, 1)).eval()
    net.load_state_dict(upstream_state_dict(["synapse_heads2.weights.safetensors"]))
    with torch.no_grad():
        out = net(io["x"])
    for name, t in zip(["out1", "out2", "out3"], out):
        assert (t - io[name]).abs().max().item() <= 5e-5, name


def nnunet_plans(spacing_zyx, patch):
    """A plans dict shaped as nnU-Net v1's ExperimentPlanner3D writes it (numpy arrays and scalars inside)."""
    stage = {"batch_size": 2, "num_pool_per_axis": [4, 5, 5], "patch_size": np.array(patch),
             "median_patient_size_in_voxels": np.array([148, 512, 512]), "current_spacing": np.array(spacing_zyx),
             "original_spacing": np.array(spacing_zyx), "do_dummy_2D_data_aug": True,
             "pool_op_kernel_sizes": [[2, 4, 4], [2, 2, 2], [2, 2, 2]], "conv_kernel_sizes": [[3, 3, 3]] * 4}
    intensity = OrderedDict(median=np.float64(70.0), mean=np.float64(NORM[2]), sd=np.float64(NORM[3]),
                            mn=np.float64(-1024.0), mx=np.float64(3071.0),
                            percentile_99_5=np.float64(NORM[1]), percentile_00_5=np.float64(NORM[0]),
                            local_props=OrderedDict())
    return {"num_stages": 2, "num_modalities": 1, "modalities": {0: "CT"},
            "normalization_schemes": OrderedDict([(0, "CT")]),
            "dataset_properties": {"intensityproperties": OrderedDict([(0, intensity)]),
                                   "all_sizes": [(148, 512, 512)], "all_spacings": [np.array([3.0, 0.8, 0.8])]},
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "num_classes": 13,
            "plans_per_stage": {0: dict(stage, current_spacing=np.array([4.0, 3.0, 3.0])), 1: stage},
            "use_mask_for_norm": OrderedDict([(0, False)]), "keep_only_largest_region": None}


def test_the_plans_file_gives_spacing_patch_and_ct_normalisation(tmp_path):
    """`lwi import --plans` reads the checkpoint's .model.pkl as nnU-Net v1's save_checkpoint writes it
    ({"init", "name", "class", "plans"}) or a bare plans.pkl; a foreign patch or scheme is refused."""
    sd = upstream_state_dict(["synapse_reduced.weights.safetensors"])
    ckpt = tmp_path / "model_final_checkpoint.model"
    nnunet_checkpoint(sd, ckpt)
    arch, labels = tmp_path / "arch.json", tmp_path / "labels.json"
    arch.write_text(json.dumps({**REDUCED, "out_channels": 3}))
    labels.write_text(json.dumps({"0": "background", "1": "a", "2": "b"}))
    info = OrderedDict(init=("plans.pkl", 0), name="unetr_pp_trainer_synapse",
                       plans=nnunet_plans([2.0, 0.76, 0.76], [64, 128, 128]))
    info["class"] = "<class 'unetr_pp.training.network_training.unetr_pp_trainer_synapse.unetr_pp_trainer_synapse'>"
    for name, obj in (("model_final_checkpoint.model.pkl", info), ("plans.pkl", info["plans"])):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(obj, f)
        out = tmp_path / f"{name}.safetensors"
        r = lwi("import", "--from", ckpt, "--arch-config", arch, "--labels", labels, "--plans", tmp_path / name,
                "--out", out)
        assert r.returncode == 0, r.stderr
        pre = json.loads(lwi("info", out).stdout)["preprocessing"]
        assert pre["spacing"] == [0.76, 0.76, 2.0] and pre["pipeline"] == "nn_unet"
        assert pre["ct_normalization"] == dict(zip(["lower", "upper", "mean", "sd"], NORM))
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(nnunet_plans([2.0, 0.76, 0.76], [64, 160, 160]), f)
    r = lwi("import", "--from", ckpt, "--arch-config", arch, "--labels", labels, "--plans", tmp_path / "bad.pkl",
            "--out", tmp_path / "bad.safetensors")
    assert r.returncode == 1 and "[64, 160, 160]" in r.stderr, r.stderr
    (tmp_path / "cut.pkl").write_bytes((tmp_path / "plans.pkl").read_bytes()[:300])
    r = lwi("import", "--from", ckpt, "--arch-config", arch, "--labels", labels, "--plans", tmp_path / "cut.pkl",
            "--out", tmp_path / "cut.safetensors")
    assert r.returncode == 1 and "cut.pkl" in r.stderr and "panicked" not in r.stderr, r.stderr

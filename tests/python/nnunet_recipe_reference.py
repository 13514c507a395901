"""Reference values of the unetr_pp training recipe, computed by nnunet 1.7.1 and batchgenerators 0.25.5 (the code
UNETR++ trains with) on fixed tensors, for plugin/tests/nnunet_recipe.rs.
Usage: nnunet_recipe_reference.py OUT.safetensors
  loss:      DC_and_CE_loss({'batch_dice': b, 'smooth': 1e-5, 'do_bg': False}, {}) on logits [2, 4, 8, 16, 16], and
             MultipleOutputLoss2 with weights 4/7, 2/7, 1/7 over three outputs, targets downsampled by
             downsample_seg_for_ds_transform2 at UNETR++'s scales
  schedule:  poly_lr at epochs 0, 1, 500, 999 of 1000
  optimizer: torch.optim.SGD(lr 1e-2, momentum 0.99, nesterov, weight_decay 3e-5) after clip_grad_norm_(12) on three
             fixed gradients
  labels:    a label map [24, 20, 6] resized as resample_data_or_seg(is_seg=True, order=1, order_z=0) does, to
             [31, 15, 6] (all axes) and to [30, 26, 12] (separate z, nearest along the last axis)
  spatial:   the spatial transform (dummy 2D) on a 16 x 45 x 45 sample cut to 32 x 32, as augment below
  augment:   per transform of get_moreDA_augmentation, over 400 draws on one fixed sample, the mean and standard
             deviation of five statistics of the output (mean, sd, min, max, mean |out - in|) and the share of draws
             that changed it; once with the transform always applied, once with nnU-Net's probability
"""
import random
import sys

import numpy as np
import torch
from batchgenerators.augmentations.utils import resize_segmentation  # noqa: F401 (the DS downsampling's resize)
from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                         ContrastAugmentationTransform, GammaTransform)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from nnunet.training.data_augmentation.downsampling import downsample_seg_for_ds_transform2
from nnunet.training.learning_rate.poly_lr import poly_lr
from nnunet.training.loss_functions.deep_supervision import MultipleOutputLoss2
from nnunet.training.loss_functions.dice_loss import DC_and_CE_loss
from safetensors.torch import save_file

DRAWS = 400

# name -> (transform with probability p); the order and arguments of get_moreDA_augmentation (dummy 2D)
TRANSFORMS = {
    "noise": (0.1, lambda p: GaussianNoiseTransform(p_per_sample=p)),
    "blur": (0.2, lambda p: GaussianBlurTransform((0.5, 1.), different_sigma_per_channel=True, p_per_sample=p,
                                                  p_per_channel=0.5)),
    "brightness": (0.15, lambda p: BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=p)),
    "contrast": (0.15, lambda p: ContrastAugmentationTransform(p_per_sample=p)),
    "low_res": (0.25, lambda p: SimulateLowResolutionTransform(zoom_range=(0.5, 1), per_channel=True, p_per_channel=0.5,
                                                               order_downsample=0, order_upsample=3, p_per_sample=p,
                                                               ignore_axes=(0,))),
    "gamma_inverted": (0.1, lambda p: GammaTransform((0.7, 1.5), True, True, retain_stats=True, p_per_sample=p)),
    "gamma": (0.3, lambda p: GammaTransform((0.7, 1.5), False, True, retain_stats=True, p_per_sample=p)),
    "mirror": (1.0, lambda p: MirrorTransform((0, 1, 2), p_per_sample=p)),
}


def statistics(out, x):
    changed = float(not np.array_equal(out, x))
    return [out.mean(), out.std(), out.min(), out.max(), np.abs(out - x).mean(), changed]


def spatial(p):
    """get_moreDA_augmentation's SpatialTransform in dummy-2D mode on a 45 x 45 sampled patch (get_patch_size of
    32 x 32) cut to 32 x 32: rotation +-180 degrees, scale (0.7, 1.4), cubic image, linear labels, no elastic."""
    return SpatialTransform((32, 32), patch_center_dist_from_border=None, do_elastic_deform=False,
                            do_rotation=True, angle_x=(-np.pi, np.pi), angle_y=(0, 0), angle_z=(0, 0),
                            p_rot_per_axis=1, do_scale=True, scale=(0.7, 1.4), border_mode_data="constant",
                            border_cval_data=0, order_data=3, border_mode_seg="constant", border_cval_seg=-1,
                            order_seg=1, random_crop=False, p_el_per_sample=0, p_scale_per_sample=p,
                            p_rot_per_sample=p, independent_scale_for_each_axis=False)


def spatial_statistics(sample):
    """As augmentation(), for the spatial transform; the change is measured against the centre cut."""
    tensors = {"augment.spatial_input": torch.from_numpy(sample[0].copy())}
    centre = sample[0, :, 6:38, 6:38].astype(np.float64)
    for tag, prob in (("always", 1.0), ("recipe", 0.2)):
        transform = spatial(prob)
        rows = []
        for _ in range(DRAWS):
            batch = {"data": sample.copy(), "seg": np.zeros_like(sample)}  # (b, c·z, y, x): the dummy-2D layout
            out = transform(**batch)["data"][0].astype(np.float64)
            rows.append(statistics(out, centre))
        rows = np.array(rows)
        tensors[f"augment.spatial.{tag}"] = torch.tensor(np.stack([rows.mean(0), rows.std(0)]))
    return tensors


def augmentation(sample):
    tensors = {"augment.input": torch.from_numpy(sample[0].copy())}
    for name, (p, make) in TRANSFORMS.items():
        for tag, prob in (("always", 1.0), ("recipe", p)):
            transform = make(prob)
            rows = []
            for _ in range(DRAWS):
                batch = {"data": sample[None].copy(), "seg": np.zeros_like(sample[None])}
                out = transform(**batch)["data"][0]
                rows.append(statistics(out.astype(np.float64), sample.astype(np.float64)))
            rows = np.array(rows)
            tensors[f"augment.{name}.{tag}"] = torch.tensor(np.stack([rows.mean(0), rows.std(0)]))
    return tensors


def losses(g):
    tensors = {}
    logits = torch.randn(2, 4, 8, 16, 16, generator=g) * 2
    labels = torch.randint(0, 4, (2, 1, 8, 16, 16), generator=g).float()
    labels[1][labels[1] == 3] = 0  # a class absent from one sample
    for batch_dice in (True, False):
        loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False}, {})
        tensors[f"loss.dice_ce.batch_dice_{batch_dice}"] = loss(logits, labels).reshape(1)
    tensors["loss.logits"], tensors["loss.labels"] = logits, labels
    outputs = [torch.randn(2, 4, 16, 32, 32, generator=g), torch.randn(2, 4, 8, 8, 8, generator=g),
               torch.randn(2, 4, 4, 4, 4, generator=g)]
    seg = torch.randint(0, 4, (2, 1, 16, 32, 32), generator=g).float()
    targets = downsample_seg_for_ds_transform2(seg.numpy(), [[1, 1, 1], [0.5, 0.25, 0.25], [0.25, 0.125, 0.125]])
    ds = MultipleOutputLoss2(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False}, {}),
                             np.array([4, 2, 1]) / 7)
    tensors["loss.deep_supervision"] = ds(outputs, [torch.from_numpy(t) for t in targets]).reshape(1)
    for i, (o, t) in enumerate(zip(outputs, targets)):
        tensors[f"loss.ds_output{i}"], tensors[f"loss.ds_target{i}"] = o, torch.from_numpy(t).float()
    tensors["loss.ds_labels"] = seg
    return tensors


def optimizer(g):
    p = torch.nn.Parameter(torch.randn(50, generator=g, dtype=torch.float64))
    tensors = {"sgd.start": p.detach().clone()}
    sgd = torch.optim.SGD([p], lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    for i, scale in enumerate((0.5, 10.0, 3.0)):  # the second is clipped
        grad = torch.randn(50, generator=g, dtype=torch.float64) * scale
        tensors[f"sgd.grad{i}"] = grad
        p.grad = grad.clone()
        torch.nn.utils.clip_grad_norm_([p], 12)
        sgd.step()
    tensors["sgd.end"] = p.detach().clone()
    return tensors


def labels():
    from nnunet.preprocessing.preprocessing import resample_data_or_seg
    rng = np.random.default_rng(8)
    seg = np.zeros((24, 20, 6), np.float32)
    for value in (1, 2, 3, 5):
        c = rng.integers(0, (24, 20, 6))
        r = rng.uniform(2, 6)
        z, y, x = np.meshgrid(*[np.arange(n) for n in seg.shape], indexing="ij")
        seg[((z - c[0]) ** 2 + (y - c[1]) ** 2 + ((x - c[2]) * 2) ** 2) < r * r] = value
    whole = resample_data_or_seg(seg[None], (31, 15, 6), True, None, 1, False, order_z=0)[0]
    separate = resample_data_or_seg(seg[None], (30, 26, 12), True, [2], 1, True, order_z=0)[0]
    return {"labels.input": torch.from_numpy(seg), "labels.whole": torch.from_numpy(whole.astype(np.float32)),
            "labels.separate": torch.from_numpy(separate.astype(np.float32))}


def main():
    g = torch.Generator().manual_seed(11)
    tensors = {}
    tensors.update(losses(g))
    tensors.update(optimizer(g))
    tensors.update(labels())
    tensors["poly.epochs"] = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64)
    tensors["poly.lr"] = torch.tensor([poly_lr(e, 1000, 1e-2, 0.9) for e in (0, 1, 500, 999)], dtype=torch.float64)
    np.random.seed(3)
    random.seed(3)
    z, y, x = np.meshgrid(np.arange(16), np.arange(32), np.arange(32), indexing="ij")
    sample = (np.sin(x / 5.0) + np.cos(y / 7.0) + z / 16.0 + np.random.normal(0, 0.3, (16, 32, 32)))[None]
    tensors.update(augmentation(sample.astype(np.float32)))
    z, y, x = np.meshgrid(np.arange(16), np.arange(45), np.arange(45), indexing="ij")
    wide = (np.sin(x / 5.0) + np.cos(y / 7.0) + z / 16.0 + np.random.normal(0, 0.3, (16, 45, 45)))[None]
    tensors.update(spatial_statistics(wide.astype(np.float32)))
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, sys.argv[1])


if __name__ == "__main__":
    main()

"""Times a UNETR++ training step the way nnU-Net v1 trains it, as plugin/examples/unetr_pp_train_step.rs times lwi's: the
PyTorch UNETR++ of pytorch_unetr_pp.py in training mode on 64x128x128 patches (LWI_BENCH_PATCH=D,H,W for others),
nnunet 1.7.1's MultipleOutputLoss2(DC_and_CE_loss(batch_dice)) with weights 4/7, 2/7, 1/7 (targets downsampled
beforehand, as nnU-Net's data loader does), backward, clip_grad_norm_(12), SGD (lr 1e-2, momentum 0.99, Nesterov,
weight decay 3e-5). fp32; bf16 autocast; fp16 autocast with a GradScaler (nnU-Net's AMP).
Imports only torch, numpy and nnunet's loss modules (which need nothing else), so that it runs where only the GPU
bundle's packages and torch are installed.
Usage: pytorch_unetr_pp_train_step.py DEVICE BATCH PRECISION REPS FEATURE D1 D2 D3 D4. Prints one JSON line."""
import os
import sys

import numpy as np
import torch
from nnunet.training.loss_functions.deep_supervision import MultipleOutputLoss2
from nnunet.training.loss_functions.dice_loss import DC_and_CE_loss
from pytorch_unetr_pp import UnetrPP
from timing import autocast, report, time_passes

SCALES = [[1, 1, 1], [0.5, 0.25, 0.25], [0.25, 0.125, 0.125]]


def deep_supervision_targets(y, scales=SCALES):
    """The labels `y` [B, 1, D, H, W] at each scale as batchgenerators' downsample_seg_for_ds_transform2 makes them
    (skimage's order-0 resize: voxel floor((k + 1/2) n / m) of each axis), built in torch."""
    targets = []
    for scale in scales:
        t = y
        for axis, s in enumerate(scale, start=2):
            n = y.shape[axis]
            m = round(n * s)
            if m != n:
                idx = ((torch.arange(m, dtype=torch.float64) + 0.5) * n / m).floor().long().clamp(max=n - 1)
                t = t.index_select(axis, idx.to(y.device))
        targets.append(t)
    return targets


def main():
    device, batch, precision, reps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    feature, depths = int(sys.argv[5]), tuple(int(v) for v in sys.argv[6:10])
    if device != "cpu":
        torch.backends.cudnn.benchmark = True
    patch = [int(v) for v in os.environ.get("LWI_BENCH_PATCH", "64,128,128").split(",")]
    torch.manual_seed(0)
    net = UnetrPP(img_size=patch, feature_size=feature, depths=depths).to(device).train()
    loss_fn = MultipleOutputLoss2(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False}, {}),
                                  np.array([4, 2, 1]) / 7)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    x = torch.randn(batch, 1, *patch, device=device)
    targets = deep_supervision_targets(torch.randint(0, 14, (batch, 1, *patch)).float().to(device))
    losses = []

    def step():
        opt.zero_grad()
        with autocast(device, precision):
            loss = loss_fn(net(x), targets)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())

    times = time_passes(device, reps, step)
    report(device, times, batch=batch, precision=precision, loss_first=losses[0], loss_last=losses[-1])


if __name__ == "__main__":
    main()

"""Times a PyTorch training step with MONAI 1.6.1's UNETR and DiceCELoss and torch.optim.AdamW, as
plugin/examples/train_step.rs times lwi's. fp32; bf16 autocast; fp16 autocast with a GradScaler (AMP).
Usage: monai_train_step.py DEVICE BATCH PRECISION REPS SIZE FEATURE HIDDEN MLP HEADS. Prints one JSON line."""
import sys

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNETR
from timing import autocast, report, time_passes


def main():
    device, batch, precision, reps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    size, feature, hidden, mlp, heads = (int(v) for v in sys.argv[5:10])
    if device != "cpu":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = UNETR(in_channels=1, out_channels=14, img_size=size, feature_size=feature, hidden_size=hidden, mlp_dim=mlp,
                num_heads=heads, proj_type="perceptron", norm_name="instance").to(device).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    x = torch.randn(batch, 1, size, size, size, device=device)
    y = torch.randint(0, 14, (batch, 1, size, size, size), device=device)
    losses = []

    def step():
        with autocast(device, precision):
            loss = loss_fn(net(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())

    times = time_passes(device, reps, step)
    report(device, times, batch=batch, precision=precision, loss_first=losses[0], loss_last=losses[-1])

if __name__ == "__main__":
    main()

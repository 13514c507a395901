"""Times MONAI 1.6.1's UNETR forward passes (inference, no grad), as plugin/examples/unetr_forward.rs
times lwi's. Usage: monai_unetr_forward.py DEVICE BATCH PRECISION REPS [SIZE [FEATURE HIDDEN MLP HEADS]]. Prints one JSON line."""
import sys

import torch
from monai.networks.nets import UNETR
from timing import time_forward


def main():
    device, batch, precision, reps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    size = int(sys.argv[5]) if len(sys.argv) > 5 else 96
    feature, hidden, mlp, heads = (int(v) for v in sys.argv[6:10]) if len(sys.argv) > 9 else (16, 768, 3072, 12)
    if device != "cpu":
        torch.backends.cudnn.benchmark = True
    net = UNETR(in_channels=1, out_channels=14, img_size=size, feature_size=feature, hidden_size=hidden, mlp_dim=mlp,
                num_heads=heads, proj_type="perceptron", norm_name="instance").to(device).eval()
    x = torch.randn(batch, 1, size, size, size, device=device)
    time_forward(net, x, device, precision, reps, batch=batch)


if __name__ == "__main__":
    main()

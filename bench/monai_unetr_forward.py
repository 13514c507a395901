"""Times MONAI 1.6.1's UNETR forward passes (inference, no grad), as plugin/examples/unetr_forward.rs
times lwi's. Usage: monai_unetr_forward.py DEVICE BATCH PRECISION REPS [SIZE [FEATURE HIDDEN MLP HEADS]]. Prints one JSON line."""
import json
import sys
import time

import torch
from monai.networks.nets import UNETR


def main():
    device, batch, precision, reps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    size = int(sys.argv[5]) if len(sys.argv) > 5 else 96
    feature, hidden, mlp, heads = (int(v) for v in sys.argv[6:10]) if len(sys.argv) > 9 else (16, 768, 3072, 12)
    if device == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    else:
        torch.backends.cudnn.benchmark = True
    net = UNETR(in_channels=1, out_channels=14, img_size=size, feature_size=feature, hidden_size=hidden, mlp_dim=mlp,
                num_heads=heads, proj_type="perceptron", norm_name="instance").to(device).eval()
    x = torch.randn(batch, 1, size, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times = []
    for i in range(reps + 2):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            y = net(x)
        if device != "cpu":
            torch.cuda.synchronize()
        del y
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    print(json.dumps({"median_ms": times[len(times) // 2], "min_ms": times[0], "batch": batch, "device": device,
                      "precision": precision}))


if __name__ == "__main__":
    main()

"""Times MONAI 1.6.1's sliding_window_inference alone, as plugin/examples/sliding_window.rs times lwi's: the
full UNETR (14 classes) over a volume already on the device, roi 96^3, overlap 0.5, gaussian, BATCH windows
per pass, autocast for bf16/fp16. Usage: monai_sliding_window.py DEVICE BATCH PRECISION REPS
[SIZE FEATURE HIDDEN MLP HEADS] [--channels-last] (the UNETR and its roi SIZE^3, full size unless given); the
volume size from LWI_BENCH_VOLUME=X,Y,Z as for the lwi program. Prints one JSON line."""
import os
import sys

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNETR
from timing import autocast, report, time_passes


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    channels_last = "--channels-last" in sys.argv
    device, batch, precision, reps = args[0], int(args[1]), args[2], int(args[3])
    roi, feature, hidden, mlp, heads = (int(v) for v in args[4:9]) if len(args) > 8 else (96, 16, 768, 3072, 12)
    size = [int(v) for v in os.environ.get("LWI_BENCH_VOLUME", "273,273,250").split(",")]
    if device != "cpu":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = UNETR(in_channels=1, out_channels=14, img_size=roi, feature_size=feature, hidden_size=hidden, mlp_dim=mlp,
                num_heads=heads, proj_type="perceptron").to(device).eval()
    x = torch.rand(1, 1, *size, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def infer():
        with torch.no_grad(), autocast(device, precision):
            sliding_window_inference(x, (roi, roi, roi), batch, net, overlap=0.5, mode="gaussian")

    report(device, time_passes(device, reps, infer), batch=batch, precision=precision, channels_last=channels_last)


if __name__ == "__main__":
    main()

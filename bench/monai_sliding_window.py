"""Times MONAI 1.6.1's sliding_window_inference alone, as plugin/examples/sliding_window.rs times lwi's: the
full UNETR (14 classes) over a volume already on the device, roi 96^3, overlap 0.5, gaussian, BATCH windows
per pass, autocast for bf16/fp16. Usage: monai_sliding_window.py DEVICE BATCH PRECISION REPS
[--channels-last]; the volume size from LWI_BENCH_VOLUME=X,Y,Z as for the lwi program. Prints one JSON line."""
import json
import os
import sys
import time

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNETR


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    channels_last = "--channels-last" in sys.argv
    device, batch, precision, reps = args[0], int(args[1]), args[2], int(args[3])
    size = [int(v) for v in os.environ.get("LWI_BENCH_VOLUME", "273,273,250").split(",")]
    if device != "cpu":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = UNETR(in_channels=1, out_channels=14, img_size=96, proj_type="perceptron").to(device).eval()
    x = torch.rand(1, 1, *size, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times = []
    for i in range(reps + 2):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            y = sliding_window_inference(x, (96, 96, 96), batch, net, overlap=0.5, mode="gaussian")
        if device != "cpu":
            torch.cuda.synchronize()
        del y
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None
    print(json.dumps({"median_ms": times[len(times) // 2], "min_ms": times[0], "batch": batch, "device": device,
                      "precision": precision, "channels_last": channels_last, "peak_gpu_mb": peak}))


if __name__ == "__main__":
    main()

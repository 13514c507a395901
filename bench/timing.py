"""What the MONAI/PyTorch benchmark programs share, as plugin/examples/common does for lwi's: warm-up,
timing between CUDA synchronisations, and the JSON line bench/run.py reads."""
import json
import time

import torch


def time_passes(device, reps, work):
    """Runs `work` twice to warm up, then `reps` times; returns the times in ms, sorted."""
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    times = []
    for i in range(reps + 2):
        sync()
        t = time.perf_counter()
        work()
        sync()
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)


def report(device, times, **fields):
    """Prints the JSON line: median, minimum, peak allocated GPU memory, and `fields`."""
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None
    print(json.dumps({"median_ms": times[len(times) // 2], "min_ms": times[0], "device": device,
                      "peak_gpu_mb": peak, **fields}))


def time_forward(net, x, device, precision, reps, **fields):
    """Times `net(x)` without gradients (autocast for bf16/fp16) and prints the JSON line."""
    def forward():
        with torch.no_grad(), autocast(device, precision):
            net(x)

    report(device, time_passes(device, reps, forward), precision=precision, **fields)


def autocast(device, precision):
    """torch.autocast for bf16/fp16, a disabled one for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None)

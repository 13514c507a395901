"""MONAI 1.6.1's segmentation pipeline, file in -> label file out, as `lwi segment` does it: LoadImaged,
EnsureChannelFirstd, Orientationd(RAS), Spacingd, ScaleIntensityRanged, CropForegroundd,
sliding_window_inference (gaussian), Invertd back to the input grid, argmax, SaveImage.
Usage: monai_segment.py IMAGE WEIGHTS.pt ARCH.json SPACING(x,y,z) WINDOW(lo,hi) OUT.nii.gz DEVICE SW_BATCH [PRECISION]
Prints one JSON line with the stage timings."""
import json
import sys
import time

import torch
from monai.data import decollate_batch  # noqa: F401 - imported by MONAI's own examples; keeps import cost honest
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNETR
from monai.transforms import (AsDiscreted, Compose, CropForegroundd, EnsureChannelFirstd, Invertd, LoadImaged,
                              Orientationd, SaveImage, ScaleIntensityRanged, Spacingd)


def main():
    image, weights, arch, spacing, window, out, device, sw_batch = sys.argv[1:9]
    precision = sys.argv[9] if len(sys.argv) > 9 else "fp32"
    t0 = time.perf_counter()
    cfg = json.loads(open(arch).read())
    spacing = [float(v) for v in spacing.split(",")]
    lo, hi = (float(v) for v in window.split(","))
    if device != "cpu":
        torch.backends.cudnn.benchmark = True
    net = UNETR(**cfg).to(device).eval()
    net.load_state_dict(torch.load(weights, map_location=device))
    keys = ["image"]
    pre = Compose([
        LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=spacing, mode="bilinear"),
        ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys, source_key="image"),
    ])
    d = pre({"image": image})
    t1 = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
        logits = sliding_window_inference(d["image"][None].float().to(device), cfg["img_size"], int(sw_batch), net,
                                          overlap=0.5, mode="gaussian")
    d["pred"] = torch.softmax(logits[0].float(), 0)
    if device != "cpu":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    post = Compose([Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
                    AsDiscreted("pred", argmax=True)])
    labels = post(d)["pred"].to(torch.uint8)
    SaveImage(output_dir=str(__import__("pathlib").Path(out).parent), output_postfix="", separate_folder=False,
              output_dtype="uint8", print_log=False)(labels, meta_data=labels.meta,
                                                       filename=str(out).removesuffix(".nii.gz"))
    t3 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None
    print(json.dumps({"prepare_s": t1 - t0, "sliding_window_s": t2 - t1, "invert_save_s": t3 - t2,
                      "peak_gpu_mb": peak}))


if __name__ == "__main__":
    main()

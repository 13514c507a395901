"""nnunet==1.7.1's inference for one case, file in -> label file out, as `lwi segment` does it for a UNETR++
model: GenericPreprocessor.preprocess_test_case (SimpleITK read, crop to non-zero, cubic-spline resampling, CT
normalisation), SegmentationNetwork.predict_3D (step 0.5, Gaussian, mirroring), save_segmentation_nifti_from_softmax
(linear resampling back, argmax, crop box, SimpleITK write). The network is bench/pytorch_unetr_pp.py's UNETR++.
Usage: nnunet_segment.py IMAGE WEIGHTS.pt ARCH.json SPACING(x,y,z) NORM(lo,hi,mean,sd) OUT.nii.gz DEVICE MIRROR(0|1)
[PRECISION] — bf16: the prediction under torch.autocast on DEVICE (nnU-Net v1's own `mixed_precision` is CUDA's
autocast only), the logits cast to float before nnU-Net's softmax, as lwi does. Prints one JSON line with the stage
timings."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pytorch_unetr_pp import UnetrPP  # noqa: E402


def nnunet_network(net, classes):
    """`net` (returning its deep-supervision outputs) as nnU-Net's SegmentationNetwork, the first output only."""
    from nnunet.network_architecture.neural_network import SegmentationNetwork

    class Network(SegmentationNetwork):
        def __init__(self):
            super().__init__()
            self.net = net
            self.conv_op, self.num_classes, self.do_ds = torch.nn.Conv3d, classes, False
            self.inference_apply_nonlin = lambda x: torch.nn.functional.softmax(x, 1)

        def forward(self, x):
            return self.net(x)[0].float()

    return Network()


def ct_preprocessor(norm):
    from nnunet.preprocessing.preprocessing import GenericPreprocessor
    lo, hi, mean, sd = norm
    return GenericPreprocessor({0: "CT"}, {0: False}, [0, 1, 2],
                               {0: {"percentile_00_5": lo, "percentile_99_5": hi, "mean": mean, "sd": sd}})


def main():
    from nnunet.inference.segmentation_export import save_segmentation_nifti_from_softmax
    image, weights, arch, spacing, norm, out, device, mirror = sys.argv[1:9]
    bf16 = len(sys.argv) > 9 and sys.argv[9] == "bf16"
    t0 = time.perf_counter()
    cfg = json.loads(Path(arch).read_text())
    net = UnetrPP(out_channels=cfg["out_channels"], img_size=tuple(cfg["img_size"]), feature_size=cfg["feature_size"],
                  num_heads=cfg["num_heads"], depths=tuple(cfg["depths"]))
    net.load_state_dict(torch.load(weights, map_location="cpu"))
    network = nnunet_network(net, cfg["out_channels"]).to(device).eval()
    target = np.array([float(v) for v in spacing.split(",")][::-1])  # nnU-Net's (z, y, x)
    pre = ct_preprocessor([float(v) for v in norm.split(",")])
    data, _, properties = pre.preprocess_test_case([image], target)
    t1 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
        _, softmax = network.predict_3D(data, do_mirroring=mirror == "1", mirror_axes=(0, 1, 2),
                                        use_sliding_window=True, step_size=0.5, patch_size=tuple(cfg["img_size"]),
                                        use_gaussian=True, pad_border_mode="constant",
                                        pad_kwargs={"constant_values": 0}, all_in_gpu=False, verbose=False,
                                        mixed_precision=False)
    t2 = time.perf_counter()
    save_segmentation_nifti_from_softmax(softmax, out, properties, 1, None, None, None, None, None, None, 0,
                                         verbose=False)
    t3 = time.perf_counter()
    print(json.dumps({"prepare_s": t1 - t0, "sliding_window_s": t2 - t1, "resample_back_save_s": t3 - t2}))


if __name__ == "__main__":
    main()

"""The reference for plugin/examples/dist_step.rs: under torchrun, MONAI 1.6.1's UNETR with DiceCELoss and AdamW,
a step without gradient averaging, the same step under torch's DistributedDataParallel (its Reducer overlaps the
bucketed all-reduce with the backward pass), and one all-reduce of 92.8 M floats (LWI_BENCH_FLAT=N floats instead).
Gloo on the CPU, NCCL on CUDA.
Usage: torchrun --nproc_per_node=N torch_dist_step.py DEVICE BATCH PRECISION REPS SIZE FEATURE HIDDEN MLP HEADS.
Prints one JSON line on rank 0."""
import os
import sys

import torch
import torch.distributed as dist
from monai.losses import DiceCELoss
from monai.networks.nets import UNETR
from timing import autocast, report, time_passes

FULL_UNETR_FLOATS = 92_800_000


def main():
    device, batch, precision, reps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    size, feature, hidden, mlp, heads = (int(v) for v in sys.argv[5:10])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device != "cpu":
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    dist.init_process_group(os.environ.get("LWI_DIST_BACKEND", "gloo" if device == "cpu" else "nccl"))
    torch.manual_seed(0)
    net = UNETR(in_channels=1, out_channels=14, img_size=size, feature_size=feature, hidden_size=hidden, mlp_dim=mlp,
                num_heads=heads, proj_type="perceptron", norm_name="instance").to(device).train()
    # as MONAI's UNETR/BTCV recipe wraps it (some of its parameters take no part in the loss)
    ddp = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)
    x = torch.randn(batch, 1, size, size, size, device=device)
    y = torch.randint(0, 14, (batch, 1, size, size, size), device=device)

    def step(model):
        def work():
            with autocast(device, precision):
                loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = torch.tensor([loss.item()], dtype=torch.float64, device=device)
            dist.all_reduce(value)
        return work

    plain = time_passes(device, reps, step(net))
    synced = time_passes(device, reps, step(ddp))
    flat_floats = int(os.environ.get("LWI_BENCH_FLAT", FULL_UNETR_FLOATS))
    flat = torch.ones(flat_floats, device=device)

    def all_reduce():
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())

    flat_times = time_passes(device, reps, all_reduce)
    if dist.get_rank() == 0:
        median = lambda t: t[len(t) // 2]
        report(device, synced, world=dist.get_world_size(), backend=dist.get_backend(), step_ms=median(plain),
               synced_ms=median(synced), flat_ms=median(flat_times), flat_floats=flat_floats,
               gradient_floats=sum(p.numel() for p in net.parameters()))
    dist.destroy_process_group()
    # torch 2.11 with Gloo on the CPU hangs at interpreter exit in about half the runs (after this point, seen with
    # 2 ranks); the results are out, so leave without the interpreter's teardown
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

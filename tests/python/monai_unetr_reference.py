"""Reference outputs of MONAI 1.6.1's UNETR, for lwi's parity tests.

For each configuration: build MONAI `UNETR`, draw its weights with a fixed seed (default init, then
LayerNorm/BatchNorm parameters and BatchNorm statistics perturbed so they are exercised too), run one
forward in eval mode on a fixed random input, and write
  NAME.safetensors  the state dict, plus `__input__`, `__output__` and `__vit.hs{3,6,9}__`/`__vit.x__`
  NAME.json         the UNETR keyword arguments, MONAI's parameter count, the MONAI version
Usage: monai_unetr_reference.py OUT_DIR [NAME ...]   (default: every configuration but "full")
       monai_unetr_reference.py --checkpoints OUT_DIR
The second form writes PyTorch checkpoints of the "tiny_cubic" model for `lwi import`:
  monai_layout.pt     MONAI 1.6.1's state dict, as torch.save writes it
  lwi_vms_layout.pt   the same weights in the LWI-VMS layout (MONAI 0.7 names, order heads), nested as
                      {"epoch", "best_acc" (a numpy float), "state_dict"} like the released checkpoints
  unknown_keys.pt     MONAI's state dict plus a tensor no UNETR has
  arch.json, labels.json, reference.safetensors (`__input__`, `__output__`)
"""
import json
import sys
from pathlib import Path

import monai
import torch
from monai.networks.nets import UNETR
from safetensors.torch import save_file

TINY = dict(feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)
CONFIGS = {
    "tiny_cubic": dict(in_channels=1, out_channels=3, img_size=[32, 32, 32], proj_type="perceptron", **TINY),
    "non_cubic": dict(in_channels=2, out_channels=4, img_size=[32, 48, 64], proj_type="perceptron",
                      feature_size=8, hidden_size=64, mlp_dim=128, num_heads=4),
    "conv_embedding": dict(in_channels=1, out_channels=2, img_size=[32, 32, 48], proj_type="conv", **TINY),
    "batch_norm": dict(in_channels=1, out_channels=3, img_size=[32, 32, 32], proj_type="perceptron",
                       norm_name="batch", **TINY),
    "basic_blocks_qkv_bias": dict(in_channels=1, out_channels=3, img_size=[32, 32, 32], proj_type="perceptron",
                                  res_block=False, conv_block=False, qkv_bias=True, **TINY),
    "full": dict(in_channels=1, out_channels=14, img_size=[96, 96, 96], proj_type="perceptron", norm_name="instance",
                 res_block=True),
}


def build(name: str, seed: int = 0):
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    model = UNETR(**cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if ".norm" in key or "norm1" in key or "norm2" in key or "norm3" in key:
                if key.endswith("num_batches_tracked"):
                    continue
                if key.endswith("running_var"):
                    t.copy_(1.0 + 0.5 * torch.rand(t.shape, generator=g))
                else:
                    t.add_(0.1 * torch.randn(t.shape, generator=g))
    return cfg, model


def write(name: str, out: Path):
    cfg, model = build(name)
    g = torch.Generator().manual_seed(7)
    x = torch.randn([1, cfg["in_channels"], *cfg["img_size"]], generator=g)
    with torch.no_grad():
        y = model(x)
        tokens, hidden = model.vit(x)
    tensors = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    tensors.update({"__input__": x, "__output__": y, "__vit.x__": tokens,
                    "__vit.hs3__": hidden[3], "__vit.hs6__": hidden[6], "__vit.hs9__": hidden[9]})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
    meta = {"config": cfg, "parameters": sum(p.numel() for p in model.parameters()), "monai": monai.__version__}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))


def lwi_vms_layout(model, cfg, seed=3):
    """MONAI 1.6.1 names -> the LWI-VMS release's (MONAI 0.7) names, with its extra tensors."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in model.state_dict().items() if ".norm_cross_attn." not in k}
    sd["out.conv.weight"] = sd.pop("out.conv.conv.weight")
    sd["out.conv.bias"] = sd.pop("out.conv.conv.bias")
    hidden = cfg["hidden_size"]
    sd["vit.patch_embedding.cls_token"] = torch.zeros(1, 1, hidden)
    for key in [k for k in sd if k.endswith(".conv2.conv.weight")]:
        conv3 = key.replace(".conv2.", ".conv3.")
        if conv3 not in sd:  # MONAI 0.7 built an (unused) shortcut conv in every ResBlock
            c = sd[key].shape[0]
            sd[conv3] = torch.randn(c, c, 1, 1, 1, generator=g)
    for i in range(1, 5):
        sd[f"vit.temp_head{i}.weight"] = torch.randn(6, hidden, generator=g)
        sd[f"vit.temp_head{i}.bias"] = torch.randn(6, generator=g)
    return sd


def write_checkpoints(out: Path):
    import numpy as np

    cfg, model = build("tiny_cubic")
    torch.save(model.state_dict(), out / "monai_layout.pt")
    torch.save({"epoch": 5000, "best_acc": np.float64(0.8123), "state_dict": lwi_vms_layout(model, cfg)},
               out / "lwi_vms_layout.pt")
    unknown = dict(model.state_dict())
    unknown["decoder9.extra.weight"] = torch.zeros(3)
    torch.save(unknown, out / "unknown_keys.pt")
    (out / "arch.json").write_text(json.dumps(cfg))
    (out / "labels.json").write_text(json.dumps({"0": "background", "1": "spleen", "2": "liver"}))
    x = torch.randn([1, cfg["in_channels"], *cfg["img_size"]], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x)
    save_file({"__input__": x, "__output__": y}, str(out / "reference.safetensors"))


def write_init_stats(out: Path):
    """Per-tensor mean, std and max |x| of MONAI's freshly initialised tiny UNETR (no perturbation)."""
    torch.manual_seed(0)
    model = UNETR(**CONFIGS["tiny_cubic"])
    stats = {k: {"mean": v.float().mean().item(), "std": v.float().std().item() if v.numel() > 1 else 0.0,
                 "max_abs": v.abs().max().item(), "numel": v.numel()}
             for k, v in model.state_dict().items()}
    (out / "init_stats.json").write_text(json.dumps(stats))


def main():
    if sys.argv[1] == "--init-stats":
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        write_init_stats(out)
        return
    if sys.argv[1] == "--checkpoints":
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        write_checkpoints(out)
        return
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    names = sys.argv[2:] or [n for n in CONFIGS if n != "full"]
    torch.set_num_threads(2)
    for name in names:
        write(name, out)


if __name__ == "__main__":
    main()

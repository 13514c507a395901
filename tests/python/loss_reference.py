"""Reference loss values for lwi's tests, computed by MONAI 1.6.1 / PyTorch on fixed random tensors.
Usage: loss_reference.py OUT.safetensors
  dice_ce:  logits [2, 5, 12, 10, 8], labels [2, 1, 12, 10, 8] (one class absent), MONAI DiceCELoss(to_onehot_y=True,
            softmax=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-6)
  pretext:  recon/target [2, 1, 16, 16, 24], 4 order-logit tensors [2, 3, 3], perms [2, 3]: MSE + sum of 4 CE
"""
import sys

import torch
from monai.losses import DiceCELoss
from safetensors.torch import save_file


def main():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 12, 10, 8, generator=g) * 3
    labels = torch.randint(0, 4, (2, 1, 12, 10, 8), generator=g).float()  # class 4 never occurs
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)(logits, labels)
    recon = torch.randn(2, 1, 16, 16, 24, generator=g)
    target = torch.rand(2, 1, 16, 16, 24, generator=g)
    heads = [torch.randn(2, 3, 3, generator=g) for _ in range(4)]
    perms = torch.stack([torch.randperm(3, generator=g) for _ in range(2)])
    mse = torch.nn.functional.mse_loss(recon, target)
    ce = sum(torch.nn.functional.cross_entropy(h.reshape(-1, 3), perms.reshape(-1)) for h in heads)
    tensors = {"logits": logits, "labels": labels, "dice_ce": dice_ce.reshape(1), "recon": recon, "target": target,
               "perms": perms.float(), "mse": mse.reshape(1), "ce_sum": ce.reshape(1)}
    tensors.update({f"head{i}": h for i, h in enumerate(heads)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, sys.argv[1])


if __name__ == "__main__":
    main()

"""UNETR++ in plain PyTorch, for the benchmarks: written from shared/design/unetrpp.md §(b) with upstream's parameter
names, and proved equal to the upstream code on its fixtures (tests/python/test_unetr_pp.py), so that timings compare
lwi against the real network. Eval-mode semantics as the fixtures': BatchNorm running statistics, dropout off; in
training mode upstream's dropout (0.15 on both attention maps, Dropout3d 0.1) and batch statistics.

Usage as a benchmark: pytorch_unetr_pp.py DEVICE BATCH PRECISION REPS [FEATURE DEPTHS...] — times the forward of
the Synapse model (64×128×128; feature 16, depths 3 3 3 3 unless given) and prints one JSON line."""
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

STEM = (2, 4, 4)
# Upstream passes num_heads to the encoder alone: its decoders keep UnetrUpBlock's default of 4 heads.
DECODER_HEADS = 4


class EPA(nn.Module):
    def __init__(self, n, c, proj, heads):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.temperature2 = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkvv = nn.Linear(c, 4 * c, bias=False)
        self.E = self.F = nn.Linear(n, proj)  # one module, two names (upstream ties them)
        self.out_proj = nn.Linear(c, c // 2)
        self.out_proj2 = nn.Linear(c, c // 2)

    def forward(self, x):
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v_ca, v_sa = (t.transpose(-2, -1) for t in self.qkvv(x).reshape(b, n, 4, h, d).permute(2, 0, 3, 1, 4))
        k_proj, v_proj = self.E(k), self.F(v_sa)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        # upstream's attention dropout (0.15), active in training only
        x_ca = F.dropout(((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1), 0.15, self.training) @ v_ca
        x_ca = x_ca.permute(0, 3, 1, 2).reshape(b, n, c)
        attn_sa = F.dropout(((q.transpose(-2, -1) @ k_proj) * self.temperature2).softmax(-1), 0.15, self.training)
        x_sa = attn_sa @ v_proj.transpose(-2, -1)
        x_sa = x_sa.permute(0, 3, 1, 2).reshape(b, n, c)  # the raw reshape of the spatial branch
        return torch.cat((self.out_proj(x_sa), self.out_proj2(x_ca)), dim=-1)


class Conv(nn.Module):
    """MONAI's Convolution: the conv under `.conv`."""

    def __init__(self, cin, cout, k, stride=1, bias=False, transposed=False):
        super().__init__()
        kind = nn.ConvTranspose3d if transposed else nn.Conv3d
        pad = 0 if transposed or isinstance(k, tuple) else (k - stride + 1) // 2  # k = stride for tuples
        self.conv = kind(cin, cout, k, stride=stride if not transposed else k, padding=pad, bias=bias)

    def forward(self, x):
        return self.conv(x)


class ResBlock(nn.Module):
    """MONAI's UnetResBlock (k3, stride 1), LeakyReLU 0.01."""

    def __init__(self, cin, cout, norm):
        super().__init__()
        make = (lambda c: nn.BatchNorm3d(c)) if norm == "batch" else (lambda c: nn.InstanceNorm3d(c))
        self.conv1, self.conv2 = Conv(cin, cout, 3), Conv(cout, cout, 3)
        self.norm1, self.norm2 = make(cout), make(cout)
        self.shortcut = cin != cout
        if self.shortcut:
            self.conv3, self.norm3 = Conv(cin, cout, 1), make(cout)

    def forward(self, x):
        out = self.norm2(self.conv2(F.leaky_relu(self.norm1(self.conv1(x)), 0.01)))
        skip = self.norm3(self.conv3(x)) if self.shortcut else x
        return F.leaky_relu(out + skip, 0.01)


class TransformerBlock(nn.Module):
    def __init__(self, n, c, proj, heads):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.gamma = nn.Parameter(1e-6 * torch.ones(c))
        self.epa_block = EPA(n, c, proj, heads)
        self.conv51 = ResBlock(c, c, "batch")
        self.conv8 = nn.Sequential(nn.Dropout3d(0.1), nn.Conv3d(c, c, 1))
        self.pos_embed = nn.Parameter(torch.zeros(1, n, c))

    def forward(self, x):
        b, c, d, h, w = x.shape
        t = x.reshape(b, c, -1).permute(0, 2, 1) + self.pos_embed
        t = t + self.gamma * self.epa_block(self.norm(t))
        s = t.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)
        return s + self.conv8(self.conv51(s))


class UpBlock(nn.Module):
    def __init__(self, cin, cout, k, n, heads, conv_decoder=False):
        super().__init__()
        self.transp_conv = Conv(cin, cout, k, transposed=True)
        block = ResBlock(cout, cout, "instance") if conv_decoder else nn.Sequential(
            *[TransformerBlock(n, cout, 64, heads) for _ in range(3)])
        self.decoder_block = nn.ModuleList([block])

    def forward(self, x, skip):
        return self.decoder_block[0](self.transp_conv(x) + skip)


class Encoder(nn.Module):
    def __init__(self, img_size, dims, depths, heads, proj=(64, 64, 64, 32), cin=1):
        super().__init__()
        grid = [s // k for s, k in zip(img_size, STEM)]
        tokens = [grid[0] * grid[1] * grid[2] // 8 ** i for i in range(4)]
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(Conv(cin, dims[0], STEM, stride=STEM), nn.GroupNorm(1, dims[0]))]
            + [nn.Sequential(Conv(dims[i - 1], dims[i], 2, stride=2), nn.GroupNorm(dims[i - 1], dims[i]))
               for i in range(1, 4)])
        self.stages = nn.ModuleList([nn.Sequential(*[TransformerBlock(tokens[i], dims[i], proj[i], heads)
                                                     for _ in range(depths[i])]) for i in range(4)])

    def forward(self, x):
        hidden = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            hidden.append(x)
        return hidden


class UnetrPP(nn.Module):
    def __init__(self, out_channels=14, img_size=(64, 128, 128), feature_size=16, num_heads=4, depths=(3, 3, 3, 3)):
        super().__init__()
        f = feature_size
        dims = [2 * f, 4 * f, 8 * f, 16 * f]
        grid = [s // k for s, k in zip(img_size, STEM)]
        tokens = [grid[0] * grid[1] * grid[2] // 8 ** i for i in range(4)]
        self.unetr_pp_encoder = Encoder(img_size, dims, depths, num_heads)
        self.encoder1 = ResBlock(1, f, "instance")
        self.decoder5 = UpBlock(dims[3], dims[2], 2, tokens[2], DECODER_HEADS)
        self.decoder4 = UpBlock(dims[2], dims[1], 2, tokens[1], DECODER_HEADS)
        self.decoder3 = UpBlock(dims[1], dims[0], 2, tokens[0], DECODER_HEADS)
        self.decoder2 = UpBlock(dims[0], f, STEM, 0, DECODER_HEADS, conv_decoder=True)
        self.out1, self.out2, self.out3 = (nn.Module() for _ in range(3))
        for head, width in ((self.out1, f), (self.out2, dims[0]), (self.out3, dims[1])):
            head.conv = Conv(width, out_channels, 1, bias=True)

    def forward(self, x):
        enc1, enc2, enc3, enc4 = self.unetr_pp_encoder(x)
        dec3 = self.decoder5(enc4, enc3)
        dec2 = self.decoder4(dec3, enc2)
        dec1 = self.decoder3(dec2, enc1)
        out = self.decoder2(dec1, self.encoder1(x))
        return self.out1.conv(out), self.out2.conv(dec1), self.out3.conv(dec2)


def main():
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from timing import time_forward
    device, batch, precision, reps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    feature = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    depths = tuple(int(v) for v in sys.argv[6:10]) if len(sys.argv) > 9 else (3, 3, 3, 3)
    if device != "cpu":
        torch.backends.cudnn.benchmark = True
    patch = [int(v) for v in os.environ.get("LWI_BENCH_PATCH", "64,128,128").split(",")]  # LWI_BENCH_PATCH: tiny runs
    torch.manual_seed(0)
    net = UnetrPP(img_size=patch, feature_size=feature, depths=depths).to(device).eval()
    x = torch.randn(batch, 1, *patch, device=device)
    time_forward(net, x, device, precision, reps, batch=batch)


if __name__ == "__main__":
    main()

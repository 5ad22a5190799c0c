"""ESRGAN-style RRDB network: SAM-DiffSR's frozen conditioning encoder (METHOD.md §A, as in SRDiff).

Pretrained alone with L1 to HR; the diffusion UNet then reads `features(y)`: the trunk's per-block
maps plus the fused trunk output, every third from index 2 (`[2::3]`), concatenated.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; output scaled by 0.2 and added to the input."""

    def __init__(self, num_feat: int, grow: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv3(num_feat + i * grow, grow) for i in range(4))
        self.fuse = _conv3(num_feat + 4 * grow, num_feat)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(self.act(conv(torch.cat(feats, 1))))
        return x + 0.2 * self.fuse(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, residual scaled by 0.2."""

    def __init__(self, num_feat: int, grow: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(num_feat, grow) for _ in range(3)))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBNet(nn.Module):
    """LR (B,3,h,w) in [-1,1] -> SR (B,3,h*s,w*s) in [-1,1]; also the SRDiff conditioning features."""

    def __init__(self, num_feat: int = 64, num_block: int = 17, grow: int = 32, scale: int = 4) -> None:
        super().__init__()
        if scale < 1 or scale & (scale - 1):
            raise ValueError(f"RRDBNet scale={scale} must be a power of two (1, 2, 4, 8, ...)")
        if num_block < 2:
            raise ValueError(f"RRDBNet num_block={num_block} gives no conditioning features "
                             "(features are taken from every third block starting at index 2); use >= 2")
        self.num_feat, self.num_block, self.scale = num_feat, num_block, scale
        self.conv_first = _conv3(3, num_feat)
        self.trunk = nn.ModuleList(RRDB(num_feat, grow) for _ in range(num_block))
        self.trunk_conv = _conv3(num_feat, num_feat)
        # nearest x2 + conv per factor of two
        self.up_convs = nn.ModuleList(_conv3(num_feat, num_feat) for _ in range(int(math.log2(scale))))
        self.hr_conv = _conv3(num_feat, num_feat)
        self.conv_last = _conv3(num_feat, 3)
        self.act = nn.LeakyReLU(0.2)

    @property
    def cond_channels(self) -> int:
        """Channels of `features(y)`: num_feat * ((num_block + 1) // 3)."""
        return self.num_feat * ((self.num_block + 1) // 3)

    def _trunk(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(B,3,h,w) in [-1,1] -> (fused trunk (B,F,h,w), conditioning features (B,cond_channels,h,w))."""
        first = feat = self.conv_first((y + 1) / 2)
        maps = []
        for block in self.trunk:
            feat = block(feat)
            maps.append(feat)
        fused = first + self.trunk_conv(feat)
        maps.append(fused)
        return fused, torch.cat(maps[2::3], 1)

    def _upsample(self, fused: Tensor) -> Tensor:
        x = fused
        for conv in self.up_convs:
            x = self.act(conv(F.interpolate(x, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.act(self.hr_conv(x)))
        return out.clamp(0, 1) * 2 - 1

    def forward_with_features(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(B,3,h,w) in [-1,1] -> (SR (B,3,h*s,w*s) in [-1,1], features (B,cond_channels,h,w)), one pass."""
        fused, feats = self._trunk(y)
        return self._upsample(fused), feats

    def forward(self, y: Tensor) -> Tensor:
        """(B,3,h,w) in [-1,1] -> (B,3,h*s,w*s) in [-1,1]."""
        return self._upsample(self._trunk(y)[0])

    def features(self, y: Tensor) -> Tensor:
        """(B,3,h,w) in [-1,1] -> (B,cond_channels,h,w): SRDiff conditioning (no upsampling branch run)."""
        return self._trunk(y)[1]

"""Time-conditioned UNet, optionally conditioned on RRDB features the SRDiff way (METHOD.md §A).

Normalisation: GroupNorm (up to `norm_groups` groups) as in ResShift's UNet, or none (`norm_groups=0`) as
in SRDiff/SAM-DiffSR's UNet. GroupNorm removes each group's mean over the image, so a small, briefly
trained ε-predictor cannot carry the noise's per-channel mean through, and its 100-step samples drift
into a colour cast (docs/decisions.md); the SAM-DiffSR presets use 0.

Used as SAM-DiffSR's ε-predictor (cond = RRDB features) and as SAMSR's x̂-predictor (no cond,
`zero_init_out=True` so that x̂ = y↑ + residual starts at bicubic, METHOD.md §B).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_count(channels: int, most: int = 8) -> int:
    """Largest number of GroupNorm groups <= `most` that divides `channels`."""
    groups = min(most, channels)
    while channels % groups:
        groups -= 1
    return groups


def _norm(channels: int, most: int) -> nn.Module:
    """GroupNorm with up to `most` groups; `most` = 0 means no normalisation (SRDiff's UNet, `groups = 0`)."""
    return nn.GroupNorm(group_count(channels, most), channels) if most > 0 else nn.Identity()


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """(B,) float timesteps -> (B,dim) sinusoidal embedding (sin half, cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between, 1x1 skip when channels change."""

    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, norm_groups: int = 8) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, norm_groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(temb_dim, cout)
        self.norm2, self.conv2 = _norm(cout, norm_groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Level(nn.Module):
    """`n` res blocks at one resolution; the first maps cin -> cout."""

    def __init__(self, cin: int, cout: int, n: int, temb_dim: int, dropout: float, norm_groups: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, temb_dim, dropout, norm_groups)
                                    for i in range(n))

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, temb)
        return x


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """(B,in_ch,H,W), t (B,), cond (B,cond_ch,H/scale,W/scale) | None -> (B,out_ch,H,W); any H, W."""

    def __init__(self, in_ch: int, out_ch: int, base: int = 64, mults: Sequence[int] = (1, 2, 3, 4),
                 blocks_per_level: int = 2, dropout: float = 0.0, cond_ch: int = 0, scale: int = 4,
                 zero_init_out: bool = False, norm_groups: int = 8) -> None:
        super().__init__()
        if not mults or blocks_per_level < 1:
            raise ValueError(f"UNet needs at least one level and one block per level, got mults={tuple(mults)}, "
                             f"blocks_per_level={blocks_per_level}")
        chs = [base * m for m in mults]
        self.cond_ch, self.scale, self.multiple = cond_ch, scale, 2 ** (len(chs) - 1)
        self.base, temb_dim = base, 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_ch, base, 3, padding=1)
        # SRDiff conditioning: transposed conv x`scale` to the first level's width (METHOD.md §A)
        self.cond_proj = (nn.ConvTranspose2d(cond_ch, chs[0], scale * 2, scale, scale // 2) if cond_ch > 0 else None)
        self.downs = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = base
        for i, ch in enumerate(chs):
            self.downs.append(Level(prev, ch, blocks_per_level, temb_dim, dropout, norm_groups))
            last = i == len(chs) - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            prev = ch
        self.mid = Level(prev, prev, 2, temb_dim, dropout, norm_groups)
        self.ups = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(chs))):
            self.ups.append(Level(prev + chs[i], chs[i], blocks_per_level, temb_dim, dropout, norm_groups))
            self.upsamples.append(Upsample(chs[i]) if i > 0 else nn.Identity())
            prev = chs[i]
        self.norm_out = _norm(prev, norm_groups)
        self.conv_out = nn.Conv2d(prev, out_ch, 3, padding=1)
        if zero_init_out:  # x̂ = y↑ + residual starts as y↑ (METHOD.md §B)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def _cond_features(self, cond: Tensor | None, height: int, width: int) -> Tensor | None:
        """(B,cond_ch,h,w) -> (B,chs[0],H,W) at the unpadded output size, or None without conditioning."""
        if self.cond_proj is None:
            if cond is not None:
                raise ValueError("UNet was built with cond_ch=0 but got a cond tensor; build it with "
                                 f"cond_ch={cond.shape[1]} or pass cond=None")
            return None
        if cond is None:
            raise ValueError(f"UNet was built with cond_ch={self.cond_ch}; pass cond (B,{self.cond_ch},H/{self.scale},W/{self.scale})")
        expected = (self.cond_ch, height // self.scale, width // self.scale)
        if tuple(cond.shape[1:]) != expected or height % self.scale or width % self.scale:
            raise ValueError(f"cond has shape {tuple(cond.shape)} for x of size {height}x{width}; expected "
                             f"(B,{expected[0]},{expected[1]},{expected[2]}) with H, W multiples of scale={self.scale}")
        return self.cond_proj(cond)[:, :, :height, :width]

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """x (B,in_ch,H,W), t (B,) int or float timesteps, cond (B,cond_ch,H/scale,W/scale) -> (B,out_ch,H,W)."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        pad = (0, pad_w, 0, pad_h)
        cond_feat = self._cond_features(cond, height, width)
        if pad_h or pad_w:
            x = F.pad(x, pad, mode="replicate")
            cond_feat = None if cond_feat is None else F.pad(cond_feat, pad, mode="replicate")
        temb = self.time_mlp(timestep_embedding(t.reshape(-1).to(x.device), self.base))
        h = self.conv_in(x)
        skips = []
        for i, (level, down) in enumerate(zip(self.downs, self.downsamples)):
            h = level(h, temb)
            if i == 0 and cond_feat is not None:
                h = h + cond_feat  # SRDiff: added after the first-level blocks
            skips.append(h)
            h = down(h)
        h = self.mid(h, temb)
        for level, up in zip(self.ups, self.upsamples):
            h = up(level(torch.cat([h, skips.pop()], 1), temb))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[:, :, :height, :width]

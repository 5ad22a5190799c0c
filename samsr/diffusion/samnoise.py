"""SAMSR's SAM-Noise module and pixel-wise schedule (METHOD.md §B).

SAM-Noise: with masks M_1..M_K of y↑ plus the background M_0 = 1 − union, coverage C = Σ_{k=0..K} M_k
and independent standard normal fields n_k, ε_sam = Σ_k M_k n_k / C. Per pixel that is
N(0, Σ_k M_k² / C²), so it is drawn as ONE standard normal field times the scale map
`sqrt(Σ M_k²)/C` (= 1/√C for hard masks), then standardised per image and channel.

Standardisation uses analytic whole-image statistics: the field has expected mean 0 and per-pixel
variance scale², so its whole-image std is `noise_rms = sqrt(mean_p scale²)`. Empirical per-image
standardisation of such a field differs from this only by sampling noise (O(1/sqrt(H·W))), and the
analytic version gives the same numbers for a training crop (stats carried in the batch from the
whole image, `whole_image_stats`) and for the whole image at inference (`image_stats`), never
per-crop or per-tile statistics. The same holds for all three channels, so one value per image serves.

Pixel-wise schedule: W = C / max(max_p C, 1), w = W / weight_divisor, κ' = (1 − w) κ and
√η'_t = min((1 + w) √η_t, 0.99) — the clamp keeps η' non-decreasing in t and 1 − η' >= 1 − 0.99².
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ETA_CLAMP = 0.99    # the cap on √η'_t (METHOD.md §B; the public code has none)


def _check_cover(cover: Tensor) -> None:
    if cover.numel() and float(cover.min()) < 1:
        raise ValueError(f"coverage C must be >= 1 everywhere (it counts the background mask), got min "
                         f"{float(cover.min())}; build it with structure.masks.coverage")


def hard_noise_scale(cover: Tensor) -> Tensor:
    """Hard masks: scale = 1/√C; cover (...) float >= 1 -> same shape in (0, 1]."""
    _check_cover(cover)
    return cover.float().rsqrt()


def _with_background(masks: Tensor) -> Tensor:
    """(K,H,W) in [0,1] -> (K+1,H,W) float: M_0 = 1 − max_k M_k (= 1 − union for hard masks), M_1..M_K."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K,H,W), got shape {tuple(masks.shape)}")
    masks = masks.float()
    if masks.numel() and (float(masks.min()) < 0 or float(masks.max()) > 1):
        raise ValueError(f"mask values must lie in [0,1], got [{float(masks.min())}, {float(masks.max())}]")
    union = masks.amax(0) if masks.shape[0] else masks.new_zeros(masks.shape[1:])
    return torch.cat([(1 - union)[None], masks])


def sam_noise_scale(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Soft or hard masks (K,H,W) in [0,1] (no background) -> (scale (H,W) = sqrt(Σ M_k²)/C, C (H,W) >= 1).

    With the background M_0 = 1 − max_k M_k, C >= 1; for hard masks the scale is 1/√C.
    """
    full = _with_background(masks)
    cover = full.sum(0)
    return full.square().sum(0).sqrt() / cover, cover


def sam_noise_from_masks(masks: Tensor, generator: torch.Generator, channels: int = 3) -> Tensor:
    """The definition, literally: Σ_k M_k n_k / C with one field n_k per mask (incl. M_0); masks (K,H,W)
    in [0,1] -> (channels,H,W), not standardised. A reference for the one-field draw (`sam_noise`)."""
    full = _with_background(masks)
    fields = torch.randn((full.shape[0], channels, *full.shape[1:]), generator=generator, device=generator.device)
    full = full[:, None].to(fields)
    return (full * fields).sum(0) / full.sum(0)


def whole_image_stats(cover: np.ndarray | Tensor, scale: np.ndarray | Tensor | None = None) -> tuple[float, float]:
    """Whole-image (H,W) coverage C >= 1 (and the soft scale map, default 1/√C) -> (max C, RMS of the scale).

    Called by the data pipeline before cropping; the crop's batch carries these as `cover_max`, `noise_rms`.
    """
    c = np.asarray(cover, dtype=np.float64)
    if c.ndim != 2 or c.size == 0:
        raise ValueError(f"cover must be a non-empty (H,W) map, got shape {c.shape}")
    if c.min() < 1:
        raise ValueError(f"coverage C must be >= 1 everywhere, got min {c.min()}; build it with structure.masks.coverage")
    s2 = 1.0 / c if scale is None else np.asarray(scale, dtype=np.float64) ** 2
    return float(c.max()), float(np.sqrt(s2.mean()))


def image_stats(cover: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Whole images: cover (B,1,H,W) >= 1 (and soft scale (B,1,H,W)) -> (cover_max (B,), noise_rms (B,))."""
    _check_cover(cover)
    s2 = cover.float().reciprocal() if scale is None else scale.float().square()
    return cover.float().flatten(1).amax(1), s2.flatten(1).mean(1).sqrt()


def sam_noise(noise: Tensor, scale: Tensor, noise_rms: Tensor) -> Tensor:
    """ε_sam = noise·scale / noise_rms: noise (B,3,H,W) standard normal, scale (B,1,H,W), noise_rms (B,)
    whole-image -> (B,3,H,W), zero mean and unit std over the whole image (analytically)."""
    return noise * scale / noise_rms.to(noise).view(-1, 1, 1, 1)


def pixelwise_weight(cover: Tensor, cover_max: Tensor, weight_divisor: float) -> Tensor:
    """w = C / max(max_p C, 1) / weight_divisor: cover (B,1,H,W), whole-image cover_max (B,) -> (B,1,H,W)."""
    _check_cover(cover)
    if weight_divisor < 1:
        raise ValueError(f"weight_divisor={weight_divisor} would make w > 1 and κ' negative; use a value >= 1 (5)")
    denom = cover_max.to(cover).clamp_min(1).view(-1, 1, 1, 1)
    return cover.float() / denom / weight_divisor


def pixelwise_kappa(kappa: float, w: Tensor) -> Tensor:
    """κ' = (1 − w) κ per pixel."""
    return (1 - w) * kappa


def pixelwise_sqrt_eta(sqrt_eta: Tensor | float, w: Tensor, clamp: float = ETA_CLAMP) -> Tensor:
    """√η'_t = min((1 + w) √η_t, clamp) per pixel; √η_t scalar or broadcastable to w (B,1,H,W)."""
    return ((1 + w) * sqrt_eta).clamp(max=clamp)


__all__ = ["ETA_CLAMP", "hard_noise_scale", "sam_noise_scale", "sam_noise_from_masks", "whole_image_stats",
           "image_stats", "sam_noise", "pixelwise_weight", "pixelwise_kappa", "pixelwise_sqrt_eta"]

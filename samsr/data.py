"""Training samples and batches for the plain loop: what one shard sample holds, in memory.

`prepare_sample` is the per-image work the shard job maps over the data (HR, LR, SPE of the HR masks,
coverage of the y↑ masks); `make_batch` draws aligned random crops into the batch dict of
`samsr/method.py`. Whole-image statistics are computed before cropping (METHOD.md §B).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from samsr import images
from samsr.diffusion.samnoise import sam_noise_scale, whole_image_stats
from samsr.structure import masks as masks_mod
from samsr.structure import spe


@dataclass(frozen=True)
class Sample:
    key: str
    hr: np.ndarray            # (H,W,3) uint8, H and W multiples of the scale
    lr: np.ndarray            # (H/s,W/s,3) uint8, bicubic ÷s
    spe_labels: np.ndarray    # (H,W) uint16 label map of the HR masks (0 = uncovered)
    spe_values: np.ndarray    # (K+1,) float32 SPE value per label; values[labels] = E
    cover: np.ndarray         # (H,W) coverage C of the y↑ masks incl. background (uint8; float32 if soft)
    cover_max: float          # whole-image max C
    noise_rms: float          # whole-image RMS of the SAM-Noise scale
    noise_scale: np.ndarray | None = None   # (H,W) float32 soft-mask scale sqrt(Σ M_k²)/C; None = hard (1/√C)


def lr_upsampled(lr: np.ndarray, scale: int) -> np.ndarray:
    """(h,w,3) uint8 -> (h*s,w*s,3) uint8 bicubic y↑, the image SAMSR segments (METHOD.md §B)."""
    up = images.upscale(images.to_tensor(lr)[None], scale)
    return images.to_uint8(up)[0]


def structure_from_records(records: Sequence[masks_mod.MaskRecord],
                           shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Ordered mask records of an image of `shape` (H, W) -> (labels uint16, SPE values float32) (METHOD.md §A).

    Records come ordered by `order_records`; a fallback segmenter has no IoU, so its records keep
    their (area) order under the stable IoU sort inside `spe.encode`. No records (a flat or
    low-contrast image SAM finds nothing in) give the all-background map: labels 0, values [0], E ≡ 0.
    """
    ious = [r.predicted_iou if r.predicted_iou is not None else 0.0 for r in records]
    return spe.encode([r.segmentation for r in records], ious, shape=(int(shape[0]), int(shape[1])))


def soft_lrup_maps(y_up: np.ndarray, segmenter) -> tuple[np.ndarray, np.ndarray]:
    """Soft masks of y↑ (METHOD.md §B): segment y↑ upscaled 2x (bicubic), average-pool each mask back.
    (H,W,3) uint8 -> (cover C float32 >= 1, noise scale sqrt(Σ M_k²)/C float32), both (H,W)."""
    h, w = y_up.shape[:2]
    up2 = images.to_uint8(images.upscale(images.to_tensor(y_up)[None], 2))[0]
    records = segmenter.segment(up2)
    if records:
        hard = torch.from_numpy(np.stack([r.segmentation for r in records]).astype(np.float32))
        soft = torch.nn.functional.avg_pool2d(hard[None], 2)[0]            # (K,H,W) in [0,1]
    else:
        soft = torch.zeros((0, h, w))
    scale, cover = sam_noise_scale(soft)
    return cover.numpy().astype(np.float32), scale.numpy().astype(np.float32)


def lrup_maps(y_up: np.ndarray, segmenter, soft: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """SAMSR's SAM maps of y↑ (H,W,3) uint8: (coverage C, None) with hard masks, or the soft
    (C float32, noise scale) of `soft_lrup_maps`."""
    if soft:
        return soft_lrup_maps(y_up, segmenter)
    return masks_mod.coverage([r.segmentation for r in segmenter.segment(y_up)], y_up.shape[:2]), None


def prepare_sample(key: str, hr: np.ndarray, scale: int, segmenter, lrup_segmenter=None,
                   soft_masks: bool = False) -> Sample:
    """Decoded RGB8 image -> Sample. `segmenter` segments HR; `lrup_segmenter` (default: the same) y↑,
    with hard masks, or soft ones (`soft_masks`, segmenting at 2x: four times SAM's pixels)."""
    hr = images.crop_to_multiple(hr, scale)
    lr = images.make_lr(hr, scale)
    labels, values = structure_from_records(segmenter.segment(hr), hr.shape[:2])
    cover, noise_scale = lrup_maps(lr_upsampled(lr, scale), lrup_segmenter or segmenter, soft_masks)
    cover_max, noise_rms = whole_image_stats(cover, noise_scale)
    return Sample(key, hr, lr, labels, values, cover, float(cover_max), float(noise_rms), noise_scale)


def make_batch(samples: Sequence[Sample], batch_size: int, hr_crop: int, scale: int,
               rng: np.random.Generator, flips: bool = True) -> dict[str, torch.Tensor]:
    """Random aligned crops -> batch dict (hr, lr in [-1,1]; spe; cover; cover_max; noise_rms; and
    noise_scale when the samples carry soft-mask scales — all of them or none)."""
    soft = {s.noise_scale is not None for s in samples}
    if len(soft) > 1:
        raise ValueError("some samples have soft-mask noise scales and some do not; prepare them all alike")
    hrs, lrs, spes, covers, cmax, rms, scales = [], [], [], [], [], [], []
    for _ in range(batch_size):
        s = samples[int(rng.integers(len(samples)))]
        crop_maps = {"labels": s.spe_labels, "cover": s.cover}
        if s.noise_scale is not None:
            crop_maps["noise_scale"] = s.noise_scale
        hr, lr, maps = images.aligned_crop(s.hr, s.lr, crop_maps, hr_crop, scale, rng, flips=flips)
        hrs.append(images.to_tensor(hr))
        lrs.append(images.to_tensor(lr))
        spes.append(torch.from_numpy(s.spe_values[maps["labels"].astype(np.int64)])[None])
        covers.append(torch.from_numpy(maps["cover"].astype(np.float32))[None])
        cmax.append(s.cover_max)
        rms.append(s.noise_rms)
        if "noise_scale" in maps:
            scales.append(torch.from_numpy(np.ascontiguousarray(maps["noise_scale"], dtype=np.float32))[None])
    batch = {
        "hr": torch.stack(hrs), "lr": torch.stack(lrs), "spe": torch.stack(spes), "cover": torch.stack(covers),
        "cover_max": torch.tensor(cmax, dtype=torch.float32), "noise_rms": torch.tensor(rms, dtype=torch.float32),
    }
    if scales:
        batch["noise_scale"] = torch.stack(scales)
    return batch

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
from samsr.diffusion.samnoise import whole_image_stats
from samsr.structure import masks as masks_mod
from samsr.structure import spe


@dataclass(frozen=True)
class Sample:
    key: str
    hr: np.ndarray            # (H,W,3) uint8, H and W multiples of the scale
    lr: np.ndarray            # (H/s,W/s,3) uint8, bicubic ÷s
    spe_labels: np.ndarray    # (H,W) uint16 label map of the HR masks (0 = uncovered)
    spe_values: np.ndarray    # (K+1,) float32 SPE value per label; values[labels] = E
    cover: np.ndarray         # (H,W) uint8 coverage C of the y↑ masks incl. background
    cover_max: float          # whole-image max C
    noise_rms: float          # whole-image RMS of the SAM-Noise scale


def lr_upsampled(lr: np.ndarray, scale: int) -> np.ndarray:
    """(h,w,3) uint8 -> (h*s,w*s,3) uint8 bicubic y↑, the image SAMSR segments (METHOD.md §B)."""
    up = images.upscale(images.to_tensor(lr)[None], scale)
    return images.to_uint8(up)[0]


def structure_from_records(records: Sequence[masks_mod.MaskRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Ordered mask records -> (labels uint16, SPE values float32) (METHOD.md §A).

    Records come ordered by `order_records`; a fallback segmenter has no IoU, so its records keep
    their (area) order under the stable IoU sort inside `spe.encode`.
    """
    ious = [r.predicted_iou if r.predicted_iou is not None else 0.0 for r in records]
    return spe.encode([r.segmentation for r in records], ious)


def prepare_sample(key: str, hr: np.ndarray, scale: int, segmenter, lrup_segmenter=None) -> Sample:
    """Decoded RGB8 image -> Sample. `segmenter` segments HR; `lrup_segmenter` (default: the same) y↑."""
    hr = images.crop_to_multiple(hr, scale)
    lr = images.make_lr(hr, scale)
    labels, values = structure_from_records(segmenter.segment(hr))
    lrup_records = (lrup_segmenter or segmenter).segment(lr_upsampled(lr, scale))
    cover = masks_mod.coverage([r.segmentation for r in lrup_records], hr.shape[:2])
    cover_max, noise_rms = whole_image_stats(cover)
    return Sample(key, hr, lr, labels, values, cover, float(cover_max), float(noise_rms))


def make_batch(samples: Sequence[Sample], batch_size: int, hr_crop: int, scale: int,
               rng: np.random.Generator, flips: bool = True) -> dict[str, torch.Tensor]:
    """Random aligned crops -> batch dict (hr, lr in [-1,1]; spe; cover; cover_max; noise_rms)."""
    hrs, lrs, spes, covers, cmax, rms = [], [], [], [], [], []
    for _ in range(batch_size):
        s = samples[int(rng.integers(len(samples)))]
        hr, lr, maps = images.aligned_crop(s.hr, s.lr, {"labels": s.spe_labels, "cover": s.cover},
                                           hr_crop, scale, rng, flips=flips)
        hrs.append(images.to_tensor(hr))
        lrs.append(images.to_tensor(lr))
        spes.append(torch.from_numpy(s.spe_values[maps["labels"].astype(np.int64)])[None])
        covers.append(torch.from_numpy(maps["cover"].astype(np.float32))[None])
        cmax.append(s.cover_max)
        rms.append(s.noise_rms)
    return {
        "hr": torch.stack(hrs), "lr": torch.stack(lrs), "spe": torch.stack(spes), "cover": torch.stack(covers),
        "cover_max": torch.tensor(cmax, dtype=torch.float32), "noise_rms": torch.tensor(rms, dtype=torch.float32),
    }

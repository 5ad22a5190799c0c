"""SAM-DiffSR's structural position encoding E (METHOD.md §A), stored as a label map plus one value
per label, never as a dense float image: `values[labels]` is E.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from samsr.structure.masks import label_map

ROTARY_BASE = 10000.0


def rotary_position_map(height: int, width: int) -> np.ndarray:
    """P: rotary embedding of an all-ones (H,W) tensor -> (H,W) float64 in [-√2, √2] (METHOD.md §A step 1).

    Rows are positions h, columns feature dims; pair (2i, 2i+1) is rotated by h·θ_i with
    θ_i = 10000^(−2i/W), giving cos − sin and cos + sin; for odd W the last column stays 1.
    """
    if height < 1 or width < 1:
        raise ValueError(f"rotary_position_map needs a positive size, got {height}x{width}")
    pairs = width // 2
    theta = ROTARY_BASE ** (-2.0 * np.arange(pairs, dtype=np.float64) / width)
    angle = np.arange(height, dtype=np.float64)[:, None] * theta[None, :]    # (H, W//2)
    cos, sin = np.cos(angle), np.sin(angle)
    p = np.ones((height, width), dtype=np.float64)
    p[:, 0:2 * pairs:2] = cos - sin   # x1 cos − x2 sin with x1 = x2 = 1
    p[:, 1:2 * pairs:2] = cos + sin   # x1 sin + x2 cos
    return p


def encode(masks: Sequence[np.ndarray], predicted_iou: Sequence[float], *,
           shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """K masks (H,W) bool + their SAM IoU -> (labels (H,W) uint16, values (K+1,) float32); E = values[labels].

    Masks are sorted stably by predicted_iou, highest first; v_k = Σ_{p∈M_k} P(p) / (H·W) over the
    whole mask M_k; lower-IoU masks overwrite (METHOD.md §A steps 2–3); values[0] = 0 (uncovered).
    `shape` is needed only when there are no masks (then E ≡ 0).
    """
    ious = np.asarray(predicted_iou, dtype=np.float64).reshape(-1)
    if len(masks) != ious.size:
        raise ValueError(f"{len(masks)} masks but {ious.size} predicted_iou values; pass one score per mask")
    if np.isnan(ious).any():
        raise ValueError(f"predicted_iou holds NaN at {np.flatnonzero(np.isnan(ious)).tolist()}; pass finite scores")
    order = np.argsort(-ious, kind="stable")
    ordered = [masks[k] for k in order]
    labels = label_map(ordered, shape)                  # validates shapes and the uint16 limit
    h, w = labels.shape
    p = rotary_position_map(h, w)
    values = np.zeros(len(ordered) + 1, dtype=np.float64)
    for k, m in enumerate(ordered, start=1):
        values[k] = p[np.asarray(m, dtype=bool)].sum() / (h * w)
    return labels, values.astype(np.float32)


def spe_map(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(H,W) uint16 labels + (K+1,) values -> (H,W) float32 structure map E."""
    values = np.asarray(values, dtype=np.float32)
    top = int(labels.max()) if labels.size else 0
    if top >= values.size:
        raise ValueError(f"label map uses label {top} but only {values.size} values were given "
                         f"(labels 0..{values.size - 1}); pass the values from the same `encode` call")
    return values[labels]


__all__ = ["rotary_position_map", "encode", "spe_map"]

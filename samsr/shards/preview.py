"""Contact sheets for eyeballing mask quality at scale: HR thumbnails with coloured label overlays."""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image


def label_colours(n: int) -> np.ndarray:
    """(n,3) uint8 fixed colours per label (label 0 black = not drawn); no randomness."""
    k = np.arange(n, dtype=np.int64)[:, None]
    return ((k * np.array([97, 57, 151]) + np.array([40, 120, 200])) % 256).astype(np.uint8)


def overlay_thumbnail(hr: np.ndarray, labels: np.ndarray, max_side: int = 128, alpha: float = 0.5) -> np.ndarray:
    """(H,W,3) uint8 + (H,W) uint16 labels -> (h,w,3) uint8 thumbnail, covered pixels tinted by label."""
    step = max(1, math.ceil(max(hr.shape[:2]) / max_side))
    img = hr[::step, ::step].astype(np.float32)
    lab = labels[::step, ::step].astype(np.int64)
    colours = label_colours(int(lab.max()) + 1).astype(np.float32)
    covered = lab > 0
    img[covered] = (1 - alpha) * img[covered] + alpha * colours[lab[covered]]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def contact_sheet(thumbs: Sequence[np.ndarray], cell: int = 128, cols: int = 8, quality: int = 85) -> bytes:
    """Thumbnails (h,w,3) uint8 with h,w <= cell -> JPEG bytes of a grid, `cols` per row, grey gaps."""
    n = max(1, len(thumbs))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    pad = 2
    sheet = np.full((rows * (cell + pad) + pad, cols * (cell + pad) + pad, 3), 64, dtype=np.uint8)
    for i, t in enumerate(thumbs):
        r, c = divmod(i, cols)
        y, x = pad + r * (cell + pad), pad + c * (cell + pad)
        h, w = min(cell, t.shape[0]), min(cell, t.shape[1])
        sheet[y:y + h, x:x + w] = t[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


__all__ = ["label_colours", "overlay_thumbnail", "contact_sheet"]

"""The real photos that ship with our dependencies (scikit-image, matplotlib): no download, and the fixed
split every CPU recipe, the demo and the quickstart use (benchmarks/RESULTS.md "CPU recipe").

The split was fixed before any recipe was tried: natural photographs only (the micrographs and the
deep-field sky are not the kind of image users super-resolve, and their noise-like texture teaches a
small model to paint noise); HELD_OUT is never trained on nor used to choose a recipe; recipes were
tuned by training on TUNE_TRAIN and scoring TUNE_VAL, both inside TRAIN.
"""
from __future__ import annotations

import numpy as np

TRAIN = ("astronaut", "chelsea", "rocket", "retina", "coins", "clock", "brick", "grass", "gravel")
HELD_OUT = ("coffee", "camera", "moon", "grace_hopper")
TUNE_VAL = ("coins", "clock")
TUNE_TRAIN = tuple(name for name in TRAIN if name not in TUNE_VAL)
# what the throughput and speed benchmarks of 2026-11-23 used; they keep it so their numbers stay comparable
LEGACY_TRAIN = ("astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
MATPLOTLIB = {"grace_hopper": "grace_hopper.jpg"}


def bundled_photo(name: str) -> np.ndarray:
    """A real photo shipped with scikit-image (`skimage.data.<name>`) or matplotlib (`grace_hopper`), as
    (H,W,3) uint8 RGB; grayscale photos are repeated over the three channels."""
    if name in MATPLOTLIB:
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data(MATPLOTLIB[name]) as fh:
            img = np.asarray(Image.open(fh).convert("RGB"))
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    if img.ndim == 2:   # grayscale photos (camera, moon) as RGB
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


__all__ = ["TRAIN", "HELD_OUT", "TUNE_TRAIN", "TUNE_VAL", "bundled_photo"]

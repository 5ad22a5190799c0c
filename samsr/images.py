"""Image decoding, bicubic ×s down/up sampling and structure-preserving crops (DESIGN.md "images.py").

Decoding rejects bad inputs with an `ImageError` whose `reason` says which kind of bad; the pixel
limit is checked from the header before any pixel is decoded (decompression bombs). The LR image is
`y = down_s(x)` (bicubic, antialiased) and `y↑ = up_s(y)` (bicubic), METHOD.md notation.
"""
from __future__ import annotations

import contextlib
import io
import struct
import warnings
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = ("empty", "truncated", "corrupt", "too_large", "too_small", "unsupported")
# Raster formats we decode; others (EPS runs ghostscript, ICO/PSD/...) are `unsupported`.
FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF", "GIF", "PPM", "TGA", "JPEG2000", "AVIF"})


class ImageError(ValueError):
    """An input image that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}; use one of {REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---------------------------------------------------------------- decoding

def _check_size(w: int, h: int, label: str, scale: int, max_pixels: int, min_lr_side: int) -> None:
    if w * h > max_pixels:
        raise ImageError("too_large", f"{label} is {w}x{h} = {w * h} px, over the limit of {max_pixels} px "
                                      f"(raise data.max_pixels if this image is legitimate)")
    if min(w, h) // scale < min_lr_side:
        raise ImageError("too_small", f"{label} is {w}x{h}; its x{scale} LR would be "
                                      f"{w // scale}x{h // scale}, under the minimum side of {min_lr_side} px")


def _to_rgb8(img: Image.Image, label: str) -> np.ndarray:
    """Any PIL mode -> (H,W,3) uint8 RGB; alpha composited over white, high bit depths rescaled."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.min() >= 0 and a.max() <= 65535):
            a = a * (255.0 / 65535.0)            # 16-bit range: 65535 -> 255
        elif mode == "F" and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1:
            a = a * 255.0                        # float images in [0,1]
        else:
            raise ImageError("unsupported", f"{label}: mode {mode} with values in [{a.min()}, {a.max()}] "
                                            f"has no known 8-bit mapping; convert it to 8/16-bit first")
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    try:
        if has_alpha:
            rgba = np.asarray(img.convert("RGBA")).astype(np.uint32)
            rgb, alpha = rgba[..., :3], rgba[..., 3:]
            # over white: (c·a + 255·(255−a)) / 255, rounded
            return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported", f"{label}: cannot convert mode {mode} to RGB ({exc})") from exc


@contextlib.contextmanager
def _pil_errors(label: str, nbytes: int):
    """Map PIL's ways of failing on an input to ImageError(reason); ImageErrors pass through."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", f"{label}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("corrupt", f"{label} ({nbytes} bytes) is not an image PIL can identify") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        reason = "truncated" if "truncat" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
        raise ImageError(reason, f"{label} ({nbytes} bytes) failed to decode: {exc}") from exc


def _open(data: bytes, label: str) -> Image.Image:
    """PIL's lazy open (header only, no pixels) of a supported raster format."""
    if not data:
        raise ImageError("empty", f"{label} has 0 bytes")
    img = Image.open(io.BytesIO(data))
    if img.format not in FORMATS:
        raise ImageError("unsupported", f"{label} is {img.format}; supported: {', '.join(sorted(FORMATS))}")
    return img


def image_size(data: bytes, name: str = "") -> tuple[int, int]:
    """(width, height) as stored, read from the header alone: no pixel is decoded, so a size limit can
    be checked (or memory planned) before paying for a decode. Raises ImageError(reason)."""
    label = name or "image"
    with _pil_errors(label, len(data)):
        return _open(data, label).size


# What decoding costs in memory, so that a task can reserve enough for the largest image a size limit lets
# through (an out-of-memory kill would repeat on every retry). Measured peak RSS of a decode task (one
# core, 12-24 Mpx): the process's own footprint (interpreter, torch, PIL) of 565-576 MiB, plus per pixel
# 27.5 B for RGB PNG/JPEG (EXIF-rotated too), 30 B for 16-bit grey and 52 B for RGBA (alpha compositing
# in uint32). The reservation takes the worst case.
DECODE_BASE = 576 * 2**20
DECODE_BYTES_PER_PIXEL = 52
DECODE_MEMORY_MIN = 768 * 2**20


def decode_memory(max_pixels: int) -> int:
    """Bytes a decode task reserves when its images may have up to `max_pixels` px."""
    return max(DECODE_MEMORY_MIN, DECODE_BASE + DECODE_BYTES_PER_PIXEL * max_pixels)


def decode_image(data: bytes, *, scale: int = 4, max_pixels: int = 120_000_000, min_lr_side: int = 8,
                 name: str = "") -> np.ndarray:
    """Encoded bytes -> (H,W,3) uint8 RGB, EXIF orientation applied. Raises ImageError(reason).

    PIL's own bomb limit (2 × Image.MAX_IMAGE_PIXELS) also applies; its warning level is ignored
    in favour of `max_pixels`. Truncated files fail (LOAD_TRUNCATED_IMAGES is left off).
    """
    label = name or "image"
    with _pil_errors(label, len(data)):
        img = _open(data, label)
        _check_size(*img.size, label, scale, max_pixels, min_lr_side)    # header only
        img.load()
        img = ImageOps.exif_transpose(img)
    return _to_rgb8(img, label)


def crop_to_multiple(img: np.ndarray, scale: int) -> np.ndarray:
    """(H,W,...) -> (H - H%s, W - W%s, ...), top-left crop."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


# ---------------------------------------------------------------- tensors and resampling

def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 -> (3,H,W) float32 in [-1,1]."""
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"to_tensor expects (H,W,3) uint8, got {img.shape} {img.dtype}")
    arr = np.ascontiguousarray(img)
    if not arr.flags.writeable:   # e.g. Ray's zero-copy blocks: torch warns on read-only memory
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(3,H,W) or (B,3,H,W) in [-1,1] -> (H,W,3) or (B,H,W,3) uint8 (rounded, clamped)."""
    if t.ndim not in (3, 4):
        raise ValueError(f"to_uint8 expects (3,H,W) or (B,3,H,W), got shape {tuple(t.shape)}")
    u = t.detach().float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)   # one float copy, not four
    return u.movedim(-3, -1).cpu().numpy()


def _check_bchw(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} expects (B,C,H,W), got shape {tuple(x.shape)}")


def downscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B,3,H,W) in [-1,1] -> (B,3,H/s,W/s) in [-1,1]; bicubic, antialiased (METHOD.md `down`)."""
    _check_bchw(x, "downscale")
    h, w = x.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"downscale: {h}x{w} is not a multiple of scale {scale}; crop_to_multiple first")
    y = F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(-1, 1)


def upscale(y: torch.Tensor, scale: int) -> torch.Tensor:
    """(B,3,h,w) in [-1,1] -> (B,3,h*s,w*s) in [-1,1]; bicubic (METHOD.md `y↑`)."""
    _check_bchw(y, "upscale")
    h, w = y.shape[-2:]
    return F.interpolate(y, size=(h * scale, w * scale), mode="bicubic", align_corners=False).clamp(-1, 1)


def make_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """(H,W,3) uint8 HR, H and W multiples of s -> (H/s,W/s,3) uint8 LR, the one the shards store."""
    return to_uint8(downscale(to_tensor(hr)[None], scale))[0]


# ---------------------------------------------------------------- crops that keep geometry

def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """One of 8 flips/transposes of an (H,W,...) array: bit 0 hflip, bit 1 vflip, bit 2 transpose."""
    if k & 1:
        a = a[:, ::-1]
    if k & 2:
        a = a[::-1]
    if k & 4:
        a = a.swapaxes(0, 1)
    return np.ascontiguousarray(a)


def _crop(hr: np.ndarray, lr: np.ndarray, maps: Mapping[str, np.ndarray], size: int, scale: int,
          pick: Callable[[int, int], tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, dict]:
    if size % scale:
        raise ValueError(f"crop size {size} is not a multiple of scale {scale}")
    H, W = hr.shape[:2]
    if H % scale or W % scale or lr.shape[:2] != (H // scale, W // scale):
        raise ValueError(f"HR {hr.shape[:2]} and LR {lr.shape[:2]} do not match at scale {scale}; "
                         f"crop HR with crop_to_multiple and derive LR with make_lr")
    for key, m in maps.items():
        if m.shape[:2] != (H, W):
            raise ValueError(f"map {key!r} has shape {m.shape[:2]}, not the HR geometry {(H, W)}")
    if size > min(H, W):
        raise ImageError("too_small", f"HR image {W}x{H} is smaller than the {size}px crop")
    p = size // scale
    i, j, k = pick(H // scale - p, W // scale - p)       # LR top-left, dihedral choice
    hi, hj = i * scale, j * scale                        # the same window on the HR grid
    hr_c = _dihedral(hr[hi:hi + size, hj:hj + size], k)
    lr_c = _dihedral(lr[i:i + p, j:j + p], k)
    # maps live on the HR grid: HR coordinates, never LR ones (METHOD.md §A, the public code's bug)
    maps_c = {key: _dihedral(m[hi:hi + size, hj:hj + size], k) for key, m in maps.items()}
    return hr_c, lr_c, maps_c


def aligned_crop(hr: np.ndarray, lr: np.ndarray, maps: Mapping[str, np.ndarray], size: int, scale: int,
                 rng: np.random.Generator, flips: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Random LR-grid-aligned crop of HR (H,W,C), LR (H/s,W/s,C) and HR-sized maps (H,W[,C]).

    HR crop `size`, LR crop `size/s`; the same random dihedral flip (8 choices if `flips`) is applied
    to all. Draws from `rng`: LR row, LR column, then the flip index.
    """
    def pick(max_i: int, max_j: int) -> tuple[int, int, int]:
        i = int(rng.integers(0, max_i + 1))
        j = int(rng.integers(0, max_j + 1))
        return i, j, int(rng.integers(0, 8)) if flips else 0

    return _crop(hr, lr, maps, size, scale, pick)


def center_crop_aligned(hr: np.ndarray, lr: np.ndarray, maps: Mapping[str, np.ndarray], size: int,
                        scale: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Deterministic centred variant of `aligned_crop` (no flips), e.g. for validation."""
    return _crop(hr, lr, maps, size, scale, lambda max_i, max_j: (max_i // 2, max_j // 2, 0))


__all__ = [
    "ImageError", "REASONS", "FORMATS", "image_size", "decode_memory", "decode_image", "crop_to_multiple", "to_tensor", "to_uint8",
    "downscale", "upscale", "make_lr", "aligned_crop", "center_crop_aligned",
]

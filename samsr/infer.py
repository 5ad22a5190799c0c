"""Tiled inference with overlap blending, for images too large for one network call (DESIGN.md infer.py).

`infer.tile=0` (the default) is "auto": an LR of at most `infer.auto_tile` px a side (256: a 1024 px
output at ×4) runs in one pass, a larger one in tiles of that side, `infer.tile_batch` tiles per call.

For diffusion samplers the noise is one whole-image field per sampler step (`NoiseField`), cropped per
tile, so tiles share noise; each tile runs its own trajectory and outputs are blended with a window.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from samsr.config import InferConfig
from samsr.method import SRMethod

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), end exclusive
SRFn = Callable[[Tensor, list[Box]], Tensor]  # LR tiles (n,3,th,tw), their HR boxes -> (n,3,th*s,tw*s)

NOISE_BAND = 64  # HR rows per independently seeded band of a NoiseField


def _starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)  # last tile shifted inward
    return starts


def tile_boxes(h: int, w: int, tile: int, overlap: int) -> list[Box]:
    """Equal-size LR boxes (y0,x0,y1,x1) covering an h x w image, neighbours overlapping by >= overlap px."""
    if tile < 0 or overlap < 0:
        raise ValueError(f"tile={tile} and overlap={overlap} must be >= 0 (tile=0 means one pass)")
    if tile == 0 or (tile >= h and tile >= w):
        return [(0, 0, h, w)]
    if overlap >= tile:
        raise ValueError(f"overlap={overlap} must be smaller than tile={tile}")
    th, tw = min(tile, h), min(tile, w)
    return [(y, x, y + th, x + tw) for y in _starts(h, th, tile - overlap) for x in _starts(w, tw, tile - overlap)]


def _ramp(n: int, overlap: int) -> Tensor:
    """(n,) weights rising linearly over `overlap` px from each end, 1 in the middle, never 0."""
    i = torch.arange(n, dtype=torch.float32)
    if overlap <= 0:
        return torch.ones(n)
    edge = torch.minimum(i, n - 1 - i) + 0.5
    return (edge / overlap).clamp(max=1.0)


def blend_window(th: int, tw: int, overlap: int) -> Tensor:
    """(th,tw) positive blending weights in (0,1], ramping over `overlap` px at every edge."""
    return _ramp(th, overlap)[:, None] * _ramp(tw, overlap)[None, :]


def _seed(seed: int, step: int, band: int) -> int:
    digest = hashlib.sha256(f"samsr-noise:{seed}:{step}:{band}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class NoiseField:
    """Whole-image standard normal fields (B,3,H,W), one per sampler step, a pure function of (seed, step).

    The field is drawn in bands of NOISE_BAND rows, each from its own generator, so a crop draws only
    the rows it touches; every tile asking for the same (seed, step) sees the same field.
    """

    def __init__(self, seed: int, shape: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if len(shape) != 4:
            raise ValueError(f"NoiseField shape {tuple(shape)} must be (B,C,H,W)")
        self.seed, self.shape, self.device, self.dtype = seed, tuple(shape), torch.device(device), dtype

    def _rows(self, step: int, y0: int, y1: int) -> Tensor:
        b, c, h, w = self.shape
        bands = []
        for band in range(y0 // NOISE_BAND, (y1 - 1) // NOISE_BAND + 1):
            rows = min(NOISE_BAND, h - band * NOISE_BAND)
            gen = torch.Generator().manual_seed(_seed(self.seed, step, band))
            bands.append(torch.randn((b, c, rows, w), generator=gen))
        field = torch.cat(bands, 2)
        off = (y0 // NOISE_BAND) * NOISE_BAND
        return field[:, :, y0 - off:y1 - off]

    def full(self, step: int) -> Tensor:
        """(B,3,H,W) standard normal field of sampler step `step`."""
        return self._rows(step, 0, self.shape[2]).to(self.device, self.dtype)

    def crop(self, step: int, boxes_hr: Sequence[Box]) -> Tensor:
        """(n*B,3,th,tw): the field of `step` cut at each HR box, boxes stacked along the batch dim."""
        if any(y0 < 0 or x0 < 0 or y1 > self.shape[2] or x1 > self.shape[3] for y0, x0, y1, x1 in boxes_hr):
            raise ValueError(f"boxes {list(boxes_hr)} reach outside the field of size {self.shape[2]}x{self.shape[3]}")
        y0, y1 = min(b[0] for b in boxes_hr), max(b[2] for b in boxes_hr)
        shifted = [(by0 - y0, bx0, by1 - y0, bx1) for by0, bx0, by1, bx1 in boxes_hr]
        return _cut(self._rows(step, y0, y1), shifted).to(self.device, self.dtype)


def _scale_box(box: Box, scale: int) -> Box:
    return (box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale)


def _cut(x: Tensor, boxes: Sequence[Box]) -> Tensor:
    """(B,C,H,W) -> (n*B,C,th,tw): x cut at each box, stacked along the batch dim."""
    return torch.cat([x[:, :, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes], 0)


@torch.no_grad()
def tiled_super_resolve(sr_fn: SRFn, lr: Tensor, scale: int, tile: int, overlap: int, tile_batch: int) -> Tensor:
    """(1,3,h,w) -> (1,3,h*s,w*s): sr_fn on batches of LR tiles, window-weighted and normalised."""
    if lr.ndim != 4 or lr.shape[0] != 1:
        raise ValueError(f"tiled_super_resolve takes one image (1,3,h,w), got shape {tuple(lr.shape)}; loop over images")
    if tile_batch < 1:
        raise ValueError(f"tile_batch={tile_batch} must be >= 1")
    h, w = lr.shape[-2:]
    boxes = tile_boxes(h, w, tile, overlap)
    if len(boxes) == 1:
        return sr_fn(lr, [_scale_box(boxes[0], scale)])
    th, tw = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
    window = blend_window(th * scale, tw * scale, overlap * scale).to(lr.device, lr.dtype)
    out = lr.new_zeros(1, 3, h * scale, w * scale)
    weight = lr.new_zeros(1, 1, h * scale, w * scale)
    for i in range(0, len(boxes), tile_batch):
        chunk = boxes[i:i + tile_batch]
        boxes_hr = [_scale_box(b, scale) for b in chunk]
        sr = sr_fn(_cut(lr, chunk), boxes_hr)
        if tuple(sr.shape) != (len(chunk), 3, th * scale, tw * scale):
            raise ValueError(f"sr_fn returned shape {tuple(sr.shape)} for {len(chunk)} tiles of "
                             f"{th}x{tw}; expected ({len(chunk)},3,{th * scale},{tw * scale})")
        for k, (y0, x0, y1, x1) in enumerate(boxes_hr):
            out[:, :, y0:y1, x0:x1] += sr[k] * window
            weight[:, :, y0:y1, x0:x1] += window
    return out.div_(weight)             # in place: a large output is not held twice


def effective_tile(cfg: InferConfig) -> int:
    """The LR tile side `cfg` asks for: `tile` when set; else (`tile=0`, auto) `auto_tile`, which
    `tile_boxes` turns into one pass for an LR that fits in it and tiles of that side for a larger one,
    so a large image never becomes one huge activation map; 0 when both are 0 (always one pass)."""
    if cfg.tile < 0 or cfg.auto_tile < 0:
        raise ValueError(f"infer.tile={cfg.tile} and infer.auto_tile={cfg.auto_tile} must be >= 0")
    return cfg.tile or cfg.auto_tile


def super_resolve_image(method: SRMethod, lr: Tensor, cfg: InferConfig, *, cover: Tensor | None = None,
                        seed: int | None = None, maps: Mapping[str, Tensor] | None = None,
                        stats: Mapping[str, Tensor] | None = None) -> Tensor:
    """(1,3,h,w) in [-1,1] -> (1,3,h*s,w*s): tiled `method.super_resolve` sharing one NoiseField.

    `cover` and any other `maps` (1,C,h*s,w*s) are cut per tile with the HR boxes and passed by name;
    `stats` (1,) are whole-image statistics passed to every tile (SAMSR's cover_max, noise_rms: per-image
    statistics must come from the whole image, METHOD.md §B). `seed` defaults to cfg.seed.
    """
    s = method.scale
    space = getattr(method, "space", None)      # SAMSR may diffuse on a code grid (diffusion/space.py)
    channels, factor = (space.channels, space.factor) if space is not None else (3, 1)
    tile = effective_tile(cfg)
    tiled = bool(tile) and max(lr.shape[2], lr.shape[3]) > tile
    if factor > 1 and tiled and (tile * s % factor or cfg.overlap * s % factor):
        raise ValueError(f"LR tile side {tile} (infer.tile={cfg.tile}, infer.auto_tile={cfg.auto_tile}) and "
                         f"infer.overlap={cfg.overlap} times the scale {s} must be multiples of the space's "
                         f"factor {factor}")
    h, w = lr.shape[2] * s, lr.shape[3] * s
    field = NoiseField(cfg.seed if seed is None else seed, (1, channels, h // factor, w // factor),
                       lr.device, lr.dtype)
    maps = {**(maps or {}), **({} if cover is None else {"cover": cover})}
    stats = dict(stats or {})

    def sr_fn(tiles: Tensor, boxes_hr: list[Box]) -> Tensor:
        kwargs = {name: _cut(m, boxes_hr) for name, m in maps.items()}
        kwargs.update({name: v.reshape(1).repeat(len(boxes_hr)) for name, v in stats.items()})
        boxes_code = [tuple(c // factor for c in box) for box in boxes_hr]
        return method.super_resolve(tiles, noise_fn=lambda step: field.crop(step, boxes_code), **kwargs)

    return tiled_super_resolve(sr_fn, lr, s, tile, cfg.overlap, cfg.tile_batch)


def sam_inputs(y_up: np.ndarray, segmenter, soft: bool = False, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The SAMSR student's SAM inputs from y↑ (H,W,3) uint8 — coverage map (and soft noise scale) with
    their whole-image statistics — as keyword arguments of `super_resolve_image` (one SAM pass; the
    statistics come from the whole image also when tiling, METHOD.md §B)."""
    from samsr.data import lrup_maps
    from samsr.diffusion.samnoise import whole_image_stats

    cover, noise_scale = lrup_maps(y_up, segmenter, soft)
    maps = {} if noise_scale is None else {"noise_scale": torch.from_numpy(noise_scale)[None, None].to(device)}
    cover_max, noise_rms = whole_image_stats(cover, noise_scale)
    return {"cover": torch.from_numpy(cover.astype(np.float32))[None, None].to(device), "maps": maps,
            "stats": {"cover_max": torch.tensor([cover_max], device=device),
                      "noise_rms": torch.tensor([noise_rms], device=device)}}


def upscale_samples(method: SRMethod, lr: np.ndarray, cfg: InferConfig, seeds: Sequence[int | None], *,
                    segmenter=None, soft: bool = False, device: torch.device | str = "cpu") -> list[np.ndarray]:
    """One LR image (h,w,3) uint8 -> one SR (h*s,w*s,3) uint8 per seed, with tiled inference; a method
    that needs SAM at inference (`needs_sam`: the SAMSR student) gets one SAM pass over y↑ from
    `segmenter`, shared by all the samples."""
    from samsr import images
    from samsr.data import lr_upsampled

    kwargs: dict[str, Any] = {}
    if getattr(method, "needs_sam", False):
        if segmenter is None:
            raise ValueError("this SAMSR student segments y↑ at inference: pass segmenter= (its config's segmenter)")
        kwargs = sam_inputs(lr_upsampled(lr, method.scale), segmenter, soft, device)
    lr_t = images.to_tensor(lr)[None].to(device)
    with torch.no_grad():
        return [images.to_uint8(super_resolve_image(method, lr_t, cfg, seed=seed, **kwargs).float().cpu())[0]
                for seed in seeds]


def upscale_array(method: SRMethod, lr: np.ndarray, cfg: InferConfig, *, segmenter=None, soft: bool = False,
                  seed: int | None = None, device: torch.device | str = "cpu") -> np.ndarray:
    """One LR image (h,w,3) uint8 -> its SR (h*s,w*s,3) uint8: `upscale_samples` with one seed."""
    return upscale_samples(method, lr, cfg, [seed], segmenter=segmenter, soft=soft, device=device)[0]

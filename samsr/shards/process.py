"""The per-image work of the shard job, in two stages the job runs on different workers:
`decode_source` (CPU: decode, check, crop, LR) and `segment_members` (segmenter actor: masks, SPE,
coverage), plus `process_image`, both in one call (the bare loop and tests).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from samsr import images
from samsr.config import Config
from samsr.data import lr_upsampled, structure_from_records
from samsr.shards.format import dumps, lrup_members, png_bytes, structure_members
from samsr.structure import masks as masks_mod


@dataclass(frozen=True)
class Decoded:
    hr: np.ndarray      # (H,W,3) uint8, H and W multiples of the scale
    lr: np.ndarray      # (H/s,W/s,3) uint8, bicubic ÷s
    meta: dict          # source URI, sha256, sizes, crop box (no timings)


@dataclass(frozen=True)
class Failure:
    reason: str         # an ImageError reason, or "segment_error"
    message: str


def decode_source(uri: str, data: bytes, cfg: Config) -> Decoded:
    """Source bytes -> HR cropped to a multiple of the scale + its LR. Raises images.ImageError."""
    d = cfg.data
    full = images.decode_image(data, scale=d.scale, max_pixels=d.max_pixels, min_lr_side=d.min_lr_side, name=uri)
    hr = images.crop_to_multiple(full, d.scale)
    lr = images.make_lr(hr, d.scale)
    meta = {"source": uri, "source_sha256": hashlib.sha256(data).hexdigest(), "source_bytes": len(data),
            "decoded_size": [int(full.shape[1]), int(full.shape[0])],        # W, H after EXIF transpose
            "crop_box": [0, 0, int(hr.shape[1]), int(hr.shape[0])],          # x0, y0, x1, y1 on the decoded image
            "hr_size": [int(hr.shape[1]), int(hr.shape[0])], "lr_size": [int(lr.shape[1]), int(lr.shape[0])],
            "scale": d.scale}
    return Decoded(hr, lr, meta)


def image_members(dec: Decoded, cfg: Config) -> dict[str, bytes]:
    """`hr.png`, `lr.png` at `cfg.shard.png_compress_level` (CPU stage)."""
    level = cfg.shard.png_compress_level
    return {"hr.png": png_bytes(dec.hr, level), "lr.png": png_bytes(dec.lr, level)}


def segment_members(dec: Decoded, cfg: Config, segmenter, lrup_segmenter=None) -> tuple[dict[str, bytes], np.ndarray]:
    """HR masks + SPE (METHOD.md §A), y↑ masks + coverage (§B, if `cfg.shard.lrup_masks`), and the
    `json` meta with segmenter provenance -> (members, HR label map (H,W) uint16 for previews)."""
    level = cfg.shard.png_compress_level
    hr_records = segmenter.segment(dec.hr)
    labels, values = structure_from_records(hr_records, dec.hr.shape[:2])   # no masks: E ≡ 0
    members = structure_members(hr_records, labels, values, level)
    meta: dict[str, Any] = {**dec.meta, "segmenter": segmenter.provenance(), "hr_masks": len(hr_records)}
    if cfg.shard.lrup_masks:
        lrup_seg = lrup_segmenter or segmenter
        lrup_records = lrup_seg.segment(lr_upsampled(dec.lr, cfg.data.scale))
        cover = masks_mod.coverage([r.segmentation for r in lrup_records], dec.hr.shape[:2])
        members.update(lrup_members(lrup_records, cover, level))
        meta["lrup_segmenter"] = lrup_seg.provenance()
        meta["lrup_masks"] = len(lrup_records)
    members["json"] = dumps(meta)
    return members, labels


def process_image(uri: str, data: bytes, cfg: Config, segmenter, lrup_segmenter=None) -> dict[str, bytes] | Failure:
    """Source bytes -> all members of one sample (DESIGN.md "Shard format"), or a Failure for a bad image."""
    try:
        dec = decode_source(uri, data, cfg)
    except images.ImageError as exc:
        return Failure(exc.reason, str(exc))
    members, _ = segment_members(dec, cfg, segmenter, lrup_segmenter)
    return {**image_members(dec, cfg), **members}


__all__ = ["Decoded", "Failure", "decode_source", "image_members", "segment_members", "process_image"]


def write_shards_in_process(sources: Sequence[tuple[str, bytes]], output: str, cfg: Config, segmenter,
                            per_shard: int) -> list[str]:
    """Shard (relative key, image bytes) pairs in this process, no Ray, no plan or manifest: the
    samples the shard job would write, `per_shard` to a tar. For tests and benchmarks. Returns URIs."""
    from samsr import storage
    from samsr.shards.format import sample_key, tar_bytes
    from samsr.shards.plan import shard_name

    samples = []
    for key, data in sources:
        out = process_image(storage.join(output, "_src", key), data, cfg, segmenter)
        if isinstance(out, Failure):
            raise ValueError(f"{key}: {out.reason}: {out.message}")
        samples.append((sample_key(key), out))
    uris = []
    for i in range(0, len(samples), per_shard):
        uris.append(storage.join(output, shard_name(i // per_shard) + ".tar"))
        storage.write_bytes(uris[-1], tar_bytes(samples[i:i + per_shard]))
    return uris

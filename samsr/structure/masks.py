"""Segment masks as data: one record per mask, COCO RLE for storage, a deterministic order, the
label map (later masks overwrite earlier ones) and the coverage count C (METHOD.md §A, §B).

Shard members built from these (DESIGN.md "Shard format"): `*.masks.json` = `records_to_json`,
`*.hr.seg.png` = `label_map` of the ordered masks, `*.lrup.cover.png` = `coverage`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

MAX_LABELS = np.iinfo(np.uint16).max   # label 0 is "uncovered", so at most 65535 masks
JSON_DECIMALS = 6                      # scores are rounded so that the JSON is reproducible
MAX_MASK_PIXELS = 120_000_000          # bound on an RLE's size when the image's own size is not known
RLE_MAX_CHARS_PER_COUNT = 7            # 35 bits: any run of a mask within MAX_MASK_PIXELS


@dataclass(frozen=True, eq=False)   # eq by identity: an ndarray field makes field-wise == ambiguous
class MaskRecord:
    """One segment: `segmentation` (H,W) bool; scores None for non-SAM segments (superpixels)."""
    segmentation: np.ndarray
    predicted_iou: float | None
    stability_score: float | None
    bbox: tuple[int, int, int, int]    # x, y, w, h
    area: int


def _as_bool_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H,W) array, got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{what} of dtype {mask.dtype} holds values other than 0/1; pass a bool array")
        mask = mask.astype(bool)
    return mask


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(H,W) bool -> (x, y, w, h) of the tight box; (0, 0, 0, 0) for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return (0, 0, 0, 0)
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))


def record_from_mask(mask: np.ndarray, predicted_iou: float | None = None,
                     stability_score: float | None = None) -> MaskRecord:
    """(H,W) bool + optional scores -> MaskRecord with bbox and area computed from the mask."""
    mask = _as_bool_mask(mask)
    return MaskRecord(segmentation=mask, predicted_iou=predicted_iou, stability_score=stability_score,
                      bbox=bbox_of(mask), area=int(mask.sum()))


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """(H,W) bool -> COCO RLE `{"size": [H, W], "counts": str}` (JSON-ready)."""
    mask = _as_bool_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_counts(rle: Mapping[str, Any], shape: tuple[int, int] | None = None,
               max_pixels: int = MAX_MASK_PIXELS) -> tuple[tuple[int, int], np.ndarray]:
    """Check a COCO RLE before anything is allocated for it -> ((H, W), run lengths int64).

    `size` must be two non-negative ints, equal to `shape` when given (the image the mask belongs to),
    else at most `max_pixels` px. The compressed counts string is parsed here (pycocotools' own
    format: 6-bit chars from '0', 5 value bits + a continuation bit, deltas from the count two back
    from the fourth on), and its runs must be non-negative and add up to exactly H·W: pycocotools'
    decoder writes runs without bounds checks, so a crafted string would write past the mask.
    """
    try:
        size, counts = rle["size"], rle["counts"]
    except (KeyError, TypeError):
        raise ValueError(f"not a COCO RLE dict with 'size' and 'counts': {rle!r:.200}") from None
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise ValueError(f"RLE size must be [H, W] with non-negative ints, got {size!r:.100}")
    h, w = int(size[0]), int(size[1])
    if shape is not None and (h, w) != (int(shape[0]), int(shape[1])):
        raise ValueError(f"RLE size [{h}, {w}] is not the image's ({int(shape[0])}, {int(shape[1])})")
    if h * w > max_pixels:
        raise ValueError(f"RLE size [{h}, {w}] = {h * w} px is over the limit of {max_pixels} px")
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("RLE counts hold non-ASCII characters; not a COCO compressed RLE") from None
    if not isinstance(counts, bytes):
        raise ValueError(f"RLE counts must be the compressed str/bytes form, got {type(counts).__name__}")
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size and (c.min() < 0 or c.max() > 63):
        raise ValueError("RLE counts hold characters outside the COCO alphabet ('0'..'o')")
    ends = np.flatnonzero((c & 0x20) == 0)               # the last char of each number
    if c.size and (not ends.size or ends[-1] != c.size - 1):
        raise ValueError("RLE counts end inside a number; the string is cut short")
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    lengths = ends - starts + 1
    if lengths.size and lengths.max() > RLE_MAX_CHARS_PER_COUNT:
        raise ValueError(f"an RLE count spans {int(lengths.max())} chars; at most {RLE_MAX_CHARS_PER_COUNT} fit a run")
    shift = 5 * (np.arange(c.size, dtype=np.int64) - np.repeat(starts, lengths))
    x = np.add.reduceat((c & 0x1F) << shift, starts) if c.size else np.zeros(0, np.int64)
    negative = (c[ends] & 0x10) != 0 if c.size else np.zeros(0, bool)
    x = x - np.where(negative, np.int64(1) << (5 * lengths), 0)
    runs = x.copy()                                       # counts[i] += counts[i - 2] from i = 3 on:
    runs[1::2] = np.cumsum(x[1::2])                       # odd runs add up from counts[1],
    runs[2::2] = np.cumsum(x[2::2])                       # even ones from counts[2] (counts[0] stands alone)
    if runs.size and runs.min() < 0:
        raise ValueError("RLE counts decode to a negative run; not a valid COCO RLE")
    if int(runs.sum()) != h * w:
        raise ValueError(f"RLE runs cover {int(runs.sum())} px, not the {h}x{w} = {h * w} px of its size")
    return (h, w), runs


def rle_decode(rle: Mapping[str, Any], shape: tuple[int, int] | None = None,
               max_pixels: int = MAX_MASK_PIXELS) -> np.ndarray:
    """COCO RLE (counts as str or bytes) -> (H,W) bool, checked first by `rle_counts` (size equal to
    `shape` when given, else at most `max_pixels`; runs that tile the mask exactly)."""
    (h, w), _ = rle_counts(rle, shape, max_pixels)
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_utils.decode({"size": [h, w], "counts": counts}).astype(bool)


def _score(value: float | None) -> float:
    return -math.inf if value is None else float(value)


def _order_key(r: MaskRecord) -> tuple:
    # DESIGN.md mask order: predicted_iou desc, stability desc, area desc, bbox asc
    return (-_score(r.predicted_iou), -_score(r.stability_score), -r.area, tuple(r.bbox))


def order_records(records: Iterable[MaskRecord]) -> list[MaskRecord]:
    """Deterministic order: predicted_iou desc, stability desc, area desc, bbox asc (None = -inf).

    Records that tie on all of these are ordered by their mask bits, so the result never depends
    on the input order.
    """
    ranked = sorted(records, key=_order_key)
    out: list[MaskRecord] = []
    for _, group in itertools.groupby(ranked, key=_order_key):
        group = list(group)
        if len(group) > 1:
            group.sort(key=lambda r: np.packbits(r.segmentation).tobytes())
        out.extend(group)
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), JSON_DECIMALS)


def records_to_json(records: Sequence[MaskRecord]) -> list[dict[str, Any]]:
    """Records -> JSON-ready dicts (segmentation as COCO RLE, scores rounded to 6 decimals)."""
    return [{"segmentation": rle_encode(r.segmentation), "predicted_iou": _round(r.predicted_iou),
             "stability_score": _round(r.stability_score), "bbox": [int(v) for v in r.bbox],
             "area": int(r.area)} for r in records]


def records_from_json(items: Sequence[Mapping[str, Any]], shape: tuple[int, int] | None = None,
                      max_pixels: int = MAX_MASK_PIXELS) -> list[MaskRecord]:
    """Inverse of `records_to_json` (order kept as stored). Each RLE is checked before it is decoded
    (`rle_counts`): its size must be `shape` (the image the masks belong to) when given, else at most
    `max_pixels`; at most MAX_LABELS records."""
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"mask records must be a JSON list, got {type(items).__name__}")
    if len(items) > MAX_LABELS:
        raise ValueError(f"{len(items)} mask records, more than a label map holds ({MAX_LABELS})")
    out = []
    for i, item in enumerate(items):
        try:
            seg, bbox = item["segmentation"], item["bbox"]
            iou, stab, area = item["predicted_iou"], item["stability_score"], item["area"]
        except KeyError as err:
            raise ValueError(f"mask record {i} lacks the field {err.args[0]!r}; "
                             "expected segmentation, predicted_iou, stability_score, bbox, area") from None
        except TypeError:
            raise ValueError(f"mask record {i} is a {type(item).__name__}, not an object") from None
        try:
            if len(bbox) != 4:
                raise ValueError(f"bbox must be [x, y, w, h], got {bbox!r:.100}")
            record = MaskRecord(segmentation=rle_decode(seg, shape, max_pixels),
                                predicted_iou=None if iou is None else float(iou),
                                stability_score=None if stab is None else float(stab),
                                bbox=tuple(int(v) for v in bbox), area=int(area))
        except (ValueError, TypeError) as err:
            raise ValueError(f"mask record {i}: {err}") from None
        out.append(record)
    return out


def _check_masks(masks: Sequence[np.ndarray],
                 shape: tuple[int, int] | None) -> tuple[list[np.ndarray], tuple[int, int]]:
    masks = [_as_bool_mask(m, f"masks[{k}]") for k, m in enumerate(masks)]
    if shape is None:
        if not masks:
            raise ValueError("no masks and no shape: pass shape=(H, W) for an image without masks")
        shape = masks[0].shape
    shape = (int(shape[0]), int(shape[1]))
    for k, m in enumerate(masks):
        if m.shape != shape:
            raise ValueError(f"masks[{k}] has shape {m.shape}, expected {shape} like the others")
    return masks, shape


def label_map(masks: Sequence[np.ndarray], shape: tuple[int, int] | None = None) -> np.ndarray:
    """K masks (H,W) bool -> (H,W) uint16: label k+1 where masks[k] is the last mask covering p, 0 if none.

    `shape` is needed only when there are no masks.
    """
    masks, shape = _check_masks(masks, shape)
    if len(masks) > MAX_LABELS:
        raise ValueError(f"{len(masks)} masks do not fit a uint16 label map (at most {MAX_LABELS}); "
                         "raise the generator's thresholds or keep the top masks only")
    labels = np.zeros(shape, dtype=np.uint16)
    for k, m in enumerate(masks):
        labels[m] = k + 1   # METHOD.md §A: later (lower-IoU) masks overwrite
    return labels


def coverage(masks: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """K masks (H,W) bool -> (H,W) uint8 coverage C >= 1, saturating at 255 (METHOD.md §B).

    C(p) = Σ_k M_k(p) over the masks plus the background mask M_0 = 1 − union, i.e. +1 where none covers p.
    """
    masks, shape = _check_masks(masks, shape)
    count = np.zeros(shape, dtype=np.int32)
    for m in masks:
        count += m
    count += count == 0   # background mask M_0
    return np.minimum(count, 255).astype(np.uint8)


__all__ = ["MaskRecord", "MAX_LABELS", "MAX_MASK_PIXELS", "bbox_of", "record_from_mask", "rle_encode", "rle_counts",
           "rle_decode", "order_records", "records_to_json", "records_from_json", "label_map", "coverage"]

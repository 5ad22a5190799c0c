"""The stages of `samsr upscale`, as plain functions and one callable class that know nothing of Ray
(pipelines/upscale.py maps them over a Ray dataset; tests call them in one process):

1. `decode_row` (CPU task, one per input): read + decode -> the LR pixels, or status failed + reason.
   The size limit is checked from the header first, so an oversize image costs no decode.
2. `UpscaleModel` (actor pool, loads the model once): LR pixels -> SR pixels. Only model work happens
   here — the actor holds the GPU — and it times itself: `t_sr` (the model), `t_actor` (its whole call).
3. `encode_row` (CPU task, one per image): SR pixels -> PNG -> the output, written atomically.
4. `write_records` (CPU task, one per `rows_per_part` images): the batch's record rows -> one Parquet
   part under `<output>/_manifest/<run>/` (samsr.records) -> a single row of counts, all the driver gets.
"""
from __future__ import annotations

import time
from typing import Collection, Sequence

import numpy as np
import pyarrow as pa

from samsr import images, records, storage
from samsr.config import DataConfig
from samsr.shards.format import png_bytes

TIMINGS = ("t_read", "t_decode", "t_sr", "t_actor", "t_encode", "t_write")
RECORD_SCHEMA = pa.schema([(name, pa.string()) for name in ("input", "output", "status", "reason", "message")]
                          + [(name, pa.float64()) for name in TIMINGS])
ENCODE_BYTES_PER_PIXEL = 12      # an encode task holds the SR pixels, PIL's copy, the PNG and its input block


def output_size_error(w: int, h: int, scale: int, max_pixels: int, label: str) -> images.ImageError | None:
    """A `too_large` ImageError when a w×h LR would give an output over `max_pixels`, else None."""
    if w * h * scale * scale <= max_pixels:
        return None
    return images.ImageError("too_large", f"{label} is {w}x{h}; its x{scale} output would be {w * scale}x{h * scale} "
                                          f"= {w * h * scale * scale} px, over data.max_pixels={max_pixels} "
                                          "(raise it if the workers have the memory)")


def record(row: dict) -> dict:
    """The record columns of a row (RECORD_SCHEMA): what a part holds for one input."""
    return {name: (float(row.get(name) or 0.0) if name in TIMINGS else str(row.get(name) or ""))
            for name in RECORD_SCHEMA.names}


def decode_row(row: dict, max_pixels: int = DataConfig.max_pixels, scale: int = DataConfig.scale) -> dict:
    """Read + decode one input -> row with the LR pixels (`lr_raw`, h, w), or status failed + reason."""
    out = {**record(row), "lr_raw": b"", "h": 0, "w": 0}
    t0 = time.perf_counter()
    try:
        data = storage.read_bytes(row["input"])
    except storage.StorageError as exc:
        return {**out, "status": "failed", "reason": "read_error", "message": str(exc)}
    t1 = time.perf_counter()
    try:
        err = output_size_error(*images.image_size(data, row["input"]), scale, max_pixels, row["input"])
        if err is not None:
            raise err
        lr = images.decode_image(data, scale=1, max_pixels=max(1, max_pixels // scale ** 2), name=row["input"])
    except images.ImageError as exc:
        return {**out, "status": "failed", "reason": exc.reason, "message": str(exc), "t_read": t1 - t0}
    return {**out, "lr_raw": lr.tobytes(), "h": lr.shape[0], "w": lr.shape[1], "t_read": t1 - t0,
            "t_decode": time.perf_counter() - t1}


def _rows(batch: dict) -> list[dict]:
    n = len(next(iter(batch.values())))
    return [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()} for i in range(n)]


class UpscaleModel:
    """Loads the model (and a segmenter if it needs SAM) once; LR pixels in, SR pixels out (`sr_raw`,
    `sr_h`, `sr_w`). Rows that failed before pass through untouched; a failing image fails alone."""

    def __init__(self, model: str, model_overrides: Sequence[str], tracking_uri: str, threads: int = 1,
                 max_pixels: int = DataConfig.max_pixels) -> None:
        from pipelines.tracking.model import load_for_inference

        self.method, self.cfg, self.segmenter, self.device = load_for_inference(model, model_overrides,
                                                                                tracking_uri, threads)
        self.max_pixels = max_pixels

    def upscale(self, row: dict) -> dict:
        """One row -> its SR pixels, or status failed + reason."""
        from samsr.infer import upscale_array

        out = {**record(row), "sr_raw": b"", "sr_h": 0, "sr_w": 0}
        if row["status"]:
            return out
        h, w = int(row["h"]), int(row["w"])
        # the decode task checked the job's data.scale; the model's own scale decides the output
        err = output_size_error(w, h, self.method.scale, self.max_pixels, str(row["input"]))
        if err is not None:
            return {**out, "status": "failed", "reason": err.reason, "message": str(err)}
        try:                                # one bad image must not stop the batch; recorded per object
            t0 = time.perf_counter()
            lr = np.frombuffer(row["lr_raw"], np.uint8).reshape(h, w, 3)
            sr = upscale_array(self.method, lr, self.cfg.infer, segmenter=self.segmenter,
                               soft=self.cfg.resshift.soft_masks, device=self.device)
            return {**out, "sr_raw": sr.tobytes(), "sr_h": sr.shape[0], "sr_w": sr.shape[1],
                    "t_sr": time.perf_counter() - t0}
        except Exception as exc:
            return {**out, "status": "failed", "reason": "upscale_error", "message": f"{type(exc).__name__}: {exc}"[:2000]}

    def __call__(self, batch: dict) -> dict[str, list]:
        t0 = time.perf_counter()
        rows, own = [], []
        for row in _rows(batch):
            t_row = time.perf_counter()
            rows.append(self.upscale(row))
            own.append(time.perf_counter() - t_row)
        shared = (time.perf_counter() - t0 - sum(own)) / len(rows)   # unpacking the batch, shared by its rows
        for row, t_row in zip(rows, own):
            row["t_actor"] = t_row + shared
        return {k: [r[k] for r in rows] for k in rows[0]}


def encode_row(row: dict, level: int = 1) -> dict:
    """SR pixels -> PNG at `level` -> `row["output"]` (atomic write) -> the row's record, status ok; an
    error is recorded as write_error (a rerun retries it). The pixels go no further."""
    out = record(row)
    if out["status"]:
        return out
    t0 = time.perf_counter()
    try:
        sr = np.frombuffer(row["sr_raw"], np.uint8).reshape(int(row["sr_h"]), int(row["sr_w"]), 3)
        data = png_bytes(sr, level)
        t1 = time.perf_counter()
        storage.write_bytes(out["output"], data)
    except Exception as exc:
        return {**out, "status": "failed", "reason": "write_error", "message": f"{type(exc).__name__}: {exc}"[:2000]}
    return {**out, "status": "ok", "t_encode": t1 - t0, "t_write": time.perf_counter() - t1}


def write_records(batch: dict, folder: str, run: str, known_bad: Collection[str]) -> dict[str, list]:
    """A batch of record rows -> one Parquet part `<folder>/<run>/part-….parquet` -> its counts as one row
    (samsr.records.Tally). A write that still fails after the S3 client's retries fails the job: a record
    is never dropped in silence. A task Ray runs again (its node was lost) writes the same part again: the
    part's name comes from its rows."""
    rows = [record(row) for row in _rows(batch)]
    records.write_part(records.part_uri(folder, run, records.part_name(rows, "input")), rows, RECORD_SCHEMA)
    return {name: [value] for name, value in records.Tally(known_bad).add_rows(rows).as_dict().items()}


__all__ = ["decode_row", "UpscaleModel", "encode_row", "write_records", "record", "output_size_error",
           "RECORD_SCHEMA", "TIMINGS", "ENCODE_BYTES_PER_PIXEL"]

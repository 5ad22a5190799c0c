"""`samsr upscale`: batch super-resolution of a folder or S3 prefix with Ray Data (DESIGN.md "Batch upscale").

CPU tasks read and decode the inputs; an actor pool loads the model once per actor (a samsr checkpoint
or an MLflow model URI, on the actor's GPU when it has one), super-resolves each image with tiled
inference (one SAM pass over y↑ first for a SAMSR student, in the same actor), and writes the PNG
atomically. Each output key mirrors its input key under the output prefix (`a/b.jpg` -> `a/b.png`);
keys that would escape the prefix are refused. Outputs that exist are skipped unless `--overwrite`.
Bad inputs are recorded with their reason and the job goes on; `_manifest.jsonl` under the output has
one line per input (ok | skipped | failed, reason, timings).

Before any work (exit 2, one line): the output must not be, lie inside, or hold the input; the input
folder/bucket, the output bucket and the model must exist (an MLflow server must answer). Size limit:
an output may have at most `data.max_pixels` px, so an LR may have at most max_pixels / scale² (read
from its header, before decoding); larger ones are recorded as `too_large`. Exit codes
(samsr.locations): 0 when every good input has its output (now or from an earlier run) — inputs that
cannot be used (KNOWN_BAD: corrupt, too large, unsafe key…) are recorded, not failures; 1 when a good
input failed (read, model or write error: rerun to retry) or there was nothing to do.

    samsr upscale --model runs:/<run_id>/model --input s3://bucket/lr/ --output s3://bucket/sr/
    python -m pipelines.upscale --set upscale.model=... --set upscale.input=... --set upscale.output=...
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from pipelines import nodes
from pipelines.rayenv import (RowProgress, data_progress_bars, ensure_ray, entrypoint_parser, require_gpus,
                              run_entrypoint)
from samsr import config as config_mod
from samsr import images, locations, storage
from samsr.config import Config, DataConfig
from samsr.shards.format import png_bytes
from samsr.shards.plan import IMAGE_SUFFIXES

MANIFEST = "_manifest.jsonl"
MODEL_SECTIONS = ("infer.", "segmenter.")       # what --model-set may change in the model's own config
# reasons that mean "this input cannot be used": recorded, and not a failure of the job (a rerun would
# fail them again); any other failure (read_error, upscale_error, write_error) is one a rerun retries
KNOWN_BAD = (*images.REASONS, "unsafe_key", "output_collision")

log = logging.getLogger(__name__)


def lr_pixel_limit(data: DataConfig) -> int:
    """The largest LR whose ×scale output stays within `data.max_pixels`."""
    return max(1, data.max_pixels // data.scale ** 2)


def output_size_error(w: int, h: int, scale: int, max_pixels: int, label: str) -> images.ImageError | None:
    """A `too_large` ImageError when a w×h LR would give an output over `max_pixels`, else None."""
    if w * h * scale * scale <= max_pixels:
        return None
    return images.ImageError("too_large", f"{label} is {w}x{h}; its x{scale} output would be {w * scale}x{h * scale} "
                                          f"= {w * h * scale * scale} px, over data.max_pixels={max_pixels} "
                                          "(raise it if the workers have the memory)")


def output_key(key: str) -> str:
    """Input key -> output key: same path, `.png` suffix."""
    return str(PurePosixPath(key).with_suffix(".png"))


def plan(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Sorted listing -> (work items, manifest rows decided up front: unsafe keys, collisions, skips)."""
    uc = cfg.upscale
    listing = storage.list_files(uc.input, IMAGE_SUFFIXES)
    if uc.limit:
        listing = listing[:uc.limit]
    existing = set(storage.list_files(uc.output, (".png",)))     # a missing output lists as empty
    items, decided, claimed = [], [], {}
    for uri in listing:
        row = {"input": uri, "output": "", "status": "", "reason": "", "message": ""}
        try:
            key = output_key(storage.relative_key(uc.input, uri))
        except storage.StorageError as exc:
            decided.append({**row, "status": "failed", "reason": "unsafe_key", "message": str(exc)})
            continue
        out = storage.join(uc.output, key)
        row["output"] = out
        if out in claimed:
            decided.append({**row, "status": "failed", "reason": "output_collision",
                            "message": f"{claimed[out]} already maps to {out}"})
            continue
        claimed[out] = uri
        if out in existing and not uc.overwrite:
            decided.append({**row, "status": "skipped", "reason": "exists"})
            continue
        items.append(row)
    return items, decided


def decode_row(row: dict, max_pixels: int = DataConfig.max_pixels, scale: int = DataConfig.scale) -> dict:
    """Read + decode one input (CPU task) -> row with the LR pixels, or status failed + reason. The size
    limit is checked from the header first, so an oversize image costs no decode."""
    out = {**row, "lr_raw": b"", "h": 0, "w": 0, "t_read": 0.0, "t_decode": 0.0, "t_sr": 0.0, "t_write": 0.0}
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


class UpscaleActor:
    """Loads the model (and a segmenter if it needs SAM) once; super-resolves and writes each image."""

    def __init__(self, model: str, model_overrides: Sequence[str], tracking_uri: str, level: int,
                 threads: int = 1, max_pixels: int = DataConfig.max_pixels) -> None:
        from pipelines.tracking.model import load_for_inference

        self.method, self.cfg, self.segmenter, self.device = load_for_inference(model, model_overrides,
                                                                                tracking_uri, threads)
        self.level, self.max_pixels = level, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from samsr.infer import upscale_array

        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["input"]))]
        for row in rows:
            if row["status"]:
                continue
            h, w = int(row["h"]), int(row["w"])
            # the decode task checked the job's data.scale; the model's own scale decides the output
            err = output_size_error(w, h, self.method.scale, self.max_pixels, str(row["input"]))
            if err is not None:
                row.update(status="failed", reason=err.reason, message=str(err), lr_raw=b"")
                continue
            step = "upscale_error"
            try:                            # one bad image must not stop the batch; recorded per object
                t0 = time.perf_counter()
                lr = np.frombuffer(row["lr_raw"], np.uint8).reshape(h, w, 3)
                sr = upscale_array(self.method, lr, self.cfg.infer, segmenter=self.segmenter,
                                   soft=self.cfg.resshift.soft_masks, device=self.device)
                data = png_bytes(sr, self.level)
                t1, step = time.perf_counter(), "write_error"
                storage.write_bytes(str(row["output"]), data)
                row.update(status="ok", t_sr=t1 - t0, t_write=time.perf_counter() - t1)
            except Exception as exc:
                row.update(status="failed", reason=step, message=f"{type(exc).__name__}: {exc}"[:2000])
            row["lr_raw"] = b""
        return {k: [r[k] for r in rows] for k in rows[0]}


def check_model_overrides(overrides: Sequence[str]) -> None:
    for text in overrides:
        key, _ = config_mod.parse_override(text)
        if not key.startswith(MODEL_SECTIONS):
            raise config_mod.ConfigError(f"model override {key!r}: only {', '.join(s + '*' for s in MODEL_SECTIONS)} "
                                         "of the model's own config can change at inference")
    infer = config_mod.with_overrides(Config(), overrides).infer     # unknown keys, wrong types: here, not in an actor
    for name, least in (("tile", 0), ("auto_tile", 0), ("overlap", 0), ("tile_batch", 1)):
        if getattr(infer, name) < least:
            raise config_mod.ConfigError(f"infer.{name}={getattr(infer, name)} must be >= {least}")


def model_paths(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """The files a `--model-set` points the model at (a SAM checkpoint), for nodes.check_paths."""
    found = [config_mod.parse_override(text) for text in overrides]
    return [("the SAM checkpoint", str(value)) for key, value in found if key == "segmenter.checkpoint" and value]


def check_job(cfg: Config, model_overrides: Sequence[str] = ()) -> None:
    """Everything that can be wrong before any work, each as one line (ConfigError, LocationError or
    FileNotFoundError), in seconds: required settings, overlapping locations, a missing input folder or
    bucket, a missing output bucket, an unreachable S3 endpoint or MLflow server, a missing model."""
    from pipelines.tracking.model import check_model

    uc = cfg.upscale
    for name in ("model", "input", "output"):
        if not getattr(uc, name):
            raise config_mod.ConfigError(f"upscale.{name} is required (--{name})")
    check_model_overrides(model_overrides)
    locations.refuse_overlap(uc.input, uc.output, job="samsr upscale")
    locations.require_input(uc.input, "input")
    locations.require_output(uc.output, "output")
    check_model(uc.model, uc.tracking_uri or None)


def summarize(rows: Sequence[dict], seconds: float) -> dict[str, Any]:
    """Manifest rows -> counts: ok, skipped, failed = known_bad (recorded inputs) + failed_good (retry)."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped")}
    return {**counts, **locations.failure_counts(rows, KNOWN_BAD), "inputs": len(rows),
            "seconds": seconds, "images_per_s": counts["ok"] / seconds if seconds > 0 and counts["ok"] else 0.0}


def exit_code(stats: dict[str, Any]) -> int:
    """The shared policy: 0 when every good input has its output (written now or skipped as there)."""
    return locations.exit_code(done=stats["ok"] + stats["skipped"], failed_good=stats["failed_good"],
                               known_bad=stats["known_bad"])


def run(cfg: Config, model_overrides: Sequence[str] = (), echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Super-resolve `cfg.upscale.input` into `cfg.upscale.output`; returns counts and throughput."""
    import ray

    uc = cfg.upscale
    check_job(cfg, model_overrides)
    nodes.check_paths("samsr upscale", nodes.job_paths(           # a multi-node cluster: local paths refused or checked
        ("--input", uc.input), ("--output", uc.output), ("--model", uc.model),
        ("the tracking URI", uc.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")),
        *model_paths(model_overrides)), uc.shared_fs)
    t0 = time.perf_counter()
    items, rows = plan(cfg)
    if not items and not rows:
        print(f"samsr upscale: no images under {uc.input!r} (looked for {', '.join(IMAGE_SUFFIXES[:4])}, …); "
              "nothing written", file=sys.stderr)
        return summarize(rows, time.perf_counter() - t0)
    if items:
        ensure_ray()
        require_gpus("samsr upscale", uc.gpus_per_actor, uc.actors, "--gpus-per-actor 0", uc.gpu_wait_s)
        bars = data_progress_bars()       # before the dataset: it keeps a copy of the DataContext
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 10_000)))
        ds = ds.map(decode_row, fn_kwargs={"max_pixels": cfg.data.max_pixels, "scale": cfg.data.scale},
                    num_cpus=0.5, memory=images.decode_memory(lr_pixel_limit(cfg.data)))
        ds = ds.map_batches(UpscaleActor, fn_constructor_kwargs={
                                "model": uc.model, "model_overrides": list(model_overrides),
                                "tracking_uri": uc.tracking_uri, "level": uc.png_compress_level,
                                "threads": int(uc.cpus_per_actor), "max_pixels": cfg.data.max_pixels},
                            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=uc.actors),
                            num_cpus=uc.cpus_per_actor, num_gpus=uc.gpus_per_actor or None)
        progress = RowProgress(log, "samsr upscale", len(items), quiet=bars)
        for row in ds.iter_rows():
            rows.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items() if k != "lr_raw"})
            progress.add(rows[-1]["status"] not in ("ok", "skipped"))
    rows.sort(key=lambda r: r["input"])
    storage.write_text(storage.join(uc.output, MANIFEST), "".join(json.dumps(r) + "\n" for r in rows))
    stats = summarize(rows, time.perf_counter() - t0)
    echo(f"samsr upscale: {stats['ok']} written, {stats['skipped']} skipped (exist), {stats['failed']} failed "
         f"({stats['known_bad']} unusable inputs, {stats['failed_good']} errors to retry) of {len(rows)} inputs, "
         f"{stats['images_per_s']:.2f} images/s -> {uc.output} (see {MANIFEST})")
    return stats


__all__ = ["run", "plan", "check_job", "model_paths", "summarize", "exit_code", "output_key", "decode_row",
           "lr_pixel_limit", "output_size_error", "UpscaleActor", "MANIFEST", "KNOWN_BAD"]


def parser():
    """The entrypoint's arguments (`cluster/` manifests are checked against it)."""
    return entrypoint_parser("pipelines.upscale", __doc__.splitlines()[0], "upscale.input=s3://bucket/lr", model_set=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.upscale --set upscale.model=... --set upscale.input=... --set upscale.output=...`"""
    args = parser().parse_args(argv)
    return run_entrypoint("pipelines.upscale", lambda: exit_code(run(config_mod.load(args.config, args.overrides),
                                                                args.model_overrides)))


if __name__ == "__main__":
    sys.exit(main())

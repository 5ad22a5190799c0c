"""`samsr upscale`: batch super-resolution of a folder or S3 prefix with Ray Data (DESIGN.md "Batch upscale").

CPU tasks read and decode the inputs; an actor pool loads the model once per actor (a samsr checkpoint
or an MLflow model URI, on the actor's GPU when it has one), super-resolves each image with tiled
inference (one SAM pass over y↑ first for a SAMSR student, in the same actor), and writes the PNG
atomically. Each output key mirrors its input key under the output prefix (`a/b.jpg` -> `a/b.png`);
keys that would escape the prefix are refused. Outputs that exist are skipped unless `--overwrite`.
Bad inputs are recorded with their reason and the job goes on; `_manifest.jsonl` under the output has
one line per input (ok | skipped | failed, reason, timings).

    samsr upscale --model runs:/<run_id>/model --input s3://bucket/lr/ --output s3://bucket/sr/
    python -m pipelines.upscale --set upscale.model=... --set upscale.input=... --set upscale.output=...
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from pipelines.rayenv import ensure_ray, entrypoint_parser
from samsr import config as config_mod
from samsr import images, storage
from samsr.config import Config
from samsr.shards.format import png_bytes
from samsr.shards.plan import IMAGE_SUFFIXES

MANIFEST = "_manifest.jsonl"
MODEL_SECTIONS = ("infer.", "segmenter.")       # what --model-set may change in the model's own config
DECODE_MEMORY = 512 * 2**20


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


def decode_row(row: dict) -> dict:
    """Read + decode one input (CPU task) -> row with the LR pixels, or status failed + reason."""
    out = {**row, "lr_raw": b"", "h": 0, "w": 0, "t_read": 0.0, "t_decode": 0.0, "t_sr": 0.0, "t_write": 0.0}
    t0 = time.perf_counter()
    try:
        data = storage.read_bytes(row["input"])
    except storage.StorageError as exc:
        return {**out, "status": "failed", "reason": "read_error", "message": str(exc)}
    t1 = time.perf_counter()
    try:
        lr = images.decode_image(data, scale=1, name=row["input"])
    except images.ImageError as exc:
        return {**out, "status": "failed", "reason": exc.reason, "message": str(exc), "t_read": t1 - t0}
    return {**out, "lr_raw": lr.tobytes(), "h": lr.shape[0], "w": lr.shape[1], "t_read": t1 - t0,
            "t_decode": time.perf_counter() - t1}


class UpscaleActor:
    """Loads the model (and a segmenter if it needs SAM) once; super-resolves and writes each image."""

    def __init__(self, model: str, model_overrides: Sequence[str], tracking_uri: str, level: int,
                 threads: int = 1) -> None:
        from pipelines.mlflow_model import load_for_inference

        self.method, self.cfg, self.segmenter, self.device = load_for_inference(model, model_overrides,
                                                                                tracking_uri, threads)
        self.level = level

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from samsr.infer import upscale_array

        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["input"]))]
        for row in rows:
            if row["status"]:
                continue
            try:
                t0 = time.perf_counter()
                lr = np.frombuffer(row["lr_raw"], np.uint8).reshape(int(row["h"]), int(row["w"]), 3)
                sr = upscale_array(self.method, lr, self.cfg.infer, segmenter=self.segmenter,
                                   soft=self.cfg.resshift.soft_masks, device=self.device)
                t1 = time.perf_counter()
                storage.write_bytes(str(row["output"]), png_bytes(sr, self.level))
                row.update(status="ok", t_sr=t1 - t0, t_write=time.perf_counter() - t1)
            except Exception as exc:        # one bad image must not stop the batch; recorded per object
                row.update(status="failed", reason="upscale_error", message=f"{type(exc).__name__}: {exc}"[:2000])
            row["lr_raw"] = b""
        return {k: [r[k] for r in rows] for k in rows[0]}


def check_model_overrides(overrides: Sequence[str]) -> None:
    for text in overrides:
        key, _ = config_mod.parse_override(text)
        if not key.startswith(MODEL_SECTIONS):
            raise config_mod.ConfigError(f"model override {key!r}: only {', '.join(s + '*' for s in MODEL_SECTIONS)} "
                                         "of the model's own config can change at inference")


def run(cfg: Config, model_overrides: Sequence[str] = (), echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Super-resolve `cfg.upscale.input` into `cfg.upscale.output`; returns counts and throughput."""
    import ray

    uc = cfg.upscale
    for name in ("model", "input", "output"):
        if not getattr(uc, name):
            raise config_mod.ConfigError(f"upscale.{name} is required")
    check_model_overrides(model_overrides)
    from pipelines.mlflow_model import check_model

    check_model(uc.model, uc.tracking_uri or None)      # in seconds, before any listing or decoding
    t0 = time.perf_counter()
    items, rows = plan(cfg)
    if items:
        ensure_ray()
        gpus = uc.gpus_per_actor if ray.cluster_resources().get("GPU", 0) > 0 else 0
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 10_000)))
        ds = ds.map(decode_row, num_cpus=0.5, memory=DECODE_MEMORY)
        ds = ds.map_batches(UpscaleActor, fn_constructor_kwargs={
                                "model": uc.model, "model_overrides": list(model_overrides),
                                "tracking_uri": uc.tracking_uri, "level": uc.png_compress_level,
                                "threads": int(uc.cpus_per_actor)},
                            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=uc.actors),
                            num_cpus=uc.cpus_per_actor, num_gpus=gpus or None)
        for row in ds.iter_rows():
            rows.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items() if k != "lr_raw"})
    rows.sort(key=lambda r: r["input"])
    storage.write_text(storage.join(uc.output, MANIFEST), "".join(json.dumps(r) + "\n" for r in rows))
    seconds = time.perf_counter() - t0
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    stats = {**counts, "inputs": len(rows), "seconds": seconds,
             "images_per_s": counts["ok"] / seconds if seconds > 0 and counts["ok"] else 0.0}
    echo(f"samsr upscale: {counts['ok']} written, {counts['skipped']} skipped (exist), {counts['failed']} failed "
         f"of {len(rows)} inputs, {stats['images_per_s']:.2f} images/s -> {uc.output} (see {MANIFEST})")
    return stats


__all__ = ["run", "plan", "output_key", "decode_row", "UpscaleActor", "MANIFEST"]


def parser():
    """The entrypoint's arguments (`cluster/` manifests are checked against it)."""
    return entrypoint_parser("pipelines.upscale", __doc__.splitlines()[0], "upscale.input=s3://bucket/lr", model_set=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.upscale --set upscale.model=... --set upscale.input=... --set upscale.output=...`"""
    args = parser().parse_args(argv)
    stats = run(config_mod.load(args.config, args.overrides), args.model_overrides)
    return 0 if stats["failed"] == 0 or stats["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())


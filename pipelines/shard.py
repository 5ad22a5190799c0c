"""`samsr shard`: images (folder | s3://) -> WebDataset shards with HR, LR, SAM masks, SPE and coverage.

Main path: `run(cfg)` plans (sorted listing -> shard ids, `_plan.json`), skips shards whose manifest
exists (resume), then streams Ray Data: CPU tasks read + decode + make LR (`samsr.shards.process.
decode_source`), an actor pool loads the segmenter once per actor and computes masks + SPE + coverage
(`segment_members`), and the driver's `ShardWriter` buffers rows per shard id and writes each shard
when all its planned samples arrived. `python -m pipelines.shard` is the `ray job submit` entry.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from pipelines.rayenv import ensure_ray, entrypoint_parser
from samsr import config as config_mod
from samsr import storage
from samsr.config import Config
from samsr.images import ImageError
from samsr.shards import format as fmt
from samsr.shards import plan as plan_mod
from samsr.shards import preview
from samsr.shards import process

MEMBER_COLUMNS = {name: "m_" + name.replace(".", "_") for name in fmt.MEMBERS_HR + fmt.MEMBERS_LRUP}
DECODE_MEMORY = 768 * 2**20   # bytes reserved per decode task: a 2040x1356 decode peaked at 530-565 MiB


# ---------------------------------------------------------------- stage 1: read + decode (CPU tasks)

def _empty_row(item: dict) -> dict:
    row = {"uri": item["uri"], "key": item["key"], "shard": int(item["shard"]), "index": int(item["index"]),
           "status": "ok", "reason": "", "message": "", "hr_raw": b"", "lr_raw": b"", "hr_h": 0, "hr_w": 0,
           "meta": "", "thumb": b"", "t_read": 0.0, "t_decode": 0.0, "t_segment": 0.0}
    row.update({col: b"" for col in MEMBER_COLUMNS.values()})
    return row


def decode_row(item: dict, cfg_dict: dict) -> dict:
    """Plan entry -> row with HR/LR raw bytes and hr.png/lr.png, or status=failed + reason."""
    import torch

    torch.set_num_threads(1)
    cfg = config_mod.from_dict(cfg_dict)
    row = _empty_row(item)
    t0 = time.perf_counter()
    try:
        data = storage.read_bytes(item["uri"])
    except storage.StorageError as exc:
        row.update(status="failed", reason="read_error", message=str(exc))
        return row
    t1 = time.perf_counter()
    try:
        dec = process.decode_source(item["uri"], data, cfg)
    except ImageError as exc:
        row.update(status="failed", reason=exc.reason, message=str(exc), t_read=t1 - t0)
        return row
    for name, blob in process.image_members(dec, cfg).items():
        row[MEMBER_COLUMNS[name]] = blob
    row.update(hr_raw=dec.hr.tobytes(), lr_raw=dec.lr.tobytes(), hr_h=dec.hr.shape[0], hr_w=dec.hr.shape[1],
               meta=json.dumps(dec.meta), t_read=t1 - t0, t_decode=time.perf_counter() - t1)
    return row


# ---------------------------------------------------------------- stage 2: segmenter actor pool

class SegmentActor:
    """Loads the segmenter once; per batch: masks + SPE + coverage members and a preview thumbnail."""

    def __init__(self, cfg_dict: dict) -> None:
        import torch

        from samsr.structure.segmenters import build_segmenter

        torch.set_num_threads(1)
        self.cfg = config_mod.from_dict(cfg_dict)
        self.segmenter = build_segmenter(self.cfg.segmenter)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        s = self.cfg.data.scale
        out: dict[str, list] = {k: [] for k in batch if k not in ("hr_raw", "lr_raw")}
        for i in range(len(batch["uri"])):
            row = {k: batch[k][i] for k in out}
            if row["status"] == "ok":
                h, w = int(row["hr_h"]), int(row["hr_w"])
                hr = np.frombuffer(batch["hr_raw"][i], np.uint8).reshape(h, w, 3)
                lr = np.frombuffer(batch["lr_raw"][i], np.uint8).reshape(h // s, w // s, 3)
                dec = process.Decoded(hr, lr, json.loads(row["meta"]))
                t0 = time.perf_counter()
                try:
                    members, labels = process.segment_members(dec, self.cfg, self.segmenter)
                except Exception as exc:   # recorded per sample; the job goes on
                    row.update(status="failed", reason="segment_error", message=f"{type(exc).__name__}: {exc}")
                else:
                    for name, blob in members.items():
                        row[MEMBER_COLUMNS[name]] = blob
                    row["thumb"] = fmt.png_bytes(preview.overlay_thumbnail(hr, labels), 1)
                row["t_segment"] = time.perf_counter() - t0
            for k in out:
                out[k].append(row[k])
        return out


# ---------------------------------------------------------------- the writer (driver)

def _member_dict(row: dict) -> dict[str, bytes]:
    return {name: bytes(row[col]) for name, col in MEMBER_COLUMNS.items() if len(row[col])}


class ShardWriter:
    """Buffers rows per shard id; writes tar, preview, then manifest once all planned samples arrived."""

    def __init__(self, output: str, plan: plan_mod.Plan, todo: list[int], write_preview: bool,
                 fail_after_shards: int | None = None) -> None:
        self.output, self.plan, self.write_preview = output, plan, write_preview
        self.pending: dict[int, dict[int, dict]] = {sid: {} for sid in todo}
        self.written: list[int] = []
        self.fail_after_shards = fail_after_shards

    def add(self, row: dict) -> None:
        sid = int(row["shard"])
        buf = self.pending[sid]
        buf[int(row["index"])] = row
        if len(buf) == len(self.plan.shards[sid]):
            self._write(sid, [buf[i] for i in sorted(buf)])
            del self.pending[sid]

    def _write(self, sid: int, rows: list[dict]) -> None:
        name = plan_mod.shard_name(sid)
        ok = [r for r in rows if r["status"] == "ok"]
        tar = fmt.tar_bytes((r["key"], _member_dict(r)) for r in ok)
        storage.write_bytes(storage.join(self.output, f"{name}.tar"), tar)
        if self.write_preview and ok:
            thumbs = [fmt.png_array(bytes(r["thumb"])) for r in ok if len(r["thumb"])]
            storage.write_bytes(storage.join(self.output, "_preview", f"{name}.jpg"), preview.contact_sheet(thumbs))
        metas = [json.loads(bytes(r["m_json"])) for r in ok]
        manifest = {
            "shard": name, "tar": f"{name}.tar", "tar_bytes": len(tar), "ok": len(ok), "failed": len(rows) - len(ok),
            "segmenter": metas[0]["segmenter"] if metas else None,
            "samples": [{"key": r["key"], "uri": r["uri"], "status": r["status"], "reason": r["reason"] or None,
                         "message": r["message"] or None, "t_read": round(float(r["t_read"]), 4),
                         "t_decode": round(float(r["t_decode"]), 4), "t_segment": round(float(r["t_segment"]), 4)}
                        for r in rows]}
        storage.write_bytes(storage.join(self.output, "_manifest", f"{name}.json"), fmt.dumps(manifest))
        self.written.append(sid)
        if self.fail_after_shards is not None and len(self.written) >= self.fail_after_shards:
            raise RuntimeError(f"test hook: failing after {len(self.written)} shard(s) as asked")


# ---------------------------------------------------------------- plan, resume, stats

def load_or_build_plan(cfg: Config) -> plan_mod.Plan:
    """The saved `_plan.json` (checked against cfg) or a new plan, written first."""
    uri = storage.join(cfg.shard.output, "_plan.json")
    if storage.exists(uri):
        saved = plan_mod.plan_from_json(storage.read_bytes(uri))
        plan_mod.check_rerun(saved, cfg)
        return saved
    plan = plan_mod.build_plan(cfg)
    storage.write_bytes(uri, plan_mod.plan_to_json(plan))
    return plan


def done_shards(output: str) -> set[str]:
    """Shard names whose manifest exists (written last, so their tar is whole)."""
    return {os.path.basename(u)[:-5] for u in storage.list_files(storage.join(output, "_manifest"), [".json"])}


def _write_totals(cfg: Config, plan: plan_mod.Plan, written: int, images_now: int, seconds: float) -> dict:
    manifests = [json.loads(storage.read_bytes(storage.join(cfg.shard.output, "_manifest", f"{plan_mod.shard_name(i)}.json")))
                 for i in range(len(plan.shards))]
    failures = [{"uri": r["uri"], "key": None, "shard": None, "reason": r["reason"], "message": r["message"]}
                for r in plan.rejected]
    for m in manifests:
        failures += [{"uri": s["uri"], "key": s["key"], "shard": m["shard"], "reason": s["reason"],
                      "message": s["message"]} for s in m["samples"] if s["status"] != "ok"]
    storage.write_bytes(storage.join(cfg.shard.output, "failures.jsonl"),
                        b"".join(fmt.dumps(f) + b"\n" for f in failures))
    stats = {"images_planned": plan.num_images + len(plan.rejected), "ok": sum(m["ok"] for m in manifests),
             "failed": len(failures), "shards": len(manifests), "bytes": sum(m["tar_bytes"] for m in manifests),
             "shards_written_this_run": written, "images_this_run": images_now,
             "seconds_this_run": round(seconds, 3),
             "images_per_s_this_run": round(images_now / seconds, 4) if seconds > 0 and images_now else 0.0,
             "segmenter": next((m["segmenter"] for m in manifests if m["segmenter"]), None),
             "config": config_mod.to_dict(cfg)}
    storage.write_bytes(storage.join(cfg.shard.output, "_stats.json"), fmt.dumps(stats))
    return stats


def _stream(cfg: Config, plan: plan_mod.Plan, todo: list[int], writer: ShardWriter) -> None:
    import ray

    sc = cfg.shard
    items = [{"uri": e.uri, "key": e.key, "shard": sid, "index": i}
             for sid in todo for i, e in enumerate(plan.shards[sid])]
    cfg_dict = config_mod.to_dict(cfg)
    gpus = sc.gpus_per_actor if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), math.ceil(len(items) / sc.batch_size), 10_000)))
    # `memory` (a decode holds a few copies of a 2K image) also keeps Ray from fusing decode into the actors
    ds = ds.map(decode_row, fn_kwargs={"cfg_dict": cfg_dict}, num_cpus=0.5, memory=DECODE_MEMORY)
    ds = ds.map_batches(SegmentActor, fn_constructor_kwargs={"cfg_dict": cfg_dict}, batch_size=sc.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=sc.actors),
                        num_cpus=sc.cpus_per_actor, num_gpus=gpus or None)
    for row in ds.iter_rows():
        writer.add(row)
    if writer.pending:
        raise RuntimeError(f"the stream ended with shards incomplete: {sorted(writer.pending)[:10]}")


def run(cfg: Config, *, dry_run: bool = False, fail_after_shards: int | None = None,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Shard `cfg.shard.input` into `cfg.shard.output`; returns the `_stats.json` dict (or the dry-run plan)."""
    if not cfg.shard.output and not dry_run:
        raise ValueError("shard.output is empty; pass --output DIR or s3://bucket/prefix")
    if dry_run:
        from pipelines.shard_dryrun import dry_run as do_dry_run

        return do_dry_run(cfg, echo)
    t0 = time.perf_counter()
    plan = load_or_build_plan(cfg)
    done = done_shards(cfg.shard.output)
    todo = [i for i in range(len(plan.shards)) if plan_mod.shard_name(i) not in done]
    writer = ShardWriter(cfg.shard.output, plan, todo, cfg.shard.preview, fail_after_shards)
    if todo:
        ensure_ray()
        _stream(cfg, plan, todo, writer)
    seconds = time.perf_counter() - t0
    stats = _write_totals(cfg, plan, len(writer.written), sum(len(plan.shards[i]) for i in todo), seconds)
    echo(f"samsr shard: {stats['ok']} images ok, {stats['failed']} failed, {stats['shards']} shards "
         f"({len(writer.written)} written now, {len(done)} already there), "
         f"{stats['images_per_s_this_run']:.2f} images/s, {stats['bytes'] / 1e6:.1f} MB -> {cfg.shard.output}")
    return stats


def parser():
    """The entrypoint's arguments (`cluster/` manifests are checked against it)."""
    p = entrypoint_parser("pipelines.shard", __doc__.splitlines()[0], "shard.input=s3://bucket/images")
    p.add_argument("--dry-run", action="store_true", help="segment a small sample and print the plan only")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.shard --config PRESET --set shard.input=... --set shard.output=...` (ray job submit)."""
    args = parser().parse_args(argv)
    run(config_mod.load(args.config, args.overrides), dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())

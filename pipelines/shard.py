"""`samsr shard`: images (folder | s3://) -> WebDataset shards with HR, LR, SAM masks, SPE and coverage.

Main path: `run(cfg)` plans (sorted listing -> shard ids, `_plan.json`), skips shards whose manifest
exists (resume), then streams Ray Data: CPU tasks read + decode + make LR (`samsr.shards.process.
decode_source`), an actor pool loads the segmenter once per actor and computes masks + SPE + coverage
(`segment_members`), and the driver's `ShardWriter` buffers rows per shard id and writes each shard
when all its planned samples arrived. `python -m pipelines.shard` is the `ray job submit` entry.

Before any work (one line, exit 2): settings that cannot work (samples_per_shard < 1, ...), an output
that is, lies inside or holds the input, a missing input folder/bucket, a missing output bucket, an
unreachable S3 endpoint. An input without images: one line, exit 1, nothing written. Resume: see
`pipelines.shard_resume` (finished shards are verified by size + sha256, and rebuilt when they differ).
Exit codes (samsr.locations): 0 when every good image is in a shard (unusable ones are recorded in the
manifests and failures.jsonl); 1 when a good image failed (read or segmenter error: rerun to retry)
or no image at all is in a shard.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from typing import Any, Callable

import numpy as np

from pipelines import shard_resume as resume
from pipelines.rayenv import ensure_ray, entrypoint_parser, require_gpus, run_entrypoint
from samsr import config as config_mod
from samsr import images, locations, redact, storage
from samsr.config import Config
from samsr.images import ImageError
from samsr.shards import format as fmt
from samsr.shards import plan as plan_mod
from samsr.shards import preview
from samsr.shards import process

MEMBER_COLUMNS = {name: "m_" + name.replace(".", "_") for name in fmt.MEMBERS_HR + fmt.MEMBERS_LRUP}
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
        metas = {r["key"]: json.loads(bytes(r["m_json"])) for r in ok}
        manifest = {
            "shard": name, "tar": f"{name}.tar", "tar_bytes": len(tar), "tar_sha256": hashlib.sha256(tar).hexdigest(),
            "ok": len(ok), "failed": len(rows) - len(ok),
            "segmenter": next(iter(metas.values()))["segmenter"] if metas else None,
            "samples": [{"key": r["key"], "uri": r["uri"], "status": r["status"], "reason": r["reason"] or None,
                         "message": r["message"] or None, "hr_masks": metas.get(r["key"], {}).get("hr_masks"),
                         "lrup_masks": metas.get(r["key"], {}).get("lrup_masks"),
                         "t_read": round(float(r["t_read"]), 4), "t_decode": round(float(r["t_decode"]), 4),
                         "t_segment": round(float(r["t_segment"]), 4)}
                        for r in rows]}
        storage.write_bytes(storage.join(self.output, "_manifest", f"{name}.json"), fmt.dumps(manifest))
        self.written.append(sid)
        if self.fail_after_shards is not None and len(self.written) >= self.fail_after_shards:
            raise RuntimeError(f"test hook: failing after {len(self.written)} shard(s) as asked")


# ---------------------------------------------------------------- plan, resume, stats

def check_job(cfg: Config, dry_run: bool = False) -> None:
    """Everything that can be wrong before any work, each as one line (ConfigError or LocationError),
    in seconds: settings that cannot work, overlapping input and output, a missing input folder or
    bucket, a missing output bucket, an unreachable S3 endpoint."""
    sc, ConfigError = cfg.shard, config_mod.ConfigError
    for name, value, least in (("shard.samples_per_shard", sc.samples_per_shard, 1),
                               ("shard.batch_size", sc.batch_size, 1), ("shard.actors", sc.actors, 1),
                               ("shard.limit", sc.limit, 0), ("data.max_pixels", cfg.data.max_pixels, 1)):
        if value < least:
            raise ConfigError(f"{name}={value} must be >= {least}")
    if not 0 <= sc.png_compress_level <= 9:
        raise ConfigError(f"shard.png_compress_level={sc.png_compress_level} must lie in 0..9")
    if cfg.segmenter.kind == "sam" and not cfg.segmenter.checkpoint:
        raise ConfigError("segmenter.kind=sam needs a SAM checkpoint: pass --sam-checkpoint PATH|s3://... "
                          "(or --segmenter superpixel, the non-SAM fallback)")
    if not sc.input:
        raise ConfigError("shard.input is required (--input DIR or s3://bucket/prefix)")
    if not sc.output and not dry_run:
        raise ConfigError("shard.output is required (--output DIR or s3://bucket/prefix) unless --dry-run")
    if sc.output:
        locations.refuse_overlap(sc.input, sc.output, job="samsr shard")
    locations.require_input(sc.input, "input")
    if storage.is_s3(cfg.segmenter.checkpoint):
        locations.require_input(cfg.segmenter.checkpoint, "SAM checkpoint")
    if sc.output and not dry_run:
        locations.require_output(sc.output, "output")


def load_or_build_plan(cfg: Config) -> tuple[plan_mod.Plan, list[str]]:
    """The saved `_plan.json` (checked against cfg) and the listed images it lacks (added to the input
    since; a plan is never extended), or a new plan, written first unless the input holds no image."""
    uri = storage.join(cfg.shard.output, "_plan.json")
    if storage.exists(uri):
        saved = plan_mod.plan_from_json(storage.read_bytes(uri))
        plan_mod.check_rerun(saved, cfg)
        return saved, plan_mod.new_inputs(saved, plan_mod.list_images(saved.input, cfg.shard.limit))
    plan = plan_mod.build_plan(cfg)
    if plan.num_images or plan.rejected:
        storage.write_bytes(uri, plan_mod.plan_to_json(plan))
    return plan, []


def _write_totals(cfg: Config, plan: plan_mod.Plan, written: int, images_now: int, seconds: float,
                  extra: dict | None = None) -> dict:
    manifests = [json.loads(storage.read_bytes(storage.join(cfg.shard.output, "_manifest", f"{plan_mod.shard_name(i)}.json")))
                 for i in range(len(plan.shards))]
    failures = [{"uri": r["uri"], "key": None, "shard": None, "reason": r["reason"], "message": r["message"]}
                for r in plan.rejected]
    for m in manifests:
        failures += [{"uri": s["uri"], "key": s["key"], "shard": m["shard"], "reason": s["reason"],
                      "message": s["message"]} for s in m["samples"] if s["status"] != "ok"]
    storage.write_bytes(storage.join(cfg.shard.output, "failures.jsonl"),
                        b"".join(fmt.dumps(f) + b"\n" for f in failures))
    known_bad = sum(f["reason"] in resume.KNOWN_BAD for f in failures)
    samples = [s for m in manifests for s in m["samples"] if s["status"] == "ok"]
    stats = {"images_planned": plan.num_images + len(plan.rejected), "ok": sum(m["ok"] for m in manifests),
             "failed": len(failures), "known_bad": known_bad, "failed_good": len(failures) - known_bad,
             "no_masks": {"hr": sum(s.get("hr_masks") == 0 for s in samples),      # all-background E ≡ 0
                          "lrup": sum(s.get("lrup_masks") == 0 for s in samples)},  # coverage C ≡ 1
             "shards": len(manifests), "bytes": sum(m["tar_bytes"] for m in manifests),
             **(extra or {}),
             "shards_written_this_run": written, "images_this_run": images_now,
             "seconds_this_run": round(seconds, 3),
             "images_per_s_this_run": round(images_now / seconds, 4) if seconds > 0 and images_now else 0.0,
             "segmenter": next((m["segmenter"] for m in manifests if m["segmenter"]), None),
             "config": redact.redact_config(cfg)}          # no userinfo / signatures in URIs
    storage.write_bytes(storage.join(cfg.shard.output, "_stats.json"), fmt.dumps(stats))
    return stats


def _stream(cfg: Config, plan: plan_mod.Plan, todo: list[int], writer: ShardWriter,
            echo: Callable[[str], None] = print) -> None:
    import ray

    sc = cfg.shard
    memory = images.decode_memory(cfg.data.max_pixels)
    biggest = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if 0 < biggest < memory:
        echo(f"samsr shard: warning: data.max_pixels={cfg.data.max_pixels} makes each decode task reserve "
             f"{memory / 2**30:.1f} GiB, more than the largest Ray node offers ({biggest / 2**30:.1f} GiB): decodes "
             "wait for a larger node; lower data.max_pixels to shard on these nodes")
    items = [{"uri": e.uri, "key": e.key, "shard": sid, "index": i}
             for sid in todo for i, e in enumerate(plan.shards[sid])]
    cfg_dict = config_mod.to_dict(cfg)
    require_gpus("samsr shard", sc.gpus_per_actor, sc.actors, "--gpus-per-actor 0", sc.gpu_wait_s)
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), math.ceil(len(items) / sc.batch_size), 10_000)))
    # `memory` (a decode holds a few copies of a 2K image) also keeps Ray from fusing decode into the actors
    ds = ds.map(decode_row, fn_kwargs={"cfg_dict": cfg_dict}, num_cpus=0.5, memory=memory)
    ds = ds.map_batches(SegmentActor, fn_constructor_kwargs={"cfg_dict": cfg_dict}, batch_size=sc.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=sc.actors),
                        num_cpus=sc.cpus_per_actor, num_gpus=sc.gpus_per_actor or None)
    for row in ds.iter_rows():
        writer.add(row)
    if writer.pending:
        raise RuntimeError(f"the stream ended with shards incomplete: {sorted(writer.pending)[:10]}")


def _normalized(cfg: Config) -> Config:
    """Input and output in `locations.normalize` form: a relative path resumes what the absolute one
    started, and workers read the same absolute paths whatever their working directory."""
    sc = cfg.shard
    return config_mod.replace(cfg, shard=config_mod.replace(
        sc, input=locations.normalize(sc.input), output=locations.normalize(sc.output) if sc.output else ""))


def _nothing_to_do(cfg: Config) -> dict[str, Any]:
    print(f"samsr shard: no images under {cfg.shard.input!r} (looked for {', '.join(plan_mod.IMAGE_SUFFIXES[:4])}, "
          "…, recursively); nothing written", file=sys.stderr)
    return {"images_planned": 0, "ok": 0, "failed": 0, "known_bad": 0, "failed_good": 0, "shards": 0, "bytes": 0,
            "shards_written_this_run": 0}


def run(cfg: Config, *, dry_run: bool = False, fail_after_shards: int | None = None,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Shard `cfg.shard.input` into `cfg.shard.output`; returns the `_stats.json` dict (or the dry-run
    plan). Refusals before any work raise ConfigError / LocationError (one line)."""
    check_job(cfg, dry_run)
    cfg = _normalized(cfg)
    if dry_run:
        from pipelines.shard_dryrun import dry_run as do_dry_run

        return do_dry_run(cfg, echo)
    t0 = time.perf_counter()
    plan, new = load_or_build_plan(cfg)
    if not plan.num_images and not plan.rejected:
        return _nothing_to_do(cfg)
    why = resume.check_finished(cfg.shard.output, plan)
    todo = sorted(why)
    rebuilt = resume.count_reasons(list(why.values()))
    writer = ShardWriter(cfg.shard.output, plan, todo, cfg.shard.preview, fail_after_shards)
    if todo:
        ensure_ray()
        _stream(cfg, plan, todo, writer, echo)
    seconds = time.perf_counter() - t0
    stats = _write_totals(cfg, plan, len(writer.written), sum(len(plan.shards[i]) for i in todo), seconds,
                          {"shards_rebuilt_this_run": rebuilt, "images_not_in_plan": len(new)})
    again = f", {sum(rebuilt.values())} of them rebuilt ({', '.join(f'{n} {r}' for r, n in rebuilt.items())})" \
        if rebuilt else ""
    echo(f"samsr shard: {stats['ok']} images ok, {stats['known_bad']} unusable (recorded), {stats['failed_good']} "
         f"failed{' (rerun to retry)' if stats['failed_good'] else ''}, {stats['no_masks']['hr']} without masks; "
         f"{stats['shards']} shards ({len(writer.written)} written now{again}, {len(plan.shards) - len(todo)} "
         f"already there), {stats['images_per_s_this_run']:.2f} images/s, {stats['bytes'] / 1e6:.1f} MB -> "
         f"{cfg.shard.output}")
    if new:
        echo(f"samsr shard: {len(new)} image(s) in the input are not in this output's plan (added since it was "
             f"made, e.g. {new[0]}); a plan is never extended: shard them into a new --output")
    return stats


def dry_run_exit_code(report: dict[str, Any]) -> int:
    return locations.EXIT_OK if report.get("images") else locations.EXIT_INCOMPLETE


def parser():
    """The entrypoint's arguments (`cluster/` manifests are checked against it)."""
    p = entrypoint_parser("pipelines.shard", __doc__.splitlines()[0], "shard.input=s3://bucket/images")
    p.add_argument("--dry-run", action="store_true", help="segment a small sample and print the plan only")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.shard --config PRESET --set shard.input=... --set shard.output=...` (ray job submit)."""
    args = parser().parse_args(argv)

    def work() -> int:
        result = run(config_mod.load(args.config, args.overrides), dry_run=args.dry_run)
        return dry_run_exit_code(result) if args.dry_run else resume.exit_code(result)

    return run_entrypoint("pipelines.shard", work)


if __name__ == "__main__":
    sys.exit(main())

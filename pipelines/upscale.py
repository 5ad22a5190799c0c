"""`samsr upscale`: batch super-resolution of a folder or S3 prefix with Ray Data (DESIGN.md "Batch upscale").

Stages (pipelines/upscale_stages.py): CPU tasks read and decode the inputs; an actor pool loads the model
once per actor (a samsr checkpoint or an MLflow model URI, on the actor's GPU when it has one) and does
only model work — tiled inference, one SAM pass over y↑ first for a SAMSR student — returning SR pixels;
CPU tasks PNG-encode and write each output atomically; a CPU task per `rows_per_part` images writes their
records as one Parquet part. The pool is `upscale.actors` actors, or grows from `upscale.min_actors` to
`upscale.max_actors` while work waits (samsr.config_jobs.actor_pool). Each output key mirrors its input
key under the output prefix (`a/b.jpg` -> `a/b.png`); keys that would escape the prefix are refused.
Outputs that exist are skipped unless `--overwrite`. Bad inputs are recorded with their reason and the
job goes on.

Records (samsr.records): every run adds `<output>/_manifest/<run>/part-*.parquet`, one row per input
(input, output, status ok | skipped | failed, reason, message, timings) and never rewrites an earlier
run's. The rows the plan decides (skipped: exists; unsafe_key; output_collision) are written by the
driver in chunks of `PLAN_PART_ROWS` as it lists; the others by the workers. The work items go the same
way: the driver spools them as parts under `<output>/_work/<run>/` (removed when the run ends) that Ray
Data reads. The driver keeps counts, one part of rows and a 128-bit fingerprint per listed output (for
skips and collisions): ~240 B per input at 10⁶ (benchmarks/driver_memory.py); one small row of counts
per records part comes back to it. `samsr.records.read_latest(<output>/_manifest, "input")`
gives each input's newest record.

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

import logging
import math
import os
import sys
import time
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence

import pyarrow as pa

from pipelines import nodes
from pipelines import upscale_stages as stages
from pipelines.rayenv import (RowProgress, data_progress_bars, entrypoint_parser, model_pool, pool_gpus, read_work,
                              run_entrypoint)
from pipelines.upscale_stages import decode_row, output_size_error  # noqa: F401  (this module's API before)
from samsr import config as config_mod
from samsr import images, listing, locations, records, storage
from samsr.config import Config, DataConfig
from samsr.shards.plan import IMAGE_SUFFIXES

MANIFEST = "_manifest"              # <output>/_manifest/<run>/part-*.parquet (samsr.records)
PLAN_PART_ROWS = 10_000             # rows the plan decides, written by the driver this many at a time
RECORD_PART_ROWS = 1_000            # most images per worker-written part (and per count the driver gets)
WORK = "_work"                      # <output>/_work/<run>/: the run's work items, read by Ray Data, then removed
WORK_SCHEMA = pa.schema([(name, pa.string()) for name in ("input", "output", "status", "reason", "message")])
MODEL_SECTIONS = ("infer.", "segmenter.")       # what --model-set may change in the model's own config
# reasons that mean "this input cannot be used": recorded, and not a failure of the job (a rerun would
# fail them again); any other failure (read_error, upscale_error, write_error) is one a rerun retries
KNOWN_BAD = (*images.REASONS, "unsafe_key", "output_collision")

log = logging.getLogger(__name__)


def lr_pixel_limit(data: DataConfig) -> int:
    """The largest LR whose ×scale output stays within `data.max_pixels`."""
    return max(1, data.max_pixels // data.scale ** 2)


def output_key(key: str) -> str:
    """Input key -> output key: same path, `.png` suffix."""
    return str(PurePosixPath(key).with_suffix(".png"))


def plan_rows(cfg: Config) -> Iterator[dict]:
    """Sorted listing -> one row per input, in listing order: a work item (status "") or a row decided up
    front (failed: unsafe_key, output_collision; skipped: exists)."""
    uc = cfg.upscale
    # a missing output lists as empty; both listings stream, with a progress line every few seconds; of
    # each output the driver keeps a 128-bit fingerprint, not the key (flat memory at 10⁶-10⁷ inputs)
    existing = {listing.fingerprint(u) for u in listing.uris(uc.output, (".png",), "samsr upscale: listing outputs in")}
    claimed: set[int] = set()
    for uri in listing.uris(uc.input, IMAGE_SUFFIXES, "samsr upscale: listing", uc.limit):
        row = {"input": uri, "output": "", "status": "", "reason": "", "message": ""}
        try:
            key = output_key(storage.relative_key(uc.input, uri))
        except storage.StorageError as exc:
            yield {**row, "status": "failed", "reason": "unsafe_key", "message": str(exc)}
            continue
        out = storage.join(uc.output, key)
        row["output"], mark = out, listing.fingerprint(out)
        if mark in claimed:
            yield {**row, "status": "failed", "reason": "output_collision",
                   "message": f"an input listed before it (same name, another suffix) already maps to {out}"}
            continue
        claimed.add(mark)
        if mark in existing and not uc.overwrite:
            yield {**row, "status": "skipped", "reason": "exists"}
            continue
        yield row


def plan(cfg: Config) -> tuple[list[dict], list[dict]]:
    """`plan_rows` split into (work items, rows decided up front), both in memory: for tests and tools;
    `run` streams `plan_rows` instead and keeps only the work items."""
    items, decided = [], []
    for row in plan_rows(cfg):
        (decided if row["status"] else items).append(row)
    return items, decided


def spool_plan(cfg: Config, folder: str, run: str, tally: records.Tally, work: records.WorkSpool) -> None:
    """The driver's part of a run: `plan_rows` streamed into this run's records (rows decided up front, in
    parts of PLAN_PART_ROWS) and `work` (the items for Ray Data); `tally` counts the decided rows. What
    the driver holds is the listing's fingerprints, one part's rows, and counts (benchmarks/driver_memory.py)."""
    with records.PartWriter(records.folder_writer(folder, run, stages.RECORD_SCHEMA), "plan", PLAN_PART_ROWS) as decided, work:
        for row in plan_rows(cfg):
            if row["status"]:
                decided.add(stages.record(row))
                tally.add(row)
            else:
                work.add({name: row[name] for name in WORK_SCHEMA.names})


def rows_per_part(n_items: int) -> int:
    """Images per worker-written records part: about 1% of the job (so the driver's progress line moves
    every ~1%), at least 16, at most RECORD_PART_ROWS."""
    return max(16, min(RECORD_PART_ROWS, math.ceil(n_items / 100)))


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


def summarize(counts: Mapping[str, int], seconds: float, run: str = "", folder: str = "") -> dict[str, Any]:
    """A job's counts (samsr.records.Tally: ok, skipped, failed = known_bad + failed_good, inputs) -> the
    job's result: those counts, its time and throughput, and where this run's records are."""
    ok = int(counts["ok"])
    return {**{name: int(counts[name]) for name in records.COUNTS}, "seconds": seconds,
            "images_per_s": ok / seconds if seconds > 0 and ok else 0.0, "run": run, "records": folder}


def exit_code(stats: Mapping[str, Any]) -> int:
    """The shared policy: 0 when every good input has its output (written now or skipped as there)."""
    return records.exit_code(stats, done=("ok", "skipped"))


def _upscale(cfg: Config, model_overrides: Sequence[str], work: records.WorkSpool, folder: str, run: str,
             tally: records.Tally) -> None:
    """Ray Data: the work parts -> decode tasks -> model actor pool -> encode/write tasks -> records parts;
    the counts of each part are added to `tally`."""
    uc = cfg.upscale
    pool = model_pool("samsr upscale", uc)
    bars = data_progress_bars()       # before the dataset: it keeps a copy of the DataContext
    ds = read_work(work)
    ds = ds.map(stages.decode_row, fn_kwargs={"max_pixels": cfg.data.max_pixels, "scale": cfg.data.scale},
                num_cpus=0.5, memory=images.decode_memory(lr_pixel_limit(cfg.data)))
    ds = ds.map_batches(stages.UpscaleModel, fn_constructor_kwargs={
                            "model": uc.model, "model_overrides": list(model_overrides),
                            "tracking_uri": uc.tracking_uri, "threads": int(uc.cpus_per_actor),
                            "max_pixels": cfg.data.max_pixels},
                        batch_size=1, batch_format="numpy", compute=pool,
                        num_cpus=uc.cpus_per_actor, num_gpus=uc.gpus_per_actor or None)
    ds = ds.map(stages.encode_row, fn_kwargs={"level": uc.png_compress_level}, num_cpus=1,
                memory=images.DECODE_BASE + stages.ENCODE_BYTES_PER_PIXEL * cfg.data.max_pixels)
    ds = ds.map_batches(stages.write_records, fn_kwargs={"folder": folder, "run": run, "known_bad": KNOWN_BAD},
                        batch_size=rows_per_part(work.total), batch_format="numpy", num_cpus=0.25)
    progress = RowProgress(log, "samsr upscale", work.total, quiet=bars)
    for counts in ds.iter_rows():
        tally.merge(counts)
        progress.add(failed=int(counts["failed"]), done=int(counts["inputs"]))


def run(cfg: Config, model_overrides: Sequence[str] = (), echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Super-resolve `cfg.upscale.input` into `cfg.upscale.output`; returns counts and throughput (never
    rows: each run's records are parts under `<output>/_manifest/<run>/`)."""
    uc = cfg.upscale
    check_job(cfg, model_overrides)
    nodes.check_paths("samsr upscale", nodes.job_paths(           # a multi-node cluster: local paths refused or checked
        ("--input", uc.input), ("--output", uc.output), ("--model", uc.model),
        ("the tracking URI", uc.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")),
        *model_paths(model_overrides)), uc.shared_fs)
    t0 = time.perf_counter()
    if uc.gpus_per_actor > 0:       # asked before anything is written: a refusal leaves nothing behind
        pool_gpus("samsr upscale", uc)
    run_id, folder = records.new_run_id(), storage.join(uc.output, MANIFEST)
    tally, work = records.Tally(KNOWN_BAD), records.WorkSpool(storage.join(uc.output, WORK, run_id), WORK_SCHEMA,
                                                              PLAN_PART_ROWS)
    try:
        spool_plan(cfg, folder, run_id, tally, work)
        if not work.total and not tally.counts["inputs"]:
            print(f"samsr upscale: no images under {uc.input!r} (looked for {', '.join(IMAGE_SUFFIXES[:4])}, …); "
                  "nothing written", file=sys.stderr)
            return summarize(tally.as_dict(), time.perf_counter() - t0)
        if work.total:
            _upscale(cfg, model_overrides, work, folder, run_id, tally)
    finally:
        work.remove()
    stats = summarize(tally.as_dict(), time.perf_counter() - t0, run_id, folder)
    echo(f"samsr upscale: {stats['ok']} written, {stats['skipped']} skipped (exist), {stats['failed']} failed "
         f"({stats['known_bad']} unusable inputs, {stats['failed_good']} errors to retry) of {stats['inputs']} "
         f"inputs, {stats['images_per_s']:.2f} images/s -> {uc.output} (records: {storage.join(folder, run_id)}/)")
    return stats


__all__ = ["run", "plan", "plan_rows", "spool_plan", "rows_per_part", "check_job", "model_paths", "summarize", "exit_code",
           "output_key", "decode_row", "lr_pixel_limit", "output_size_error", "MANIFEST", "KNOWN_BAD"]


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

"""`samsr eval`: score a model against bicubic on a set of HR images with Ray Data (decode tasks + a
model actor pool, shaped like `samsr upscale`), and log the result to MLflow.

Without `eval.lr` the LR of each HR image is made exactly as `samsr shard` makes it (crop to a multiple
of the scale, antialiased bicubic ÷s); with it, LR images are matched to HR by key (`a/0801.png` ->
`a/0801.png` or `a/0801x4.png`, any image suffix) and the HR is cropped to a multiple of the scale;
a pair whose sizes disagree is recorded as `size_mismatch` and the job goes on. Per image, for the
model and for bicubic: PSNR-Y, SSIM-Y (border = scale), HaarPSI, GMSD, and LPIPS when its weights are
given (samsr/evaluation.py). With `eval.samples` N > 1 every image is sampled N times (seeds
seed..seed+N-1): `<metric>` is the mean score of single samples, `mean_of_samples_<metric>` the score of
their mean. The pool is `eval.actors` actors, or grows from `eval.min_actors` to `eval.max_actors`.

Records (pipelines/eval_records.py, samsr.records): every run adds Parquet parts — one row per HR
image (failures with their reason, scores as columns) — under `<eval.output>/scores/<run>/` and, with
a tracking URI, as MLflow artifacts `eval-scores/<set>/<run>/`; write tasks write them and hand the
driver counts and running sums only. `<eval.output>/summary.json` and the MLflow metrics
`eval/<set>/<metric>`, `eval/<set>/bicubic_<metric>` come from those sums; the MLflow table
`eval/<set>/scores.json` holds the first `TABLE_ROWS` rows of the run. All of it goes into the model's
own run for `runs:/…` (or a registered version), else into a new run tagged with the model.

Before any work (exit 2, one line): `eval.output` must not be, lie inside, or hold the HR or LR folder;
the HR (and LR) folder/bucket, the output bucket and the model must exist. Exit codes (samsr.locations):
0 when every usable HR image was scored — unusable ones (KNOWN_BAD: corrupt, too large, no LR, size
mismatch…) are recorded, not failures; 1 when a usable one failed (read or model error) or none was scored.

    samsr eval --model runs:/<run_id>/model --hr s3://bucket/div2k/valid_hr --set-name div2k-val --samples 4
    python -m pipelines.eval --set eval.model=... --set eval.hr=... --set eval.output=...
"""
from __future__ import annotations

import itertools
import json
import logging
import re
import sys
import time
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from pipelines.rayenv import RowProgress, data_progress_bars, entrypoint_parser, model_pool, run_entrypoint
from pipelines import eval_records, nodes
from pipelines.tracking.client import tracking_uri
from pipelines.upscale import PLAN_PART_ROWS, check_model_overrides, model_paths, rows_per_part
from samsr import config as config_mod
from samsr import evaluation, images, listing, locations, records, redact, storage
from samsr.config import Config
from samsr.shards.plan import IMAGE_SUFFIXES

SCORES = eval_records.SCORES_DIR     # <output>/scores/<run>/part-*.parquet (samsr.records; key: "hr")
SUMMARY = "summary.json"
# reasons that mean "this input cannot be used", recorded and skipped; anything else failing (read_error,
# eval_error) is the job's fault and a rerun retries it
KNOWN_BAD = (*images.REASONS, "unsafe_key", "no_lr", "size_mismatch")

log = logging.getLogger(__name__)


def set_name(ec) -> str:
    """`eval.set_name`, or the HR folder's last path component; [A-Za-z0-9._-] only (an MLflow key part)."""
    name = ec.set_name or PurePosixPath(ec.hr.rstrip("/").split("://", 1)[-1]).name or "eval"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "eval"


def _stem(key: str) -> str:
    return str(PurePosixPath(key).with_suffix(""))


def plan_rows(cfg: Config) -> Iterator[dict]:
    """Sorted HR listing -> one row per HR image in listing order: a work item {key, hr, lr} (status "")
    or a row failed up front (unsafe_key, no_lr)."""
    ec = cfg.eval
    lr_by_stem: dict[str, str] = {}
    if ec.lr:
        for uri in listing.uris(ec.lr, IMAGE_SUFFIXES, "samsr eval: listing LR images in"):
            try:
                lr_by_stem.setdefault(_stem(storage.relative_key(ec.lr, uri)), uri)
            except storage.StorageError:
                continue                     # an unsafe LR key can only be matched by an unsafe HR key
    for uri in listing.uris(ec.hr, IMAGE_SUFFIXES, "samsr eval: listing", ec.limit):
        row = {"key": "", "hr": uri, "lr": "", "status": "", "reason": "", "message": ""}
        try:
            row["key"] = storage.relative_key(ec.hr, uri)
        except storage.StorageError as exc:
            yield {**row, "status": "failed", "reason": "unsafe_key", "message": str(exc)}
            continue
        if ec.lr:
            stem = _stem(row["key"])
            match = lr_by_stem.get(stem) or lr_by_stem.get(f"{stem}x{cfg.data.scale}")
            if match is None:
                yield {**row, "status": "failed", "reason": "no_lr",
                       "message": f"no LR image for {row['key']!r} under {ec.lr!r} (looked for "
                                  f"{stem}.* and {stem}x{cfg.data.scale}.*)"}
                continue
            row["lr"] = match
        yield row


def plan(cfg: Config) -> tuple[list[dict], list[dict]]:
    """`plan_rows` split into (work items, rows failed up front), both in memory: for tests and tools."""
    items, failed = [], []
    for row in plan_rows(cfg):
        (failed if row["status"] else items).append(row)
    return items, failed


def _decode(uri: str, max_pixels: int) -> np.ndarray:
    return images.decode_image(storage.read_bytes(uri), scale=1, max_pixels=max_pixels, min_lr_side=1, name=uri)


def decode_row(row: dict, max_pixels: int) -> dict:
    """Read + decode HR (and LR) in a CPU task -> row with raw pixels, or status failed + reason."""
    out = {**row, "hr_raw": b"", "hr_shape": "", "lr_raw": b"", "lr_shape": "", "t_decode": 0.0, "t_eval": 0.0}
    t0 = time.perf_counter()
    for side in ("hr", "lr") if row["lr"] else ("hr",):
        try:
            img = _decode(row[side], max_pixels)
        except (storage.StorageError, OSError) as exc:
            return {**out, "status": "failed", "reason": "read_error", "message": f"{side}: {exc}"[:2000]}
        except images.ImageError as exc:
            return {**out, "status": "failed", "reason": exc.reason, "message": f"{side}: {exc}"[:2000]}
        out[f"{side}_raw"], out[f"{side}_shape"] = img.tobytes(), json.dumps(list(img.shape))
    return {**out, "t_decode": time.perf_counter() - t0}


def _array(raw: bytes, shape: str) -> np.ndarray:
    return np.frombuffer(raw, np.uint8).reshape(json.loads(shape))


class EvalActor:
    """Loads the model (and its segmenter if it needs SAM) once; scores each pair against bicubic."""

    def __init__(self, model: str, model_overrides: Sequence[str], tracking_uri: str, samples: int, seed: int,
                 crop: int, lpips_weights: str, threads: int = 1) -> None:
        from pipelines.tracking.model import load_for_inference

        self.method, self.cfg, self.segmenter, self.device = load_for_inference(model, model_overrides,
                                                                                tracking_uri, threads)
        self.samples, self.seed, self.crop = samples, seed, crop
        self.lpips = str(storage.fetch_to_local(lpips_weights)) if lpips_weights else None

    def pair(self, row: dict) -> tuple[np.ndarray, np.ndarray]:
        """(HR, LR) at the model's scale, centrally cropped to `crop`; ValueError on a size mismatch."""
        s, hr = self.method.scale, _array(row["hr_raw"], row["hr_shape"])
        hr, lr = (evaluation.pair_from_hr(hr, s) if not row["lr"]
                  else (images.crop_to_multiple(hr, s), _array(row["lr_raw"], row["lr_shape"])))
        evaluation.check_pair(hr, lr, s)
        if min(lr.shape[:2]) < self.cfg.data.min_lr_side:
            raise images.ImageError("too_small", f"LR {lr.shape[1]}x{lr.shape[0]} is smaller than "
                                                 f"data.min_lr_side={self.cfg.data.min_lr_side}")
        return evaluation.crop_pair(hr, lr, self.crop, s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["key"]))]
        out = []
        for row in rows:
            keep = {k: row[k] for k in ("key", "hr", "lr", "status", "reason", "message", "t_decode")}
            keep.update(scores="{}", t_eval=0.0)
            if not row["status"]:
                t0 = time.perf_counter()
                try:
                    hr, lr = self.pair(row)
                    scores = evaluation.evaluate_image(
                        self.method, hr, lr, self.cfg.infer, samples=self.samples, seed=self.seed,
                        segmenter=self.segmenter, soft=self.cfg.resshift.soft_masks, device=self.device,
                        lpips_weights=self.lpips)
                    keep.update(status="ok", scores=json.dumps(scores), t_eval=time.perf_counter() - t0)
                except images.ImageError as exc:
                    keep.update(status="failed", reason=exc.reason, message=str(exc)[:2000])
                except ValueError as exc:
                    reason = "size_mismatch" if "is not LR" in str(exc) else "eval_error"
                    keep.update(status="failed", reason=reason, message=f"{type(exc).__name__}: {exc}"[:2000])
                except Exception as exc:     # one bad image must not stop the batch; recorded per image
                    keep.update(status="failed", reason="eval_error", message=f"{type(exc).__name__}: {exc}"[:2000])
            out.append(keep)
        return {k: [r[k] for r in out] for k in out[0]}


def check_inputs(cfg: Config, model_overrides: Sequence[str]) -> None:
    """Everything that can be wrong before any work, each as one line in seconds (ConfigError, LocationError,
    FileNotFoundError): settings, overlapping locations, missing folders/buckets, the model, LPIPS weights."""
    from pipelines.tracking.model import check_model
    from pipelines.tracking.client import check_tracking_reachable, tracking_uri

    ec = cfg.eval
    for name in ("model", "hr"):
        if not getattr(ec, name):
            raise config_mod.ConfigError(f"eval.{name} is required (--{name})")
    if ec.samples < 1:
        raise config_mod.ConfigError(f"eval.samples={ec.samples} must be >= 1")
    check_model_overrides(model_overrides)
    check_tracking_reachable(ec.tracking_uri or tracking_uri(cfg))   # the MLflow server results go to answers
    if ec.output:
        locations.refuse_overlap(ec.hr, ec.output, job="samsr eval")
        if ec.lr:
            locations.refuse_overlap(ec.lr, ec.output, job="samsr eval")
    locations.require_input(ec.hr, "HR input")
    if ec.lr:
        locations.require_input(ec.lr, "LR input")
    if ec.output:
        locations.require_output(ec.output, "output")
    if ec.lpips_weights and not storage.exists(ec.lpips_weights):
        raise FileNotFoundError(f"LPIPS weights not found at {ec.lpips_weights!r}; LPIPS is never computed with "
                                "random weights: give a local path or s3:// URI of an LPIPS-AlexNet state_dict "
                                "(torch.save(lpips.LPIPS(net='alex').state_dict(), PATH)), or leave --lpips-weights "
                                "out (HaarPSI and GMSD need no weights)")
    check_model(ec.model, ec.tracking_uri or tracking_uri(cfg) or None)


def _score(cfg: Config, model_overrides: Sequence[str], items: list[dict], sink: eval_records.ScoreSink,
           tally: records.Tally, sums: evaluation.RunningSummary) -> None:
    """Ray Data: decode tasks -> model actor pool (SR + scores) -> write tasks (one records part each); the
    counts and running sums of each part are added to `tally` and `sums`."""
    import ray

    ec = cfg.eval
    pool = model_pool("samsr eval", ec)
    bars = data_progress_bars()       # before the dataset: it keeps a copy of the DataContext
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 10_000)))
    hr_and_lr = cfg.data.max_pixels + cfg.data.max_pixels // cfg.data.scale ** 2
    ds = ds.map(decode_row, fn_kwargs={"max_pixels": cfg.data.max_pixels}, num_cpus=0.5,
                memory=images.decode_memory(hr_and_lr))
    ds = ds.map_batches(EvalActor, fn_constructor_kwargs={
                            "model": ec.model, "model_overrides": list(model_overrides),
                            "tracking_uri": ec.tracking_uri, "samples": ec.samples, "seed": ec.seed,
                            "crop": ec.crop, "lpips_weights": ec.lpips_weights,
                            "threads": int(ec.cpus_per_actor)},
                        batch_size=1, batch_format="numpy", compute=pool,
                        num_cpus=ec.cpus_per_actor, num_gpus=ec.gpus_per_actor or None)
    ds = ds.map_batches(eval_records.write_scores, fn_kwargs={"sink": sink, "known_bad": KNOWN_BAD},
                        batch_size=rows_per_part(len(items)), batch_format="numpy", num_cpus=0.25)
    progress = RowProgress(log, "samsr eval", len(items), quiet=bars)
    for part in ds.iter_rows():
        tally.merge(part)
        sums.merge(json.loads(part["summary"]))
        progress.add(failed=int(part["failed"]), done=int(part["inputs"]))


def run(cfg: Config, model_overrides: Sequence[str] = (), echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Score `cfg.eval.model` on `cfg.eval.hr`; returns counts, the summary and the MLflow run id (never
    rows: each run's records are parts, pipelines/eval_records.py)."""
    ec = cfg.eval
    check_inputs(cfg, model_overrides)
    nodes.check_paths("samsr eval", nodes.job_paths(              # a multi-node cluster: local paths refused or checked
        ("--hr", ec.hr), ("--lr", ec.lr), ("--output", ec.output), ("--model", ec.model),
        ("--lpips-weights", ec.lpips_weights), ("the tracking URI", ec.tracking_uri or tracking_uri(cfg)),
        *model_paths(model_overrides)), ec.shared_fs)
    name = set_name(ec)
    t0 = time.perf_counter()
    tally, sums, items = records.Tally(KNOWN_BAD), evaluation.RunningSummary(), []
    rows = plan_rows(cfg)
    first = next(rows, None)
    if first is None:
        print(f"samsr eval: no images under {ec.hr!r} (looked for {', '.join(IMAGE_SUFFIXES[:4])}, …); "
              "nothing scored or written", file=sys.stderr)
        return {"set": name, **tally.as_dict(), "summary": {}, "seconds": time.perf_counter() - t0,
                "images_per_s": 0.0}
    from pipelines.tracking.runs import evaluation_run, log_evaluation
    from pipelines.tracking.client import terminate

    mlflow_run = evaluation_run(cfg, name)
    run_id = records.new_run_id()
    # workers reach MLflow with the URI minus any userinfo: their credentials come from their nodes (rayenv)
    sink = eval_records.ScoreSink(run_id, storage.join(ec.output, SCORES) if ec.output else "",
                                  redact.strip_userinfo(mlflow_run[0]) if mlflow_run else "",
                                  mlflow_run[1] if mlflow_run else "", f"{eval_records.ARTIFACTS}/{name}")
    scored = False
    try:
        with records.PartWriter(sink.write, "plan", PLAN_PART_ROWS) as decided:
            for row in itertools.chain([first], rows):
                if row["status"]:
                    decided.add(row)
                    tally.add(row)
                else:
                    items.append(row)
        if items:
            _score(cfg, model_overrides, items, sink, tally, sums)
        result = _finish(cfg, name, tally, sums, time.perf_counter() - t0, sink, echo)
        if result["ok"] and mlflow_run:
            result["mlflow_run_id"] = log_evaluation(
                cfg, name, result["summary"], eval_records.first_rows(sink), mlflow_run, images=result["ok"],
                table_note=_table_note(result["inputs"]))
        scored = bool(result["ok"])
        return result
    finally:
        if mlflow_run and mlflow_run[2]:           # a run made for this evaluation ends with it
            from mlflow import MlflowClient

            terminate(MlflowClient(mlflow_run[0]), mlflow_run[1], "FINISHED" if scored else "FAILED")


def _table_note(rows: int) -> str:
    shown = min(rows, eval_records.TABLE_ROWS)
    return "" if shown == rows else f"the first {shown} of {rows} rows; all of them: the run's parts under " \
                                    f"{eval_records.ARTIFACTS}/"


def _finish(cfg: Config, name: str, tally: records.Tally, sums: evaluation.RunningSummary, seconds: float,
            sink: eval_records.ScoreSink, echo: Callable[[str], None]) -> dict[str, Any]:
    """The result from the driver's counts and sums; summary.json under the output; the summary line."""
    ec = cfg.eval
    counts = tally.as_dict()
    summary = sums.summary() if counts["ok"] else {}
    result = {"set": name, **counts, "summary": summary, "seconds": seconds,
              "images_per_s": counts["ok"] / seconds if counts["ok"] else 0.0, "run": sink.run,
              "records": storage.join(sink.folder, sink.run) if sink.folder else ""}
    if ec.output:
        where = redact.redact_value({"model": ec.model, "hr": ec.hr, "lr": ec.lr})     # no userinfo persisted
        storage.write_text(storage.join(ec.output, SUMMARY), json.dumps(
            {k: v for k, v in result.items() if k != "summary"} | where | {"samples": ec.samples, "seed": ec.seed,
                                                                           "crop": ec.crop, "summary": summary},
            indent=2))
    echo(f"samsr eval: {ec.model} on {name}: {counts['ok']} of {counts['inputs']} images scored, "
         f"{counts['failed']} failed ({counts['known_bad']} unusable inputs, {counts['failed_good']} errors), "
         f"{ec.samples} sample(s) each, {result['images_per_s']:.2f} images/s"
         + (f" -> {ec.output} (records: {result['records']}/)" if ec.output else ""))
    if counts["ok"]:
        echo(evaluation.format_summary(summary, ec.samples))
    return result


def counts(rows: Sequence[dict]) -> dict[str, int]:
    """Score rows -> ok, failed = known_bad (unusable inputs, recorded) + failed_good (errors a rerun retries)."""
    return records.Tally(KNOWN_BAD).add_rows(rows).as_dict()


def exit_code(result: Mapping[str, Any]) -> int:
    """0 when every good input was scored (bad inputs recorded); 1 when nothing was, or a good one failed."""
    return records.exit_code(result, done=("ok",))


__all__ = ["run", "plan", "plan_rows", "set_name", "decode_row", "EvalActor", "check_inputs", "counts", "exit_code", "SCORES",
           "SUMMARY", "KNOWN_BAD"]


def parser():
    """The entrypoint's arguments (`cluster/` manifests are checked against it)."""
    return entrypoint_parser("pipelines.eval", __doc__.splitlines()[0], "eval.hr=s3://bucket/div2k/valid_hr", model_set=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.eval --set eval.model=... --set eval.hr=...` (ray job submit)."""
    args = parser().parse_args(argv)
    return run_entrypoint("pipelines.eval", lambda: exit_code(run(config_mod.load(args.config, args.overrides),
                                                             args.model_overrides)))


if __name__ == "__main__":
    sys.exit(main())

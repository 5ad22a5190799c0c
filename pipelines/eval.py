"""`samsr eval`: score a model against bicubic on a set of HR images with Ray Data (decode tasks + a
model actor pool, shaped like `samsr upscale`), and log the result to MLflow.

Without `eval.lr` the LR of each HR image is made exactly as `samsr shard` makes it (crop to a multiple
of the scale, antialiased bicubic ÷s); with it, LR images are matched to HR by key (`a/0801.png` ->
`a/0801.png` or `a/0801x4.png`, any image suffix) and the HR is cropped to a multiple of the scale;
a pair whose sizes disagree is recorded as `size_mismatch` and the job goes on. Per image, for the
model and for bicubic: PSNR-Y, SSIM-Y (border = scale), HaarPSI, GMSD, and LPIPS when its weights are
given (samsr/evaluation.py). With `eval.samples` N > 1 every image is sampled N times (seeds
seed..seed+N-1): `<metric>` is the mean score of single samples, `mean_of_samples_<metric>` the score of
their mean. Under `eval.output`: `scores.jsonl` (one line per HR image, failures with their reason)
and `summary.json`. Into MLflow: metrics `eval/<set>/<metric>` and `eval/<set>/bicubic_<metric>`, the
per-image table as `eval/<set>/scores.json` — in the model's own run for `runs:/…`, else in a new run
tagged with the model it evaluated.

Before any work (exit 2, one line): `eval.output` must not be, lie inside, or hold the HR or LR folder;
the HR (and LR) folder/bucket, the output bucket and the model must exist. Exit codes (samsr.locations):
0 when every usable HR image was scored — unusable ones (KNOWN_BAD: corrupt, too large, no LR, size
mismatch…) are recorded, not failures; 1 when a usable one failed (read or model error) or none was scored.

    samsr eval --model runs:/<run_id>/model --hr s3://bucket/div2k/valid_hr --set-name div2k-val --samples 4
    python -m pipelines.eval --set eval.model=... --set eval.hr=... --set eval.output=...
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np

from pipelines.rayenv import (RowProgress, data_progress_bars, ensure_ray, entrypoint_parser, require_gpus,
                              run_entrypoint)
from pipelines import nodes
from pipelines.tracking.client import tracking_uri
from pipelines.upscale import check_model_overrides, model_paths
from samsr import config as config_mod
from samsr import evaluation, images, locations, redact, storage
from samsr.config import Config
from samsr.shards.plan import IMAGE_SUFFIXES

SCORES = "scores.jsonl"
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


def plan(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Sorted HR listing -> (work items {key, hr, lr}, rows failed up front: unsafe keys, no LR match)."""
    ec = cfg.eval
    listing = storage.list_files(ec.hr, IMAGE_SUFFIXES)
    if ec.limit:
        listing = listing[:ec.limit]
    lr_by_stem: dict[str, str] = {}
    if ec.lr:
        for uri in storage.list_files(ec.lr, IMAGE_SUFFIXES):
            try:
                lr_by_stem.setdefault(_stem(storage.relative_key(ec.lr, uri)), uri)
            except storage.StorageError:
                continue                     # an unsafe LR key can only be matched by an unsafe HR key
    items, failed = [], []
    for uri in listing:
        row = {"key": "", "hr": uri, "lr": "", "status": "", "reason": "", "message": ""}
        try:
            row["key"] = storage.relative_key(ec.hr, uri)
        except storage.StorageError as exc:
            failed.append({**row, "status": "failed", "reason": "unsafe_key", "message": str(exc)})
            continue
        if ec.lr:
            stem = _stem(row["key"])
            match = lr_by_stem.get(stem) or lr_by_stem.get(f"{stem}x{cfg.data.scale}")
            if match is None:
                failed.append({**row, "status": "failed", "reason": "no_lr",
                               "message": f"no LR image for {row['key']!r} under {ec.lr!r} (looked for "
                                          f"{stem}.* and {stem}x{cfg.data.scale}.*)"})
                continue
            row["lr"] = match
        items.append(row)
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


def run(cfg: Config, model_overrides: Sequence[str] = (), echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Score `cfg.eval.model` on `cfg.eval.hr`; returns counts, the summary and the MLflow run id."""
    import ray

    ec = cfg.eval
    check_inputs(cfg, model_overrides)
    nodes.check_paths("samsr eval", nodes.job_paths(              # a multi-node cluster: local paths refused or checked
        ("--hr", ec.hr), ("--lr", ec.lr), ("--output", ec.output), ("--model", ec.model),
        ("--lpips-weights", ec.lpips_weights), ("the tracking URI", ec.tracking_uri or tracking_uri(cfg)),
        *model_paths(model_overrides)), ec.shared_fs)
    name = set_name(ec)
    t0 = time.perf_counter()
    items, rows = plan(cfg)
    if not items and not rows:
        print(f"samsr eval: no images under {ec.hr!r} (looked for {', '.join(IMAGE_SUFFIXES[:4])}, …); "
              "nothing scored or written", file=sys.stderr)
        return {"set": name, **counts(rows), "summary": {}, "seconds": time.perf_counter() - t0, "images_per_s": 0.0}
    if items:
        ensure_ray()
        require_gpus("samsr eval", ec.gpus_per_actor, ec.actors, "--gpus-per-actor 0", ec.gpu_wait_s)
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
                            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=ec.actors),
                            num_cpus=ec.cpus_per_actor, num_gpus=ec.gpus_per_actor or None)
        progress = RowProgress(log, "samsr eval", len(items), quiet=bars)
        for row in ds.iter_rows():
            row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
            rows.append({**{k: v for k, v in row.items() if k != "scores"}, **json.loads(row["scores"])})
            progress.add(rows[-1]["status"] != "ok")
    rows.sort(key=lambda r: r["hr"])
    seconds = time.perf_counter() - t0
    ok = [r for r in rows if r["status"] == "ok"]
    summary = evaluation.summarize({k: v for k, v in r.items() if not k.startswith("t_")} for r in ok)
    result = {"set": name, **counts(rows), "summary": summary, "seconds": seconds,
              "images_per_s": len(ok) / seconds if ok else 0.0}
    if ec.output:
        storage.write_text(storage.join(ec.output, SCORES), "".join(json.dumps(r) + "\n" for r in rows))
        where = redact.redact_value({"model": ec.model, "hr": ec.hr, "lr": ec.lr})     # no userinfo persisted
        storage.write_text(storage.join(ec.output, SUMMARY), json.dumps(
            {k: v for k, v in result.items() if k != "summary"} | where | {"samples": ec.samples, "seed": ec.seed,
                                                                           "crop": ec.crop, "summary": summary},
            indent=2))
    echo(f"samsr eval: {ec.model} on {name}: {len(ok)} of {len(rows)} images scored, {result['failed']} failed "
         f"({result['known_bad']} unusable inputs, {result['failed_good']} errors), "
         f"{ec.samples} sample(s) each, {result['images_per_s']:.2f} images/s"
         + (f" -> {ec.output}" if ec.output else ""))
    if ok:
        echo(evaluation.format_summary(summary, ec.samples))
        from pipelines.tracking.runs import log_evaluation

        result["mlflow_run_id"] = log_evaluation(cfg, name, summary, rows)
    return result


def counts(rows: Sequence[dict]) -> dict[str, int]:
    """Score rows -> ok, failed = known_bad (unusable inputs, recorded) + failed_good (errors a rerun retries)."""
    return {"ok": sum(r["status"] == "ok" for r in rows), "inputs": len(rows),
            **locations.failure_counts(rows, KNOWN_BAD)}


def exit_code(result: dict[str, Any]) -> int:
    """0 when every good input was scored (bad inputs recorded); 1 when nothing was, or a good one failed."""
    return locations.exit_code(done=result["ok"], failed_good=result["failed_good"], known_bad=result["known_bad"])


__all__ = ["run", "plan", "set_name", "decode_row", "EvalActor", "check_inputs", "counts", "exit_code", "SCORES",
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

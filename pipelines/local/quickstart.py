"""`samsr quickstart`: the whole system end to end on bundled photos, on a local stack it starts itself.

1. `samsr local up`: S3 endpoint (moto), MLflow server and a Ray head with token auth on 127.0.0.1.
2. Uploads the bundled training photos (pipelines/local/photos.py) to s3://samsr-quickstart/images/, the
   held-out ones to …/holdout-hr/ and two of them as ×4 LR images to …/lr/.
3. `samsr shard` (Ray Data + the tiny random SAM) -> …/shards/.
4. `samsr train` (Ray Train, 1 worker) of SAM-DiffSR, logged to MLflow with validation curves (val/*
   next to val/bicubic_*), checkpoints in …/runs/.
5. `samsr upscale` of …/lr/ into …/sr/ with the MLflow model `runs:/<id>/model`.
6. `samsr eval` of that model on …/holdout-hr/ (central crops, `samples` samples per photo): the table
   against bicubic is printed and logged into the same MLflow run (eval/bundled-holdout/*); then the
   stack stops (`--keep` leaves it running to browse the MLflow UI).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

BUCKET = "samsr-quickstart"
UPSCALED = ("coffee", "camera")          # held-out photos whose LR the quickstart upscales
EVAL_SET = "bundled-holdout"
PRESET = "samdiffsr-tiny"


def _png(img) -> bytes:
    from samsr.shards.format import png_bytes

    return png_bytes(img, 1)


def run(workdir: str | Path = "samsr-quickstart", *, keep: bool = False, iterations: int | None = None,
        rrdb_iterations: int | None = None, samples: int = 2, eval_crop: int = 256, preset: str = PRESET,
        name: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the quickstart; returns the evaluation (summary + per photo), the MLflow run id and the stack's URLs.
    `iterations`/`rrdb_iterations` default to the preset's; `preset` may be a YAML file; `name` is the run's
    (default quickstart-<time>). With the stack already up in `workdir`, it is reused."""
    from pipelines import local

    workdir = Path(workdir).resolve()
    stack = workdir / "stack"
    t0 = time.perf_counter()
    state = local.up(stack)
    echo(f"local stack: S3 {state['s3']}, MLflow {state['mlflow']}, Ray {state['ray_dashboard']} (token auth)")
    before = dict(os.environ)
    os.environ.update(local.client_env(stack))
    _reload_ray_auth()
    try:
        return _pipeline(workdir, state, preset, iterations, rrdb_iterations, samples, eval_crop,
                         name or time.strftime("quickstart-%Y%m%d-%H%M%S"), echo, t0)
    finally:
        os.environ.clear()
        os.environ.update(before)
        import ray

        ray.shutdown()
        _reload_ray_auth()
        if not keep:
            local.down(stack)
            echo("local stack stopped (run with --keep to leave it up and browse MLflow)")


def _reload_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE/RAY_AUTH_TOKEN once per process; re-read them if Ray is already imported."""
    import sys

    if "ray" in sys.modules:
        from ray._raylet import Config as RayConfig

        RayConfig.initialize("")


def _pipeline(workdir: Path, state: dict, preset: str, iterations: int | None, rrdb_iterations: int | None,
              samples: int, eval_crop: int, run_name: str, echo, t0: float) -> dict[str, Any]:
    import boto3

    from pipelines import eval as eval_job
    from pipelines import shard, train, upscale
    from pipelines.local import photos
    from samsr import config, evaluation, images, storage

    s3 = boto3.client("s3", endpoint_url=state["s3"])
    if BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=BUCKET)
    root = f"s3://{BUCKET}"
    for name in photos.TRAIN:
        storage.write_bytes(f"{root}/images/{name}.png", _png(photos.bundled_photo(name)))
    for name in photos.HELD_OUT:
        hr = images.crop_to_multiple(photos.bundled_photo(name), 4)
        storage.write_bytes(f"{root}/holdout-hr/{name}.png", _png(hr))
        if name in UPSCALED:
            storage.write_bytes(f"{root}/lr/{name}.png", _png(images.make_lr(hr, 4)))
    echo(f"uploaded {len(photos.TRAIN)} training photos to {root}/images/, {len(photos.HELD_OUT)} held-out HR "
         f"photos to {root}/holdout-hr/ and {len(UPSCALED)} LR photos to {root}/lr/")

    base = ["shard.samples_per_shard=2", "shard.actors=1", "shard.cpus_per_actor=1"]
    shard.run(config.load(preset, [*base, f"shard.input={root}/images", f"shard.output={root}/shards"]))
    steps = [f"train.iterations={iterations}"] if iterations is not None else []
    steps += [f"train.rrdb_iterations={rrdb_iterations}"] if rrdb_iterations is not None else []
    out = train.run(config.load(preset, [
        f"job.shards={root}/shards", f"job.storage={root}/runs", f"job.name={run_name}", "job.num_workers=1",
        "job.experiment=samsr-quickstart", "job.val_images=1", *steps]))
    model = f"runs:/{out['mlflow_run_id']}/model"
    upscale.run(config.load(preset, [f"upscale.input={root}/lr", f"upscale.output={root}/sr",
                                     f"upscale.model={model}", "upscale.overwrite=true", "upscale.cpus_per_actor=2"]))
    result = eval_job.run(config.load(preset, [
        f"eval.model={model}", f"eval.hr={root}/holdout-hr", f"eval.set_name={EVAL_SET}", f"eval.samples={samples}",
        f"eval.crop={eval_crop}", f"eval.output={root}/eval", "eval.cpus_per_actor=2"]))
    rows = [json.loads(line) for line in storage.read_text(f"{root}/eval/{eval_job.SCORES}").splitlines()]
    per_photo = {Path(r["key"]).stem: r for r in rows}
    echo("\n" + evaluation.format_rows(list(per_photo.values()), list(per_photo)))
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = {"set": EVAL_SET, "samples": samples, "crop": eval_crop, "summary": result["summary"],
               "photos": per_photo}
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    echo(f"\nMLflow run: {state['mlflow']}/#/experiments (experiment samsr-quickstart, run {out['mlflow_run_id']}): "
         f"val/* curves and eval/{EVAL_SET}/*")
    echo(f"model: {model}; SR images: {root}/sr/; scores: {root}/eval/ ({workdir / 'metrics.json'}); "
         f"{time.perf_counter() - t0:.0f}s in all")
    return {**metrics, "mlflow_run_id": out["mlflow_run_id"], "model": model, "stack": state}


__all__ = ["run", "BUCKET", "UPSCALED", "EVAL_SET", "PRESET"]

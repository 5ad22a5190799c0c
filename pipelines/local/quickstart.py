"""`samsr quickstart`: the whole system end to end on bundled photos, on a local stack it starts itself.

1. `samsr local up`: S3 endpoint (moto), MLflow server and a Ray head with token auth on 127.0.0.1
   (an already running stack in `stack` is reused).
2. Uploads the bundled training photos (pipelines/local/photos.py) to s3://samsr-quickstart/images/, the
   held-out ones to …/holdout-hr/ and two of them as ×4 LR images to …/lr/.
3. `samsr shard` (Ray tasks + the tiny random SAM: masks of the HR and of y↑) -> …/shards/.
4. `samsr train` (Ray Train, 1 worker) of each preset in turn, each an MLflow run with validation curves
   (val/* next to val/bicubic_*), checkpoints in …/runs/. By default the CPU recipe that is the best model
   per minute here (benchmarks/RESULTS.md "CPU recipe"): the SAMSR teacher (`samsr-teacher-cpu`), then the
   one-step student (`samsr-student-cpu`) distilled from the teacher's last checkpoint.
5. `samsr eval` of the last model on …/holdout-hr/ (whole photos unless `eval_crop`, `samples` samples each):
   the table against bicubic is printed and logged into that model's MLflow run (eval/bundled-holdout/*).
6. `samsr upscale` of …/lr/ into …/sr/ with that MLflow model `runs:/<id>/model`, and a side-by-side
   (bicubic | model | HR) per upscaled photo in `workdir`; then the stack stops (`keep` leaves it running
   to browse the MLflow UI).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

BUCKET = "samsr-quickstart"
UPSCALED = ("coffee", "camera")          # held-out photos whose LR the quickstart upscales
EVAL_SET = "bundled-holdout"
PRESETS = ("samsr-teacher-cpu", "samsr-student-cpu")


def _png(img) -> bytes:
    from samsr.shards.format import png_bytes

    return png_bytes(img, 1)


def run(workdir: str | Path = "samsr-quickstart", *, keep: bool = False, presets: Sequence[str] = PRESETS,
        sets: Sequence[str] = (), iterations: Sequence[int | None] = (), samples: int = 2, eval_crop: int = 0,
        name: str | None = None, stack: str | Path | None = None,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the quickstart; returns the evaluation (summary + per photo), the MLflow run ids and the stack's URLs.

    `presets`: names or YAML files, one per training stage, in order (a `samsr-student` stage distils the
    stage before it); `sets`: `key=value` overrides for every stage (and the shard/eval/upscale jobs);
    `iterations[i]`: training steps of stage i (None or missing: the preset's); `name`: the runs' prefix
    (default quickstart-<time>); `stack`: the local stack's folder (default `workdir`/stack)."""
    from pipelines import local

    workdir = Path(workdir).resolve()
    stack = Path(stack).resolve() if stack else workdir / "stack"
    t0 = time.perf_counter()
    state = local.up(stack)
    echo(f"local stack: S3 {state['s3']}, MLflow {state['mlflow']}, Ray {state['ray_dashboard']} (token auth)")
    before = dict(os.environ)
    os.environ.update(local.client_env(stack))
    _reload_ray_auth()
    try:
        return _pipeline(workdir, state, list(presets), list(sets), list(iterations), samples, eval_crop,
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


def _upload_photos(root: str, echo) -> None:
    import boto3

    from pipelines.local import photos
    from samsr import images, storage

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    if BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=BUCKET)
    for name in photos.TRAIN:
        storage.write_bytes(f"{root}/images/{name}.png", _png(photos.bundled_photo(name)))
    for name in photos.HELD_OUT:
        hr = images.crop_to_multiple(photos.bundled_photo(name), 4)
        storage.write_bytes(f"{root}/holdout-hr/{name}.png", _png(hr))
        if name in UPSCALED:
            storage.write_bytes(f"{root}/lr/{name}.png", _png(images.make_lr(hr, 4)))
    echo(f"uploaded {len(photos.TRAIN)} training photos to {root}/images/, {len(photos.HELD_OUT)} held-out HR "
         f"photos to {root}/holdout-hr/ and {len(UPSCALED)} LR photos to {root}/lr/")


def _train_stages(root: str, presets: list[str], sets: list[str], iterations: list[int | None], run_name: str,
                  echo) -> list[dict[str, Any]]:
    """`samsr train` of each preset in turn; a samsr-student stage gets the previous stage's checkpoint."""
    from pipelines import train
    from samsr import config

    outs: list[dict[str, Any]] = []
    for i, preset in enumerate(presets):
        method = config.load(preset, sets).method
        stage = [f"job.shards={root}/shards", f"job.storage={root}/runs", f"job.name={run_name}-{method}",
                 "job.num_workers=1", "job.experiment=samsr-quickstart", *sets]
        if i < len(iterations) and iterations[i] is not None:
            stage.append(f"train.iterations={iterations[i]}")
        if method == "samsr-student":
            if not outs:
                raise ValueError("a samsr-student preset distils a teacher: list a samsr-teacher preset before it")
            stage.append(f"resshift.teacher={outs[-1]['checkpoint']}")
        t = time.perf_counter()
        outs.append(train.run(config.load(preset, stage), echo=echo))
        echo(f"trained {method} ({preset}) in {time.perf_counter() - t:.0f}s: run {outs[-1]['mlflow_run_id']}")
    return outs


def _pipeline(workdir: Path, state: dict, presets: list[str], sets: list[str], iterations: list[int | None],
              samples: int, eval_crop: int, run_name: str, echo, t0: float) -> dict[str, Any]:
    from pipelines import eval as eval_job
    from pipelines import shard, upscale
    from samsr import config, evaluation, records

    if not presets:
        raise ValueError("the quickstart needs at least one preset to train")
    root = f"s3://{BUCKET}"
    _upload_photos(root, echo)
    shard.run(config.load(presets[0], ["shard.samples_per_shard=2", "shard.actors=1", "shard.cpus_per_actor=1",
                                       *sets, f"shard.input={root}/images", f"shard.output={root}/shards"]))
    outs = _train_stages(root, presets, sets, iterations, run_name, echo)
    last = presets[-1]
    model = f"runs:/{outs[-1]['mlflow_run_id']}/model"
    result = eval_job.run(config.load(last, [
        *sets, f"eval.model={model}", f"eval.hr={root}/holdout-hr", f"eval.set_name={EVAL_SET}",
        f"eval.samples={samples}", f"eval.crop={eval_crop}", f"eval.output={root}/eval", "eval.cpus_per_actor=2"]))
    rows = records.read_latest(f"{root}/eval/{eval_job.SCORES}", "hr").drop_columns([records.RUN_COLUMN]).to_pylist()
    per_photo = {Path(r["key"]).stem: r for r in rows}
    echo("\n" + evaluation.format_rows(list(per_photo.values()), list(per_photo)))
    upscale.run(config.load(last, [*sets, f"upscale.input={root}/lr", f"upscale.output={root}/sr",
                                   f"upscale.model={model}", "upscale.overwrite=true", "upscale.cpus_per_actor=2"]))
    workdir.mkdir(parents=True, exist_ok=True)
    sheets = _side_by_sides(root, workdir)
    metrics = {"set": EVAL_SET, "samples": samples, "crop": eval_crop, "presets": presets,
               "summary": result["summary"], "photos": per_photo}
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    runs = {o["checkpoint"]: o["mlflow_run_id"] for o in outs}
    echo(f"\nMLflow: {state['mlflow']}/#/experiments (experiment samsr-quickstart; runs "
         f"{', '.join(runs.values())}): val/* curves, and eval/{EVAL_SET}/* in the last run")
    echo(f"model: {model}; SR images: {root}/sr/; side-by-sides (bicubic | model | HR): "
         f"{', '.join(str(p) for p in sheets)}; scores: {workdir / 'metrics.json'}; "
         f"{time.perf_counter() - t0:.0f}s in all")
    return {**metrics, "mlflow_run_id": outs[-1]["mlflow_run_id"], "mlflow_run_ids": list(runs.values()),
            "model": model, "stack": state, "side_by_sides": [str(p) for p in sheets]}


def _side_by_sides(root: str, workdir: Path) -> list[Path]:
    """bicubic | model | HR of each upscaled photo, from the upscale job's outputs, as PNGs in `workdir`."""
    from pipelines.local import photos
    from pipelines.local.demo import side_by_side
    from samsr import images, storage
    from samsr.data import lr_upsampled

    written = []
    for name in UPSCALED:
        hr = images.crop_to_multiple(photos.bundled_photo(name), 4)
        sr = images.decode_image(storage.read_bytes(f"{root}/sr/{name}.png"), scale=1)
        panels = [("bicubic", lr_upsampled(images.make_lr(hr, 4), 4)), ("model", sr), ("HR", hr)]
        path = workdir / f"{name}.png"
        side_by_side(panels).save(path)
        written.append(path)
    return written


__all__ = ["run", "BUCKET", "UPSCALED", "EVAL_SET", "PRESETS"]

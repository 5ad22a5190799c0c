"""`samsr quickstart`: the whole system end to end on bundled photos, on a local stack it starts itself.

1. `samsr local up`: S3 endpoint (moto), MLflow server and a Ray head with token auth on 127.0.0.1.
2. Uploads scikit-image's bundled photos to s3://samsr-quickstart/images/ and the held-out ones'
   ×4 LR versions to …/lr/.
3. `samsr shard` (Ray Data + the tiny random SAM) -> …/shards/.
4. `samsr train` (Ray Train, 1 worker) of the tiny SAM-DiffSR, logged to MLflow, checkpoints in …/runs/.
5. `samsr upscale` of …/lr/ into …/sr/ with the MLflow model `runs:/<id>/model`.
6. Scores the SR images against the HR photos (Y-PSNR/SSIM, bicubic beside) and stops the stack
   (`--keep` leaves it running to browse the MLflow UI).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

BUCKET = "samsr-quickstart"
TRAIN_PHOTOS = ("astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
HELD_OUT = ("coffee", "camera")


def _png(img) -> bytes:
    from samsr.shards.format import png_bytes

    return png_bytes(img, 1)


def run(workdir: str | Path = "samsr-quickstart", *, keep: bool = False, iterations: int = 300,
        rrdb_iterations: int = 200, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the quickstart; returns the metrics per held-out photo, the MLflow run id and the stack's URLs."""
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
        return _pipeline(workdir, state, iterations, rrdb_iterations, echo, t0)
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


def _pipeline(workdir: Path, state: dict, iterations: int, rrdb_iterations: int, echo, t0: float) -> dict[str, Any]:
    import boto3

    from pipelines import shard, train, upscale
    from pipelines.demo import bundled_photo
    from samsr import config, images, metrics, storage

    s3 = boto3.client("s3", endpoint_url=state["s3"])
    if BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=BUCKET)
    root = f"s3://{BUCKET}"
    for name in TRAIN_PHOTOS:
        storage.write_bytes(f"{root}/images/{name}.png", _png(bundled_photo(name)))
    hrs = {}
    for name in HELD_OUT:
        hrs[name] = images.crop_to_multiple(bundled_photo(name), 4)
        storage.write_bytes(f"{root}/lr/{name}.png", _png(images.make_lr(hrs[name], 4)))
    echo(f"uploaded {len(TRAIN_PHOTOS)} training photos to {root}/images/ and {len(HELD_OUT)} LR photos to {root}/lr/")

    base = ["shard.samples_per_shard=2", "shard.actors=1", "shard.cpus_per_actor=1"]
    shard.run(config.load("samdiffsr-tiny", [*base, f"shard.input={root}/images", f"shard.output={root}/shards"]))
    run_name = time.strftime("quickstart-%Y%m%d-%H%M%S")
    out = train.run(config.load("samdiffsr-tiny", [
        f"job.shards={root}/shards", f"job.storage={root}/runs", f"job.name={run_name}", "job.num_workers=1",
        "job.experiment=samsr-quickstart", f"train.iterations={iterations}",
        f"train.rrdb_iterations={rrdb_iterations}", f"train.checkpoint_every={max(iterations, 1)}", "train.log_every=50"]))
    model = f"runs:/{out['mlflow_run_id']}/model"
    upscale.run(config.load("samdiffsr-tiny", [f"upscale.input={root}/lr", f"upscale.output={root}/sr",
                                               f"upscale.model={model}", "upscale.overwrite=true",
                                               "upscale.cpus_per_actor=2"]))

    results = {}
    for name, hr in hrs.items():
        sr = images.decode_image(storage.read_bytes(f"{root}/sr/{name}.png"), scale=1)
        bic = images.to_uint8(images.upscale(images.to_tensor(images.make_lr(hr, 4))[None], 4))[0]
        results[name] = {"bicubic": metrics.evaluate(bic, hr, 4), "SAM-DiffSR": metrics.evaluate(sr, hr, 4)}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.json").write_text(json.dumps(results, indent=2))
    echo(f"\n{'photo':<10} {'output':<15} {'PSNR-Y':>8} {'SSIM-Y':>8}")
    for name, rows in results.items():
        for label, m in rows.items():
            echo(f"{name:<10} {label:<15} {m['psnr_y']:8.2f} {m['ssim_y']:8.4f}")
    echo(f"\nMLflow run: {state['mlflow']}/#/experiments (experiment samsr-quickstart, run {out['mlflow_run_id']})")
    echo(f"model: {model}; SR images: {root}/sr/ ({workdir / 'metrics.json'}); {time.perf_counter() - t0:.0f}s in all")
    return {"metrics": results, "mlflow_run_id": out["mlflow_run_id"], "model": model, "stack": state}


__all__ = ["run", "BUCKET", "TRAIN_PHOTOS", "HELD_OUT"]

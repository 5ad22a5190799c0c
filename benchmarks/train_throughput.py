"""Train job throughput: Ray Train (1 and 2 DDP workers) vs the plain single-process loop, same data.

    .venv/bin/python benchmarks/train_throughput.py [--iterations 60] [--photos 8] [--mlflow]

Shards: 512x512 crops of bundled photos, superpixel masks, written in-process. Model: the tiny
SAMSR teacher, 64 px crops, global batch 8, one torch thread per process. The plain loop trains on the
same samples decoded into memory (`samsr.loop.train`). For the job, samples/s is measured inside the
training loop (start-up excluded) and reported with the checkpoint; the wall time includes Ray Train's
start-up. `--mlflow` starts a local MLflow server and logs every 10 steps, as a user would.
Prints one JSON line per run; the numbers go to benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.photos import LEGACY_TRAIN as TRAIN_PHOTOS
from pipelines.photos import bundled_photo
from samsr import config

PHOTOS = TRAIN_PHOTOS + ("coffee", "camera", "coins")


def png(name: str, size: int = 512) -> bytes:
    img = bundled_photo(name)
    h, w = img.shape[:2]
    reps = (-(-size // h), -(-size // w), 1)
    buf = io.BytesIO()
    Image.fromarray(np.tile(img, reps)[:size, :size]).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--photos", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--mlflow", action="store_true")
    args = p.parse_args()
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN=secrets.token_hex(32))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import ray
    import torch

    from pipelines import services, train
    from samsr.loop import train as plain_train
    from samsr.method import build_method
    from samsr.shards import stream
    from samsr.shards.process import write_shards_in_process
    from samsr.structure.segmenters import build_segmenter

    root = Path(tempfile.mkdtemp(prefix="train-bench-"))
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    mlflow = None
    try:
        names = (PHOTOS * (1 + args.photos // len(PHOTOS)))[:args.photos]
        base = config.load("samsr-teacher-tiny", ["segmenter.kind=superpixel", "data.hr_crop=64", "train.batch_size=8",
                                                  f"train.iterations={args.iterations}", "train.num_threads=1",
                                                  f"train.checkpoint_every={args.iterations}", "train.log_every=10"])
        shards = write_shards_in_process([(f"{i:03d}-{n}.png", png(n)) for i, n in enumerate(names)],
                                         str(root / "shards"), base, build_segmenter(base.segmenter), per_shard=2)
        samples = list(stream.iter_samples(shards, np.random.default_rng(0), need_cover=False))
        torch.set_num_threads(1)
        torch.manual_seed(0)
        method = build_method(base)
        t0 = time.perf_counter()
        plain_train(method, samples, base, seed=0)
        bare = args.iterations * base.train.batch_size / (time.perf_counter() - t0)
        print(json.dumps({"run": "plain loop", "samples_per_s": bare}), flush=True)
        if args.mlflow:
            mlflow = services.start_mlflow(root / "mlflow")
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        results = {}
        for workers in (1, 2):
            cfg = config.load("samsr-teacher-tiny", [
                *[f"{k}={v}" for k, v in config.flatten(base).items() if k.startswith(("data.", "train.", "segmenter.kind"))],
                f"job.shards={root / 'shards'}", f"job.storage={root / 'runs'}", f"job.name=bench-{workers}",
                f"job.num_workers={workers}", f"job.tracking_uri={mlflow.url if mlflow else ''}"])
            t0 = time.perf_counter()
            out = train.run(cfg, echo=lambda s: None)
            wall = time.perf_counter() - t0
            results[workers] = out["metrics"]["samples_per_s"]
            print(json.dumps({"run": f"ray train, {workers} worker(s)", "samples_per_s": results[workers],
                              "wall_s": wall, "mlflow": bool(mlflow)}), flush=True)
        print(f"SUMMARY samples/s plain {bare:.1f}; job 1 worker {results[1]:.1f} ({results[1] / bare:.2f}x plain); "
              f"2 workers {results[2]:.1f} ({results[2] / results[1]:.2f}x of 1 worker)")
    finally:
        ray.shutdown()
        if mlflow:
            mlflow.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()

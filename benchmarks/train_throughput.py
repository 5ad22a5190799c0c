"""Train job throughput: the Ray Data ingest alone, a plain loop fed by it, and the Ray Train job.

    .venv/bin/python benchmarks/train_throughput.py [--iterations 60] [--photos 8] [--mlflow] [--device cuda]

Shards: 512x512 crops of bundled photos, superpixel masks, written in-process. Model: the tiny
SAMSR teacher, 64 px crops, global batch 8, one torch thread per process. Side by side in one run:
1. step: samples/s one training step consumes (the same batch again and again: no data cost);
2. data path: crops/s the Ray Data ingest (pipelines/train_data.build) delivers to one consumer with
   1 and with 2 decode tasks at a time, and the per-rank stream (samsr.shards.stream.batches, one
   prefetch thread) for comparison;
3. plain loop: train_step in this process, fed by the same Ray Data path (Ray Train's overhead isolated);
4. the Ray Train job with 1 and 2 workers (samples/s measured inside the training loop, start-up excluded;
   the wall time includes Ray Train's start-up). `--mlflow` logs every 10 steps to a local server.
Prints one JSON line per measurement and a summary; the numbers go to benchmarks/RESULTS.md by hand.
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

from pipelines.local.photos import LEGACY_TRAIN as TRAIN_PHOTOS
from pipelines.local.photos import bundled_photo
from samsr import config

PHOTOS = TRAIN_PHOTOS + ("coffee", "camera", "coins")


def png(name: str, size: int = 512) -> bytes:
    img = bundled_photo(name)
    h, w = img.shape[:2]
    reps = (-(-size // h), -(-size // w), 1)
    buf = io.BytesIO()
    Image.fromarray(np.tile(img, reps)[:size, :size]).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def emit(run: str, samples_per_s: float, **extra) -> None:
    print(json.dumps({"run": run, "samples_per_s": round(samples_per_s, 2), **extra}), flush=True)


def batches_of(cfg, data, steps: int, concurrency: int | None = None):
    from pipelines import train_data

    tally = train_data.new_tally()
    ds = train_data.build(cfg, data, steps, tally, concurrency=concurrency)
    return train_data.WorkerBatches(cfg, 0, tally, shard=ds.iterator())


def data_rate(cfg, data, steps: int, tasks: int) -> float:
    """Crops/s one consumer gets from the Ray Data ingest, after the first batch (`steps` batches: far
    more than Ray Data buffers ahead, so this is the decode rate, not a buffer being emptied)."""
    it = iter(batches_of(cfg, data, steps, concurrency=tasks))
    next(it)
    t0 = time.perf_counter()
    n = sum(next(it)["hr"].shape[0] for _ in range(steps - 1))
    return n / (time.perf_counter() - t0)


def stream_rate(cfg, data, steps: int) -> float:
    from samsr.shards import stream

    it = stream.batches(data["filled"], batch_size=cfg.train.batch_size, hr_crop=cfg.data.hr_crop, scale=cfg.data.scale,
                        seed=0, pool=cfg.job.sample_pool, crops_per_sample=cfg.job.crops_per_sample)
    next(it)
    t0 = time.perf_counter()
    n = sum(next(it)["hr"].shape[0] for _ in range(steps - 1))
    return n / (time.perf_counter() - t0)


def _stepper(cfg, device: str):
    import torch

    from samsr.method import build_method
    from samsr.train_step import batch_to, make_optimizer, train_step

    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    method.train()
    opt = make_optimizer(method.trainable_parameters(), cfg.train.lr)
    gen = torch.Generator(device).manual_seed(0)

    def step(batch) -> int:
        train_step(method, opt, batch_to(batch, torch.device(device)), gen, cfg.train.grad_clip, cfg.train.bf16)
        return batch["hr"].shape[0]

    return step


def step_rate(cfg, data, device: str, steps: int = 20) -> float:
    """Samples/s of train_step alone: one batch, reused."""
    step = _stepper(cfg, device)
    batch = next(iter(batches_of(cfg, data, 2)))
    step(batch)
    t0 = time.perf_counter()
    n = sum(step(batch) for _ in range(steps))
    return n / (time.perf_counter() - t0)


def plain_on_dataset(cfg, data, steps: int, device: str) -> float:
    """Samples/s of train_step in this process fed by the Ray Data ingest (what one Ray Train worker does)."""
    step = _stepper(cfg, device)
    it = iter(batches_of(cfg, data, steps))
    step(next(it))
    t0 = time.perf_counter()
    n = sum(step(next(it)) for _ in range(steps - 1))
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--photos", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--mlflow", action="store_true")
    p.add_argument("--data-batches", type=int, default=300, help="batches read to time the data path alone")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: steps on the GPU, job.use_gpu")
    args = p.parse_args()
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN=secrets.token_hex(32))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import ray
    import torch

    from pipelines import train

    from pipelines.local import services
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
        write_shards_in_process([(f"{i:03d}-{n}.png", png(n)) for i, n in enumerate(names)],
                                str(root / "shards"), base, build_segmenter(base.segmenter), per_shard=2)
        torch.set_num_threads(1)
        ray.init(num_cpus=args.num_cpus, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
                 _temp_dir=temp, _node_ip_address="127.0.0.1", log_to_driver=False)
        gpu = ["job.use_gpu=true"] if args.device == "cuda" else []
        cfg = config.load("samsr-teacher-tiny", [
            *[f"{k}={v}" for k, v in config.flatten(base).items() if k.startswith(("data.", "train.", "segmenter.kind"))],
            f"job.shards={root / 'shards'}", f"job.storage={root / 'runs'}", "job.val_images=0", "train.eval_every=0", *gpu])
        data = train.plan_data(cfg)
        steps = args.iterations
        r = {"step": step_rate(cfg, data, args.device)}
        emit("train step alone (same batch)", r["step"])
        for tasks in (1, 2):
            r[f"data_{tasks}"] = data_rate(cfg, data, args.data_batches, tasks)
            emit(f"ray data ingest, {tasks} decode task(s)", r[f"data_{tasks}"])
        r["stream"] = stream_rate(cfg, data, args.data_batches)
        emit("per-rank stream (1 prefetch thread)", r["stream"])
        r["plain"] = plain_on_dataset(cfg, data, steps, args.device)
        emit("plain loop fed by the ray data ingest", r["plain"])
        if args.mlflow:
            mlflow = services.start_mlflow(root / "mlflow")
        for workers in (1, 2):
            job = config.replace(cfg, job=config.replace(cfg.job, name=f"bench-{workers}", num_workers=workers,
                                                         tracking_uri=mlflow.url if mlflow else ""))
            t0 = time.perf_counter()
            out = train.run(job, echo=lambda s: None)
            r[f"job_{workers}"] = out["metrics"]["samples_per_s"]
            emit(f"ray train, {workers} worker(s)", r[f"job_{workers}"], wall_s=time.perf_counter() - t0,
                 mlflow=bool(mlflow))
        print(f"SUMMARY samples/s: step alone {r['step']:.1f}; data path 1 task {r['data_1']:.1f} "
              f"({r['data_1'] / r['step']:.2f}x the step), 2 tasks {r['data_2']:.1f} ({r['data_2'] / r['data_1']:.2f}x "
              f"of 1 task), per-rank stream {r['stream']:.1f}; plain loop on the data path {r['plain']:.1f}; "
              f"job 1 worker {r['job_1']:.1f} ({r['job_1'] / r['plain']:.2f}x the plain loop), 2 workers "
              f"{r['job_2']:.1f} ({r['job_2'] / r['job_1']:.2f}x of 1 worker)")
    finally:
        ray.shutdown()
        if mlflow:
            mlflow.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Shard job throughput vs a bare single-process loop, actor scaling, and worker memory vs input size.

    .venv/bin/python benchmarks/shard_throughput.py [--images 16] [--rss-small 200 --rss-large 2000] [--no-rss]
        [--device cpu|cuda] [--segmenter superpixel|tiny-sam] [--sam-checkpoint sam_vit_b.pth]

1. DIV2K-scale inputs (2040×1356 PNGs tiled/flipped from bundled skimage photos).
2. Bare loop: one process, one torch thread, `samsr.shards.process.process_image` + tar encode per image.
3. The Ray job (pipelines/shard.run) with 1 and 2 superpixel actors on the same images.
4. Peak anonymous RSS (RssAnon: shared memory, i.e. the object store, excluded), sampled every 0.2 s,
   of the driver (this process: it plans and receives one summary per shard) and summed over Ray worker
   processes, for a small and a large run of 128 px images (200 vs 2000 by default): the driver's
   must stay flat (the job's sample bytes never pass through it).
Prints one JSON line per measurement and a summary; numbers go to benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

DIV2K = (1356, 2040)   # H, W


def tiled_photo(i: int, shape: tuple[int, int]) -> np.ndarray:
    """(H,W,3) uint8: bundled photos tiled with flips (pattern chosen by i), cropped to `shape`."""
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    h, w = shape
    out = np.zeros((h, w, 3), np.uint8)
    y = 0
    r = 0
    while y < h:
        x, th = 0, 0
        while x < w:
            p = photos[(i + r + x // 97) % len(photos)]
            p = p[:, ::-1] if (i + r) % 2 else p
            p = p[::-1] if (i + x) % 3 == 0 else p
            th = max(th, p.shape[0])
            ph, pw = min(p.shape[0], h - y), min(p.shape[1], w - x)
            out[y:y + ph, x:x + pw] = p[:ph, :pw]
            x += pw
        y += th
        r += 1
    return out


def make_inputs(folder: Path, n: int, shape: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(tiled_photo(i, shape)).save(folder / f"img{i:05d}.png", compress_level=1)


def bare_loop(cfg) -> float:
    """Images/s of decode + segment + encode in this process, one torch thread."""
    import torch

    from samsr import storage
    from samsr.shards import format as fmt
    from samsr.shards import plan as plan_mod
    from samsr.shards.process import Failure, process_image
    from samsr.structure.segmenters import build_segmenter

    torch.set_num_threads(1)
    plan = plan_mod.build_plan(cfg)
    seg = build_segmenter(cfg.segmenter)
    t0 = time.perf_counter()
    n = 0
    for shard in plan.shards:
        samples = []
        for e in shard:
            out = process_image(e.uri, storage.read_bytes(e.uri), cfg, seg)
            if not isinstance(out, Failure):
                samples.append((e.key, out))
            n += 1
        fmt.tar_bytes(samples)
    return n / (time.perf_counter() - t0)


def rss_anon(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_rss_anon() -> int:
    """Sum of RssAnon (bytes) over processes whose title starts with 'ray::' (Ray workers)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                continue
            total += rss_anon(pid)
        except OSError:
            continue
    return total


class PeakSampler:
    def __init__(self, period: float = 0.2) -> None:
        self.peak = self.driver_peak = 0
        self.period, self._stop = period, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, worker_rss_anon())
            self.driver_peak = max(self.driver_peak, rss_anon())
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def job(cfg, actors: int, out: Path) -> tuple[float, int, int, int]:
    """(images/s, peak worker RssAnon, peak driver RssAnon, bytes the driver received from workers)."""
    from pipelines import shard
    from samsr import config

    cfg = config.replace(cfg, shard=config.replace(cfg.shard, output=str(out), actors=actors))
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        stats = shard.run(cfg, echo=lambda s: None)
        seconds = time.perf_counter() - t0
    return stats["ok"] / seconds, sampler.peak, sampler.driver_peak, stats["driver_received_bytes_this_run"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4, help="DIV2K-scale images for the throughput runs")
    p.add_argument("--rss-small", type=int, default=200)
    p.add_argument("--rss-large", type=int, default=2000)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--no-rss", action="store_true", help="skip the memory runs")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the segmenter on the GPU (segmenter.device=cuda, 1 GPU per actor, num_gpus=1 for Ray)")
    p.add_argument("--segmenter", choices=("superpixel", "tiny-sam"), default="superpixel")
    p.add_argument("--sam-checkpoint", default="", help="a real SAM checkpoint (vit_b): segmenter.kind=sam")
    args = p.parse_args()

    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN=secrets.token_hex(32))
    import ray

    from samsr import config

    root = Path(tempfile.mkdtemp(prefix="shard-bench-"))
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    results = {}
    try:
        make_inputs(root / "div2k", args.images, DIV2K)
        gpu = ["segmenter.device=cuda", "shard.gpus_per_actor=1"] if args.device == "cuda" else []
        seg = (["segmenter.kind=sam", f"segmenter.checkpoint={args.sam_checkpoint}", "segmenter.model_type=vit_b"]
               if args.sam_checkpoint else [f"segmenter.kind={args.segmenter}"])
        cfg = config.load("samdiffsr", [*seg, f"shard.input={root / 'div2k'}",
                                        "shard.samples_per_shard=2", "shard.batch_size=1", "shard.cpus_per_actor=1", *gpu])
        results["bare_loop_images_per_s"] = bare_loop(cfg)
        print(json.dumps({"bare_loop_images_per_s": results["bare_loop_images_per_s"]}), flush=True)
        ray.init(num_cpus=args.num_cpus, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        for actors in (1, 2):
            ips, peak, driver, got = job(cfg, actors, root / f"out-{actors}")
            results[f"job_{actors}_actor_images_per_s"] = ips
            print(json.dumps({"actors": actors, "images_per_s": ips, "peak_worker_rss_anon_mb": peak / 2**20,
                              "peak_driver_rss_anon_mb": driver / 2**20, "driver_received_bytes": got}), flush=True)
        for n in () if args.no_rss else (args.rss_small, args.rss_large):
            make_inputs(root / f"small{n}", n, (128, 128))
            small = config.replace(cfg, shard=config.replace(cfg.shard, input=str(root / f"small{n}"),
                                                             samples_per_shard=16, batch_size=4))
            ips, peak, driver, got = job(small, 1, root / f"rss-{n}")
            results[f"rss_{n}_images_peak_mb"] = peak / 2**20
            results[f"driver_{n}_images_peak_mb"] = driver / 2**20
            print(json.dumps({"images": n, "size": 128, "images_per_s": ips, "peak_worker_rss_anon_mb": peak / 2**20,
                              "peak_driver_rss_anon_mb": driver / 2**20, "driver_received_bytes": got}), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
    bare = results["bare_loop_images_per_s"]
    print(f"SUMMARY images/s bare {bare:.3f}, job 1 actor {results['job_1_actor_images_per_s']:.3f} "
          f"({results['job_1_actor_images_per_s'] / bare:.2f}x), 2 actors {results['job_2_actor_images_per_s']:.3f} "
          f"({results['job_2_actor_images_per_s'] / results['job_1_actor_images_per_s']:.2f}x of 1 actor)")
    if not args.no_rss:
        small, large = results[f"driver_{args.rss_small}_images_peak_mb"], results[f"driver_{args.rss_large}_images_peak_mb"]
        print(f"SUMMARY peak driver RssAnon {small:.0f} MB at {args.rss_small} vs {large:.0f} MB at {args.rss_large} "
              f"images ({large / small:.2f}x)")
        print(f"SUMMARY peak worker RssAnon {results[f'rss_{args.rss_small}_images_peak_mb']:.0f} MB at "
              f"{args.rss_small} vs {results[f'rss_{args.rss_large}_images_peak_mb']:.0f} MB at {args.rss_large} images")


if __name__ == "__main__":
    main()

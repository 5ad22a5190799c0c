"""`samsr shard --dry-run`: segment a small sample in this process, time it, and print what the whole
job would take (images, shards, bytes, wall time and GPU-hours at the requested actor count).
Writes nothing.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from samsr import storage
from samsr.config import Config
from samsr.shards import format as fmt
from samsr.shards import plan as plan_mod
from samsr.shards import process
from samsr.structure.segmenters import build_segmenter

SAMPLE_IMAGES = 4
TAR_OVERHEAD = 512   # tar header per member


def dry_run(cfg: Config, echo: Callable[[str], None] = print, sample: int = SAMPLE_IMAGES) -> dict[str, Any]:
    """Plan + timing of `sample` images spread over the listing -> the estimate dict (also echoed)."""
    import torch

    torch.set_num_threads(1)   # what one actor uses
    plan = plan_mod.build_plan(cfg)
    entries = [e for s in plan.shards for e in s]
    n = len(entries)
    picks = [entries[int(i * n / sample)] for i in range(min(sample, n))]
    t_build = time.perf_counter()
    segmenter = build_segmenter(cfg.segmenter)
    t_build = time.perf_counter() - t_build
    seconds, sizes, failed = 0.0, [], 0
    for e in picks:
        data = storage.read_bytes(e.uri)
        t0 = time.perf_counter()
        out = process.process_image(e.uri, data, cfg, segmenter)
        seconds += time.perf_counter() - t0
        if isinstance(out, process.Failure):
            failed += 1
            continue
        sizes.append(sum(len(v) + TAR_OVERHEAD for v in out.values()))
    per_image = seconds / len(picks) if picks else 0.0
    ips = 1.0 / per_image if per_image > 0 else 0.0
    ok_frac = len(sizes) / len(picks) if picks else 0.0
    est_bytes = int(sum(sizes) / len(sizes) * n * ok_frac) if sizes else 0
    actors = max(1, cfg.shard.actors)
    wall_s = n * per_image / actors
    gpu = torch.cuda.is_available()
    report = {"images": n, "rejected_keys": len(plan.rejected), "shards": len(plan.shards),
              "samples_per_shard": cfg.shard.samples_per_shard, "sampled": len(picks), "sample_failed": failed,
              "segmenter_load_s": round(t_build, 3), "images_per_s_per_actor": round(ips, 4),
              "estimated_bytes": est_bytes, "actors": actors, "estimated_wall_s": round(wall_s, 1),
              "estimated_gpu_hours": round(n * per_image * cfg.shard.gpus_per_actor / 3600, 3) if gpu else 0.0,
              "estimated_actor_hours": round(n * per_image / 3600, 3), "device": "cuda" if gpu else "cpu"}
    echo(f"samsr shard --dry-run: {n} images -> {len(plan.shards)} shards of {cfg.shard.samples_per_shard}; "
         f"sampled {len(picks)} ({failed} failed): {ips:.3f} images/s per actor on {report['device']}; "
         f"estimated {est_bytes / 1e9:.3f} GB, {wall_s / 3600:.2f} h wall at {actors} actor(s), "
         f"{report['estimated_gpu_hours']:.2f} GPU-hours ({report['estimated_actor_hours']:.2f} actor-hours)")
    echo(fmt.dumps(report).decode())
    return report


__all__ = ["dry_run"]

"""Training's data plan on the driver (issue 20, item 4): what building the training dataset costs the
driver for many shards, the design before (one `from_items` block per (pass, shard), built on the driver,
and the shard list in every worker's config) against now (`pipelines.train_data.plan`: `ray.data.range`
of a bounded number of blocks, each expanded into its (pass, shard) rows in a task; `train.worker_config`).

    .venv/bin/python benchmarks/train_plan.py [--shards 10000] [--passes 3] [--num-cpus 2]

No shard is read (made-up URIs): the decode stage is a stand-in that passes each (pass, shard) row on, with
the decode's resources (so that the new plan fuses with it, as in `train_data.build`). After a warm-up run,
one JSON line per design: seconds to build the dataset on the driver, the driver's resident memory growth,
the blocks, seconds until the first 100 rows arrive and (`--all`) until all have, and the pickled worker
config's bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import tempfile
import time

import numpy as np

from samsr import config


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def stand_in_decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """In place of train_data.decode_task (batch_size=1): the row's pass, as if it were its crops."""
    return {"pass": batch["pass"]}


def old_design(cfg, data, steps: int, remote: dict):
    """The dataset as built before: every (pass, shard) row a dict on the driver, one block each."""
    import ray

    from pipelines import train_data

    uris = data["filled"]
    rows = [{"uri": uris[int(i)], "pass": p} for p in range(train_data.passes_needed(cfg, data, steps))
            for i in np.random.default_rng([cfg.train.seed, p]).permutation(len(uris))]
    return ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        stand_in_decode, batch_size=1, batch_format="numpy", **remote)


def new_design(cfg, data, steps: int, blocks: int, remote: dict):
    from pipelines import train_data

    return train_data.plan(cfg, data, steps, blocks, **remote).map_batches(
        stand_in_decode, batch_size=1, batch_format="numpy", **remote)


def measure(name: str, build, loop_config: dict, read_all: bool) -> dict:
    t0, m0 = time.perf_counter(), rss_mb()
    ds = build()
    built, grown = time.perf_counter() - t0, rss_mb() - m0
    t0 = time.perf_counter()
    it = iter(ds.iter_rows())
    first = [next(it) for _ in range(100)]
    out = {"design": name, "build_s": round(built, 3), "driver_rss_growth_mb": round(grown, 1),
           "blocks": ds._logical_plan.initial_num_blocks(), "first_100_rows_s": round(time.perf_counter() - t0, 2),
           "worker_config_bytes": len(pickle.dumps(loop_config))}
    if read_all:
        t0 = time.perf_counter()
        out["rows"] = len(first) + sum(1 for _ in it)
        out["all_rows_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--passes", type=int, default=3, help="passes the run needs, the spare one included")
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray (decode slots)")
    p.add_argument("--all", action="store_true", help="also read every plan row (slow for the old design)")
    args = p.parse_args()
    os.environ.update(RAY_USAGE_STATS_ENABLED="0")
    import ray

    from pipelines import train, train_data

    cfg = config.load("samsr-teacher-tiny", ["train.batch_size=1", "job.crops_per_sample=1", "train.seed=0"])
    uris = [f"s3://bucket/shards/shard-{i:06d}.tar" for i in range(args.shards)]
    data = {"filled": uris, "counts": dict.fromkeys(uris, 1), "holdout": []}
    steps = (args.passes - 1) * args.shards           # one crop a sample, one sample a shard: passes - 1 + spare
    assert train_data.passes_needed(cfg, data, steps) == args.passes
    rows = args.passes * args.shards
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        slots = int(args.num_cpus // cfg.job.decode_cpus)
        remote = {"num_cpus": cfg.job.decode_cpus, "concurrency": None}
        ray.data.range(4, override_num_blocks=4).map_batches(lambda b: b, batch_size=1, **remote).take_all()  # warm-up
        blocks = train_data.plan_blocks(rows, slots)
        new = measure("now: range + plan tasks", lambda: new_design(cfg, data, steps, blocks, remote),
                      train.worker_config(cfg, data, "run-id"), args.all)
        old_config = {"cfg": train.redact_config(cfg), "fail_after_steps": 0, "data": data, "mlflow_run_id": "run-id"}
        old = measure("before: from_items, a block per row", lambda: old_design(cfg, data, steps, remote), old_config, args.all)
        print(f"SUMMARY {args.shards} shards x {args.passes} passes = {rows} rows, {args.num_cpus} CPUs: "
              f"build {old['build_s']:.2f} s -> {new['build_s']:.3f} s, driver RSS +{old['driver_rss_growth_mb']:.0f} MB "
              f"-> +{new['driver_rss_growth_mb']:.0f} MB, blocks {old['blocks']} -> {new['blocks']}, worker config "
              f"{old['worker_config_bytes']} -> {new['worker_config_bytes']} bytes")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

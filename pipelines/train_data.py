"""Training ingest through Ray Data: shards are read, decoded and cropped by Ray Data tasks on the CPUs
of any node, and each Ray Train worker takes its batches from its split of that stream
(`ray.train.get_dataset_shard("train")` -> `iter_torch_batches` with a local shuffle buffer).

The dataset (`build`, on the driver): one row per (pass, shard) for as many passes over the training
shards as the run's steps need (+1 spare), shards in a fresh order each pass; a task per row runs
`samsr.shards.crops.shard_crops` (`job.decode_cpus` CPUs each, as many at once as the cluster has CPUs
for) and yields `job.crops_per_sample` crops per good sample. Ray Train splits the stream between the
workers (equal split: every rank gets as many rows). A worker that runs out (skips ate the spare
pass) starts another epoch of it.

Seed story. Reproducible for a given seed: the model's initial weights, each worker's diffusion noise
and timesteps, the shard order of every pass, and the crops and flips of each (shard, pass), whoever
decodes them. Not reproducible: the order in which decode tasks finish, hence which worker sees which
crops and in what order (the local shuffle is seeded from (seed, rank), but its input order is not).
So two runs with one seed train on the same crops and differ in their batches; the final scores of
such runs are compared in benchmarks/RESULTS.md. A resumed run restores model, optimizer, EMA, LR
schedule and step exactly; its data stream starts again at pass 0 (the driver does not know the step a
restart resumes from), so it sees the first passes' crops again, in another order.

Bad samples are skipped in the decode tasks and counted by one small actor (`SkipTally`); workers read
the totals to log `data/skipped_samples` and stop past `job.max_skipped_fraction`.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from samsr import config as config_mod
from samsr.config import Config
from samsr.shards import crops, stream

CHECK_EVERY = 10            # batches between two reads of the skip tally


class SkipTally:
    """Samples read (decoded or skipped) and skipped by every decode task of this job (a Ray actor, 0 CPUs)."""

    def __init__(self) -> None:
        self.read, self.skipped, self.last = 0, 0, ""

    def add(self, read: int, skipped: int, last: str) -> None:
        self.read, self.skipped = self.read + read, self.skipped + skipped
        self.last = last or self.last

    def totals(self) -> tuple[int, int, str]:
        return self.read, self.skipped, self.last


def per_worker_batch(cfg: Config) -> int:
    """train.batch_size is the global batch; each of job.num_workers workers takes an equal part."""
    n = cfg.job.num_workers
    if n < 1 or cfg.train.batch_size % n:
        raise config_mod.ConfigError(f"train.batch_size={cfg.train.batch_size} must split evenly over "
                                     f"job.num_workers={n}")
    return cfg.train.batch_size // n


def new_tally():
    """The job's SkipTally: 0 CPUs, on the driver's node (the head on a cluster), so that losing a worker
    node does not take it along; restarted (its counts from zero) and its calls retried if it dies anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(SkipTally).options(
        scheduling_strategy=here).remote()


def passes_needed(cfg: Config, data: dict[str, Any], steps: int) -> int:
    """Passes over the training shards that give `steps` global batches, + 1 spare."""
    samples = sum(data["counts"][u] for u in data["filled"]) - len(data["holdout"])
    per_pass = max(1, samples) * cfg.job.crops_per_sample
    return math.ceil(steps * cfg.train.batch_size / per_pass) + 1


def decode_task(batch: dict[str, np.ndarray], *, cfg_dict: dict, holdout: frozenset[str], counts: dict[str, int],
                seed: int, tally) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map_batches fn (batch_size=1): one (uri, pass) row -> column batches of crops."""
    import ray
    import torch

    torch.set_num_threads(1)
    cfg = config_mod.from_dict(cfg_dict)
    uri, pass_index = str(batch["uri"][0]), int(batch["pass"][0])
    count = stream.SkipCount()
    try:
        yield from crops.shard_crops(uri, seed=seed, pass_index=pass_index, hr_crop=cfg.data.hr_crop,
                                     scale=cfg.data.scale, crops_per_sample=cfg.job.crops_per_sample,
                                     flips=cfg.data.flips, need_cover=cfg.method == "samsr-student",
                                     exclude=holdout, expected=counts.get(uri, 0), count=count)
    finally:
        if count.read or count.skipped:       # read: decoded and skipped samples, as in the per-rank stream
            ray.get(tally.add.remote(count.read, count.skipped, count.last))   # counted before the task ends


def build(cfg: Config, data: dict[str, Any], steps: int, tally, concurrency: int | None = None):
    """The training dataset (see the module doc) for `steps` global steps; `concurrency` caps the decode
    tasks running at once (default: as many as the cluster's CPUs allow)."""
    import ray

    seed = cfg.train.seed
    uris = data["filled"]
    rows = [{"uri": uris[int(i)], "pass": p}
            for p in range(passes_needed(cfg, data, steps))
            for i in np.random.default_rng([seed, p]).permutation(len(uris))]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    return ds.map_batches(decode_task, batch_size=1, batch_format="numpy", num_cpus=cfg.job.decode_cpus,
                          concurrency=concurrency,
                          fn_kwargs={"cfg_dict": config_mod.to_dict(cfg), "holdout": frozenset(data["holdout"]),
                                     "counts": dict(data["counts"]), "seed": seed, "tally": tally})


def _collate_fn():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            return crops.collate(batch)

    return Collate()


class WorkerBatches:
    """A Ray Train worker's endless batches from its split of the dataset, and the skip totals since
    it started (`skipped()`), checked against `job.max_skipped_fraction` every CHECK_EVERY batches."""

    def __init__(self, cfg: Config, rank: int, tally, *, shard=None) -> None:
        import ray
        import ray.train

        self.cfg, self.rank, self.tally = cfg, rank, tally
        self.split = shard if shard is not None else ray.train.get_dataset_shard("train")
        self.base = ray.get(tally.totals.remote())[:2]
        self.batches = 0

    def totals(self) -> tuple[int, int, str]:
        import ray

        read, skipped, last = ray.get(self.tally.totals.remote())
        return read - self.base[0], skipped - self.base[1], last

    def skipped(self) -> int:
        return self.totals()[1]

    def check(self, end_of_pass: bool = False) -> None:
        read, skipped, last = self.totals()
        limit = self.cfg.job.max_skipped_fraction
        if read and (end_of_pass or read >= stream.MIN_READ_FOR_CHECK) and skipped > limit * read:
            raise stream.ShardDataError(f"{skipped} of {read} samples read were bad, more than "
                                        f"job.max_skipped_fraction={limit:g}; last: {last}")

    def __iter__(self) -> Iterator[dict]:
        size = per_worker_batch(self.cfg)
        while True:
            got = 0
            for batch in self.split.iter_torch_batches(
                    batch_size=size, collate_fn=_collate_fn(), drop_last=True, prefetch_batches=2,
                    local_shuffle_buffer_size=self.cfg.job.sample_pool * self.cfg.job.crops_per_sample,
                    local_shuffle_seed=self.cfg.train.seed * 1009 + self.rank):
                got += 1
                self.batches += 1
                if self.batches % CHECK_EVERY == 0:
                    self.check()
                yield batch
            self.check(end_of_pass=True)
            if not got:
                read, skipped, last = self.totals()
                raise stream.ShardDataError(
                    f"rank {self.rank} got no training batch from the shards: {read} good and {skipped} bad "
                    f"sample(s) read" + (f" (last: {last})" if last else "") +
                    "; add shards, pass --val, or lower job.val_images")

"""Training ingest through Ray Data: shards are read, decoded and cropped by Ray Data tasks on the CPUs
of any node, and each Ray Train worker takes its batches from its split of that stream
(`ray.train.get_dataset_shard("train")` -> `iter_torch_batches` with a local shuffle buffer).

The plan (`plan`, described on the driver, expanded in the tasks): row j of the run's passes × shards
rows is (pass j // N, the (j mod N)-th shard of that pass's order), for as many passes over the N
training shards as the run's steps need (+1 spare, `passes_needed`); each pass orders the shards by
its own seeded permutation. The driver builds no row: it puts the shard table (URIs and manifest
counts, one object for the whole run) into the object store and describes the rows as
`ray.data.range(blocks)`, each block a contiguous slice of rows that a task expands. `plan_blocks`
bounds the blocks (at least PLAN_MIN_BLOCKS, PLAN_BLOCKS_PER_SLOT per decode slot, never more than the
rows), so the driver's cost does not grow with the shards while every decode slot always has blocks
waiting. The plan fuses with the decode (`build`: same CPUs and concurrency), so one task takes a
slice and runs `samsr.shards.crops.shard_crops` on each of its (pass, shard) rows in turn
(`job.decode_cpus` CPUs each, as many at once as `job.decode_concurrency` or the cluster's CPUs
allow), yielding `job.crops_per_sample` crops per good sample. Ray Train splits the stream between
the workers (equal split: every rank gets as many rows). A worker that runs out (skips ate the
spare pass) starts another epoch of it. The workers' loop config carries no shard list.

Seed story. Reproducible for a given seed: the model's initial weights, each worker's diffusion noise
and timesteps, the shard order of every pass, and the crops and flips of each (shard, pass), whoever
decodes them. Not reproducible: the order in which decode tasks finish (slices run side by side, so
the first batches mix the first slices' passes), hence which worker sees which crops and in what
order (the local shuffle is seeded from (seed, rank), but its input order is not). So two runs with
one seed train on the same crops and differ in their batches; the final scores of such runs are
compared in benchmarks/RESULTS.md. A resumed run restores model, optimizer, EMA, LR schedule and step
exactly; its data stream starts again at pass 0 (the driver does not know the step a restart resumes
from), so it sees the first passes' crops again, in another order. A decode task that is retried
(a lost node) decodes its slice again.

Bad samples are skipped in the decode tasks and counted, one (pass, shard) row at a time, by one small
actor (`SkipTally`); workers read the totals to log `data/skipped_samples` and stop past
`job.max_skipped_fraction`.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from samsr import config as config_mod
from samsr.config import Config
from samsr.shards import crops, stream

CHECK_EVERY = 10            # batches between two reads of the skip tally
PLAN_MIN_BLOCKS = 1000      # the plan's blocks: at least this many (fewer only when there are fewer rows)
PLAN_BLOCKS_PER_SLOT = 4    # ... and this many per decode task the cluster runs at once


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


def plan_blocks(rows: int, slots: int) -> int:
    """Blocks of the plan for `rows` (pass, shard) rows and `slots` decode tasks at once (see the module doc)."""
    return max(1, min(rows, max(PLAN_MIN_BLOCKS, PLAN_BLOCKS_PER_SLOT * slots)))


def plan_slice(seed: int, shards: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows start..stop-1 of the plan over `shards` shards: (pass, shard index) int64 arrays of stop - start.
    Pass p visits the shards in the order np.random.default_rng([seed, p]).permutation(shards)."""
    j = np.arange(start, stop, dtype=np.int64)
    passes, shard = j // shards, np.empty_like(j)
    for p in np.unique(passes):
        here = passes == p
        shard[here] = np.random.default_rng([seed, int(p)]).permutation(shards)[j[here] % shards]
    return passes, shard


def plan_task(batch: dict[str, np.ndarray], *, table, rows: int, blocks: int, seed: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn (batch_size=1): block number b -> its slice of the plan, rows
    b·rows//blocks .. (b+1)·rows//blocks - 1, as columns pass, shard, uri, expected (manifest count)."""
    import ray

    shards = ray.get(table)             # {"uri": (N,) utf-8 bytes, "count": (N,) int64}, zero-copy
    b = int(batch["id"][0])
    passes, shard = plan_slice(seed, len(shards["uri"]), b * rows // blocks, (b + 1) * rows // blocks)
    return {"pass": passes, "shard": shard, "uri": np.array([u.decode() for u in shards["uri"][shard]], dtype=object),
            "expected": shards["count"][shard]}


def plan(cfg: Config, data: dict[str, Any], steps: int, blocks: int, **remote):
    """The plan dataset (see the module doc) in `blocks` blocks; `remote`: map_batches' resource
    arguments (the decode's, so that Ray Data fuses the two)."""
    import ray

    uris = data["filled"]
    table = ray.put({"uri": np.array([u.encode("utf-8") for u in uris]),
                     "count": np.array([data["counts"].get(u, 0) for u in uris], dtype=np.int64)})
    rows = passes_needed(cfg, data, steps) * len(uris)
    return ray.data.range(blocks, override_num_blocks=blocks).map_batches(
        plan_task, batch_size=1, batch_format="numpy",
        fn_kwargs={"table": table, "rows": rows, "blocks": blocks, "seed": cfg.train.seed}, **remote)


def decode_task(batch: dict[str, np.ndarray], *, cfg_dict: dict, holdout: frozenset[str], seed: int,
                tally) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map_batches fn (batch_size=1): one plan row (pass, uri, expected) -> column batches of crops."""
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
                                     exclude=holdout, expected=int(batch["expected"][0]), count=count)
    finally:
        if count.read or count.skipped:       # read: decoded and skipped samples, as in the per-rank stream
            ray.get(tally.add.remote(count.read, count.skipped, count.last))   # counted before the row ends


def build(cfg: Config, data: dict[str, Any], steps: int, tally, concurrency: int | None = None):
    """The training dataset (see the module doc) for `steps` global steps; `concurrency` caps the decode
    tasks running at once (default: as many as the cluster's CPUs allow)."""
    import ray

    slots = concurrency or int(ray.cluster_resources().get("CPU", 1) // cfg.job.decode_cpus)
    rows = passes_needed(cfg, data, steps) * len(data["filled"])
    remote = {"num_cpus": cfg.job.decode_cpus, "concurrency": concurrency}
    return plan(cfg, data, steps, plan_blocks(rows, slots), **remote).map_batches(
        decode_task, batch_size=1, batch_format="numpy", **remote,
        fn_kwargs={"cfg_dict": config_mod.to_dict(cfg), "holdout": frozenset(data["holdout"]),
                   "seed": cfg.train.seed, "tally": tally})


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

"""Training batches streamed from shards, per worker (DESIGN.md "Training"), without Ray.

Each worker reads its own shards (`rank_shards`: round-robin by rank), decodes samples into a bounded
pool and draws random aligned crops from the pool with `data.make_batch`. After every batch,
ceil(batch / crops_per_sample) new samples replace the oldest ones, so a sample gives
`crops_per_sample` crops on average while memory stays at `pool` decoded samples. Shard and sample
order are reshuffled every pass from (seed, rank, pass): a restart with the same seed repeats them.
Reading and decoding run in a background thread (`prefetch` samples ahead), beside the training step.
"""
from __future__ import annotations

import itertools
import math
import queue
import threading
from collections import deque
from typing import Iterator, Sequence

import numpy as np

from samsr import storage
from samsr.data import Sample, make_batch
from samsr.diffusion.samnoise import whole_image_stats
from samsr.shards.format import decode_members, read_tar
from samsr.structure.masks import coverage

SHARD_SUFFIX = ".tar"
TRAINING_MEMBERS = ("hr.png", "lr.png", "hr.seg.png", "hr.spe.npy", "lrup.cover.png")   # masks.json not decoded


def list_shards(prefix: str) -> list[str]:
    """The .tar shards under a folder or s3:// prefix, sorted; the job's own files (_*) are skipped."""
    uris = [u for u in storage.list_files(prefix, (SHARD_SUFFIX,)) if not u.rsplit("/", 1)[-1].startswith("_")]
    if not uris:
        raise FileNotFoundError(f"no {SHARD_SUFFIX} shards under {prefix!r} (looked there); write them with "
                                "`samsr shard --output` and pass that prefix")
    return sorted(uris)


def rank_shards(uris: Sequence[str], rank: int, world: int) -> list[str]:
    """Round-robin split by rank; with fewer shards than workers every worker reads all of them."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return list(uris) if len(uris) < world else list(uris[rank::world])


def sample_from_members(key: str, members: dict[str, bytes], need_cover: bool) -> Sample:
    """One shard sample -> `Sample`; whole-image SAMSR statistics are computed here, before any crop.

    Without `lrup.*` members (a shard written with --no-lrup-masks) the coverage is C ≡ 1, which only
    SAM-DiffSR may use; `need_cover` (SAMSR) turns that into an error naming the sample.
    """
    d = decode_members({m: members[m] for m in TRAINING_MEMBERS if m in members})   # no RLE decode of masks
    missing = [m for m in TRAINING_MEMBERS[:4] if m not in d]
    if missing:
        raise ValueError(f"shard sample {key!r} lacks {missing}; rewrite the shard with `samsr shard`")
    hr = d["hr.png"]
    if "lrup.cover.png" in d:
        cover = d["lrup.cover.png"]
    elif need_cover:
        raise ValueError(f"shard sample {key!r} has no lrup.* members (written with --no-lrup-masks); SAMSR "
                         "trains from the masks of y↑, so reshard without --no-lrup-masks")
    else:
        cover = coverage([], hr.shape[:2])
    cover_max, noise_rms = whole_image_stats(cover)
    return Sample(key, hr, d["lr.png"], d["hr.seg.png"], d["hr.spe.npy"], cover, cover_max, noise_rms)


def iter_samples(uris: Sequence[str], rng: np.random.Generator, need_cover: bool,
                 exclude: frozenset[str] = frozenset()) -> Iterator[Sample]:
    """One pass over `uris` in a shuffled order, samples of each shard shuffled too; keys in `exclude`
    (the validation hold-out) are skipped."""
    for i in rng.permutation(len(uris)):
        members = read_tar(storage.read_bytes(uris[int(i)]))
        keys = sorted(k for k in members if k not in exclude)
        for j in rng.permutation(len(keys)):
            yield sample_from_members(keys[int(j)], members[keys[int(j)]], need_cover)


def batches(uris: Sequence[str], *, batch_size: int, hr_crop: int, scale: int, seed: int, rank: int = 0,
            pool: int = 16, crops_per_sample: int = 8, flips: bool = True,
            need_cover: bool = False, prefetch: int = 4, exclude: frozenset[str] = frozenset()) -> Iterator[dict]:
    """Endless batch dicts (samsr/method.py keys) from the shards `uris` minus the keys in `exclude`,
    for one worker. A pass that finds no sample is an error (it would otherwise loop for ever)."""
    if pool < 1 or crops_per_sample < 1:
        raise ValueError(f"job.sample_pool={pool} and job.crops_per_sample={crops_per_sample} must be >= 1")
    refill = math.ceil(batch_size / crops_per_sample)
    rng = np.random.default_rng([seed, rank])

    def endless() -> Iterator[Sample]:
        for passes in itertools.count():
            found = 0
            for sample in iter_samples(uris, np.random.default_rng([seed, rank, passes]), need_cover, exclude):
                found += 1
                yield sample
            if not found:
                raise ValueError(f"no training samples in the {len(uris)} shard(s) of rank {rank} "
                                 f"({', '.join(uris[:3])}{' …' if len(uris) > 3 else ''}) after holding out "
                                 f"{len(exclude)} for validation; add shards, pass --val, or lower job.val_images")

    source = _prefetched(endless(), prefetch)
    resident: deque[Sample] = deque(maxlen=pool)
    try:
        while len(resident) < pool:         # a dataset smaller than the pool fills it with repeats
            resident.append(next(source))
        while True:
            yield make_batch(list(resident), batch_size, hr_crop, scale, rng, flips)
            for _ in range(refill):
                resident.append(next(source))
    finally:
        source.close()


def _prefetched(items: Iterator[Sample], ahead: int) -> Iterator[Sample]:
    """`items` produced by a daemon thread up to `ahead` in advance (same order); its errors re-raised here."""
    if ahead < 1:
        yield from items
        return
    box: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:            # handed to the consumer, raised there
            box.put((False, exc))

    worker = threading.Thread(target=produce, name="samsr-shard-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = box.get()
            if not ok:
                raise item
            yield item
    finally:
        stop.set()


__all__ = ["SHARD_SUFFIX", "list_shards", "rank_shards", "sample_from_members", "iter_samples", "batches"]

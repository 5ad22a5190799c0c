"""Reading training samples from shards, without Ray (DESIGN.md "Training").

`list_shards` and `shard_counts` (the `ok` counts of the shard job's `_manifest/`, or the tar itself
when there is no manifest) tell the driver what there is; `usable_shards` leaves out empty shards and
the validation hold-out, and refuses a run without any sample before a worker starts. `iter_samples`
reads and decodes shards, skipping and counting bad samples; the Ray job's decode tasks
(samsr.shards.crops via pipelines/train_data.py) call it per shard.

`batches` is the single-process reader (benchmarks/train_throughput.py compares it with the Ray Data
path; a loop without Ray can use it): it decodes samples into a bounded pool and draws random aligned crops from the pool with
`data.make_batch`. After every batch, ceil(batch / crops_per_sample) new samples replace the oldest
ones, so a sample gives `crops_per_sample` crops on average while memory stays at `pool` decoded
samples. Shard and sample order are reshuffled every pass from (seed, rank, pass): a restart with
the same seed repeats them. Reading and decoding run in a background thread (`prefetch` samples
ahead), beside the training step.

Bad data does not stop training: a sample that does not decode is skipped, and a tar cut short (or
not a tar) gives the samples before the damage and skips the rest; each is logged with the shard and
the key and counted in `SkipCount`. Training fails only when the skipped samples exceed
`max_skipped` (a fraction) of the samples read: checked from `MIN_READ_FOR_CHECK` samples read on,
and after every pass; a pass without any good sample is always an error.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from samsr import storage
from samsr.data import Sample, make_batch
from samsr.diffusion.samnoise import whole_image_stats
from samsr.shards.format import decode_members, tar_members
from samsr.structure.masks import coverage

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
MANIFEST_DIR = "_manifest"
TRAINING_MEMBERS = ("hr.png", "lr.png", "hr.seg.png", "hr.spe.npy", "lrup.cover.png")   # masks.json not decoded
MIN_READ_FOR_CHECK = 50          # samples read before the skipped fraction is checked within a pass
READ_THREADS = 16                # manifests / tars read at once by `shard_counts`


class ShardDataError(ValueError):
    """The shards cannot feed training: no samples at all, or too many bad ones. One line."""


@dataclass
class SkipCount:
    """Samples read (decoded or not) and skipped by one worker's stream; `last` is the latest reason."""
    read: int = 0
    skipped: int = 0
    last: str = ""

    def skip(self, n: int, reason: str) -> None:
        self.read += n
        self.skipped += n
        self.last = reason
        log.warning("samsr train: skipped %d sample(s): %s", n, reason)


def _names(uris: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(u.rsplit("/", 1)[-1] for u in uris[:most])
    return shown + (f" … (+{len(uris) - most})" if len(uris) > most else "")


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def list_shards(prefix: str) -> list[str]:
    """The .tar shards under a folder or s3:// prefix, sorted; the job's own files (_*) are skipped."""
    uris = [u for u in storage.list_files(prefix, (SHARD_SUFFIX,)) if not u.rsplit("/", 1)[-1].startswith("_")]
    if not uris:
        raise FileNotFoundError(f"no {SHARD_SUFFIX} shards under {prefix!r} (looked there); write them with "
                                "`samsr shard --output` and pass that prefix")
    return sorted(uris)


def read_shard(uri: str) -> tuple[dict[str, dict[str, bytes]], str | None]:
    """A shard's samples {key: {member: bytes}} in tar order, and None; or, when the shard is unreadable
    or cut short, the samples before the damage and the reason (the sample being read is dropped: it
    may lack members). A tar that ends without its end-of-archive blocks counts as cut short."""
    out: dict[str, dict[str, bytes]] = {}
    current = None
    try:
        for current, name, blob in tar_members(storage.read_bytes(uri), strict=False):
            out.setdefault(current, {})[name] = blob
    except Exception as exc:        # not a tar, cut mid-member, unreadable object: keep what came before
        out.pop(getattr(exc, "key", current), None)      # the sample being read (MemberCut names it)
        return out, _one_line(exc)
    return out, None


def _manifest_uri(shard_uri: str) -> str:
    folder, _, name = shard_uri.rpartition("/")
    return f"{folder}/{MANIFEST_DIR}/{name[:-len(SHARD_SUFFIX)]}.json"


def shard_counts(uris: Sequence[str]) -> dict[str, int]:
    """Samples per shard: the `ok` count of its `_manifest/<shard>.json` when there is one, else the
    whole samples of the tar itself (read in full)."""
    folders = {u.rpartition("/")[0] for u in uris}
    manifests = {m for f in folders for m in storage.list_files(f"{f}/{MANIFEST_DIR}", (".json",))}

    def count(uri: str) -> int:
        manifest = _manifest_uri(uri)
        if manifest in manifests:
            try:
                return int(json.loads(storage.read_bytes(manifest))["ok"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("samsr train: manifest %s unreadable (%s); counting the tar", manifest, _one_line(exc))
        return len(read_shard(uri)[0])

    with ThreadPoolExecutor(min(READ_THREADS, max(len(uris), 1))) as pool:
        return dict(zip(uris, pool.map(count, uris)))


def usable_shards(counts: Mapping[str, int], held_out: Mapping[str, int] | None = None, where: str = "",
                  world: int = 1) -> dict[str, int]:
    """Training samples per shard, leaving out empty shards and the `held_out` (validation) samples.
    Raises ShardDataError, before any worker starts, when no sample is left."""
    held_out = held_out or {}
    usable = {u: n - held_out.get(u, 0) for u, n in counts.items() if n - held_out.get(u, 0) > 0}
    if not usable:
        held = sum(held_out.values())
        raise ShardDataError(
            f"no training samples for rank 0{f'..{world - 1}' if world > 1 else ''}: the {len(counts)} shard(s) "
            f"{f'under {where!r} ' if where else ''}hold no sample ({_names(sorted(counts))})"
            + (f" once {held} are held out for validation" if held else "")
            + "; check the shard job's failures.jsonl, or pass --val / lower job.val_images")
    return usable


def sample_from_members(key: str, members: dict[str, bytes], need_cover: bool) -> Sample:
    """One shard sample -> `Sample`; whole-image SAMSR statistics are computed here, before any crop.

    Without `lrup.*` members (a shard written with --no-lrup-masks) the coverage is C ≡ 1, which only
    SAM-DiffSR may use; `need_cover` (SAMSR) turns that into an error naming the sample. Members that
    disagree with the HR image are errors of `decode_members`.
    """
    d = decode_members({m: members[m] for m in TRAINING_MEMBERS if m in members})   # no RLE decode of masks
    missing = [m for m in TRAINING_MEMBERS[:4] if m not in d]
    if missing:
        raise ValueError(f"shard sample {key!r} lacks {missing}; rewrite the shard with `samsr shard`")
    hr, lr, seg, spe = d["hr.png"], d["lr.png"], d["hr.seg.png"], d["hr.spe.npy"]
    if "lrup.cover.png" in d:
        cover = d["lrup.cover.png"]
    elif need_cover:
        raise ValueError(f"shard sample {key!r} has no lrup.* members (written with --no-lrup-masks); SAMSR "
                         "trains from the masks of y↑, so reshard without --no-lrup-masks")
    else:
        cover = coverage([], hr.shape[:2])
    cover_max, noise_rms = whole_image_stats(cover)
    return Sample(key, hr, lr, seg, spe, cover, cover_max, noise_rms)


def iter_samples(uris: Sequence[str], rng: np.random.Generator, need_cover: bool,
                 exclude: frozenset[str] = frozenset(), count: SkipCount | None = None,
                 expected: Mapping[str, int] | None = None) -> Iterator[Sample]:
    """One pass over `uris` in a shuffled order, samples of each shard shuffled too; keys in `exclude`
    (the validation hold-out) are left out. Bad samples are skipped into `count`; a damaged shard counts
    the samples it lost (from `expected`, the manifest counts, else 1)."""
    count = count if count is not None else SkipCount()
    for i in rng.permutation(len(uris)):
        uri = uris[int(i)]
        members, damage = read_shard(uri)
        keys = sorted(k for k in members if k not in exclude)
        if damage is not None:
            lost = max(1, (expected or {}).get(uri, 0) - len(members))
            count.skip(lost, f"shard {uri}: {damage}; the rest of the shard ({lost} sample(s)) is skipped, "
                             f"{len(members)} whole sample(s) before the damage are used")
        for j in rng.permutation(len(keys)):
            key = keys[int(j)]
            try:
                sample = sample_from_members(key, members[key], need_cover)
            except Exception as exc:        # any decode error of one sample: skip it, say where
                count.skip(1, f"shard {uri} sample {key!r}: {_one_line(exc)}")
                continue
            count.read += 1
            yield sample


def _check_skipped(count: SkipCount, max_skipped: float, rank: int, end_of_pass: bool) -> None:
    if count.read and (end_of_pass or count.read >= MIN_READ_FOR_CHECK) and count.skipped > max_skipped * count.read:
        raise ShardDataError(f"rank {rank}: {count.skipped} of {count.read} samples read were bad, more than "
                             f"job.max_skipped_fraction={max_skipped:g}; last: {count.last}")


def batches(uris: Sequence[str], *, batch_size: int, hr_crop: int, scale: int, seed: int, rank: int = 0,
            pool: int = 16, crops_per_sample: int = 8, flips: bool = True,
            need_cover: bool = False, prefetch: int = 4, exclude: frozenset[str] = frozenset(),
            count: SkipCount | None = None, max_skipped: float = 0.05,
            expected: Mapping[str, int] | None = None) -> Iterator[dict]:
    """Endless batch dicts (samsr/method.py keys) from the shards `uris` minus the keys in `exclude`,
    for one worker. Skipped samples go to `count`; past `max_skipped` of the samples read, or after a
    pass that found no good sample, a ShardDataError names the rank, the shards and the last reason."""
    if pool < 1 or crops_per_sample < 1:
        raise ValueError(f"job.sample_pool={pool} and job.crops_per_sample={crops_per_sample} must be >= 1")
    if not 0.0 <= max_skipped <= 1.0:
        raise ValueError(f"job.max_skipped_fraction={max_skipped} must lie in [0, 1]")
    refill = math.ceil(batch_size / crops_per_sample)
    rng = np.random.default_rng([seed, rank])
    count = count if count is not None else SkipCount()

    def endless() -> Iterator[Sample]:
        for passes in itertools.count():
            found = 0
            for sample in iter_samples(uris, np.random.default_rng([seed, rank, passes]), need_cover, exclude,
                                       count, expected):
                found += 1
                _check_skipped(count, max_skipped, rank, end_of_pass=False)
                yield sample
            if not found:
                raise ShardDataError(
                    f"no training samples in the {len(uris)} shard(s) of rank {rank} ({_names(list(uris))}) after "
                    f"holding out {len(exclude)} for validation and skipping {count.skipped} bad one(s)"
                    + (f" (last: {count.last})" if count.last else "")
                    + "; add shards, pass --val, or lower job.val_images")
            _check_skipped(count, max_skipped, rank, end_of_pass=True)

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
        except BaseException as exc:            # handed to the consumer, raised there (unless it left)
            while not stop.is_set():
                try:
                    box.put((False, exc), timeout=0.1)
                    return
                except queue.Full:
                    continue

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


__all__ = ["SHARD_SUFFIX", "ShardDataError", "SkipCount", "list_shards", "read_shard", "shard_counts",
           "usable_shards", "sample_from_members", "iter_samples", "batches", "MIN_READ_FOR_CHECK"]

"""Training crops from one shard, for an ingest that decodes shards in parallel tasks
(pipelines/train_data.py runs `shard_crops` as Ray Data tasks; this module knows nothing of Ray).

One call reads one shard, decodes its samples in a shuffled order (minus the validation hold-out) and
yields, per good sample, `crops_per_sample` random LR-aligned crops (with the same dihedral flip on HR,
LR and maps) as one column batch: `hr` (N,c,c,3) uint8, `lr` (N,c/s,c/s,3) uint8, `spe` (N,c,c) float32
(E = values[labels]), `cover` (N,c,c) float32, `cover_max` and `noise_rms` (N,) float32, the
whole-image SAMSR statistics computed before cropping. `collate` turns rows of these into the batch
dict of samsr/method.py, exactly as `samsr.data.make_batch` builds it.

Randomness: the sample order and the crops come from (seed, pass, shard URI), so a shard's crops in a
given pass are the same whoever decodes them and in whatever order the tasks run.

Bad data: a sample that does not decode is skipped; a damaged tar gives the samples before the damage
and counts the rest as skipped (from `expected`, the manifest count), into a `stream.SkipCount` the
caller reports.
"""
from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np
import torch

from samsr import images
from samsr.shards import stream

CROP_COLUMNS = ("hr", "lr", "spe", "cover", "cover_max", "noise_rms")


def crop_rng(seed: int, pass_index: int, uri: str) -> np.random.Generator:
    return np.random.default_rng([seed, pass_index, zlib.crc32(uri.encode("utf-8"))])


def shard_crops(uri: str, *, seed: int, pass_index: int, hr_crop: int, scale: int, crops_per_sample: int,
                flips: bool = True, need_cover: bool = False, exclude: frozenset[str] = frozenset(),
                expected: int = 0, count: stream.SkipCount | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One column batch of `crops_per_sample` crops per good sample of shard `uri` (see the module doc);
    samples are read and skipped as `stream.iter_samples` does, into `count`."""
    rng = crop_rng(seed, pass_index, uri)
    for sample in stream.iter_samples([uri], rng, need_cover, exclude, count, {uri: expected}):
        cols: dict[str, list] = {c: [] for c in CROP_COLUMNS[:4]}
        for _ in range(crops_per_sample):
            hr, lr, maps = images.aligned_crop(sample.hr, sample.lr, {"labels": sample.spe_labels, "cover": sample.cover},
                                               hr_crop, scale, rng, flips=flips)
            cols["hr"].append(hr)
            cols["lr"].append(lr)
            cols["spe"].append(sample.spe_values[maps["labels"].astype(np.int64)])
            cols["cover"].append(maps["cover"].astype(np.float32))
        yield {"hr": np.stack(cols["hr"]), "lr": np.stack(cols["lr"]), "spe": np.stack(cols["spe"]).astype(np.float32),
               "cover": np.stack(cols["cover"]),
               "cover_max": np.full(crops_per_sample, sample.cover_max, np.float32),
               "noise_rms": np.full(crops_per_sample, sample.noise_rms, np.float32)}


def _tensor(x: np.ndarray, dtype=np.float32) -> torch.Tensor:
    """A copy (Ray hands out read-only zero-copy arrays, which torch will not wrap)."""
    return torch.tensor(np.asarray(x, dtype=dtype))


def _images(x: np.ndarray) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float32 in [-1,1], as `images.to_tensor` per image."""
    return _tensor(x, np.uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A column batch of crop rows -> the batch dict of samsr/method.py (hr, lr, spe, cover, cover_max, noise_rms)."""
    return {"hr": _images(batch["hr"]), "lr": _images(batch["lr"]), "spe": _tensor(batch["spe"])[:, None],
            "cover": _tensor(batch["cover"])[:, None], "cover_max": _tensor(batch["cover_max"]),
            "noise_rms": _tensor(batch["noise_rms"])}

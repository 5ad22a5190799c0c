"""Validation while training (`samsr train`, on rank 0): fixed images, fixed seeds, bounded time, scored by
the same code as `samsr eval` (samsr/evaluation.py), so the MLflow chart shows a model crossing bicubic.

The set: with `job.val` (a folder or s3:// prefix of HR images), its first `job.val_images` images in
sorted order, LR made as the shard job makes it. Without it, a fixed hold-out of the shards: the first
`job.val_images` samples (by key) of the last shard (by name); they are skipped by every rank's training
stream. Each image is cut to its central `job.val_crop` HR px (on the LR grid) to bound time. Every
`train.eval_every` steps and at the last step the EMA model (the raw one without EMA) is sampled once
per image with seed `infer.seed`, and `val/<metric>`, `val/bicubic_<metric>` and `val/delta_<metric>`
(model − bicubic; positive for psnr/ssim/haarpsi means better than bicubic) are logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from samsr import evaluation, images, storage
from samsr.config import Config
from samsr.shards.format import decode_members
from samsr.shards.plan import IMAGE_SUFFIXES
from samsr.shards.stream import read_shard

log = logging.getLogger(__name__)

PREFIX = "val/"


@dataclass(frozen=True)
class ValSet:
    names: tuple[str, ...]
    pairs: tuple[tuple[np.ndarray, np.ndarray], ...]       # (HR (H,W,3), LR (h,w,3)) uint8, cropped
    holdout: frozenset[str] = field(default_factory=frozenset)   # shard sample keys kept out of training
    source: str = ""


def enabled(cfg: Config) -> bool:
    return cfg.job.val_images > 0 and cfg.train.eval_every > 0


def _first_samples(cfg: Config, shard_uri: str) -> tuple[frozenset[str], dict[str, dict[str, bytes]], int]:
    """The first `job.val_images` samples (by key) of one shard: keys, their members, and the shard's
    samples in all. A damaged shard gives the samples before the damage."""
    members, damage = read_shard(shard_uri)
    if damage is not None:
        log.warning("samsr train: validation shard %s is damaged (%s); using its %d whole sample(s)",
                    shard_uri, damage, len(members))
    keys = sorted(members)[:cfg.job.val_images]
    return frozenset(keys), {k: members[k] for k in keys}, len(members)


def holdout_keys(cfg: Config, shard_uris: Sequence[str]) -> tuple[frozenset[str], dict[str, dict[str, bytes]]]:
    """The shard samples held out for validation (none with `job.val`) and their members (last shard only;
    the train job passes the shards that hold samples); refused when they are all the samples there are."""
    if not enabled(cfg) or cfg.job.val:
        return frozenset(), {}
    keys, members, total = _first_samples(cfg, shard_uris[-1])
    if len(shard_uris) == 1 and len(keys) >= total:
        raise ValueError(f"job.val_images={cfg.job.val_images} would hold out all {total} samples of the only "
                         f"shard {shard_uris[0]!r} for validation; pass --val HR_IMAGES, lower job.val_images, or "
                         "set train.eval_every=0")
    return keys, members


def build(cfg: Config, val_shard: str) -> ValSet | None:
    """The validation set of a run (None when validation is off); `val_shard`: the last shard holding
    samples (the driver has checked that training keeps some samples)."""
    if not enabled(cfg):
        return None
    jc, scale = cfg.job, cfg.data.scale
    if jc.val:
        listing = storage.list_files(jc.val, IMAGE_SUFFIXES)[:jc.val_images]
        if not listing:
            raise FileNotFoundError(f"no validation images under job.val={jc.val!r} (looked there)")
        pairs = [evaluation.pair_from_hr(images.decode_image(storage.read_bytes(u), scale=scale, name=u,
                                                             max_pixels=cfg.data.max_pixels), scale) for u in listing]
        names, holdout, source = [u.rsplit("/", 1)[-1] for u in listing], frozenset(), jc.val
    else:
        holdout, members, _ = _first_samples(cfg, val_shard)
        names = sorted(members)
        if not names:        # the last shard holds no sample (every image in it failed)
            print(f"samsr train: no samples in {val_shard} to validate on; pass --val to validate", flush=True)
            return None
        pairs = []
        for key in list(names):
            try:
                d = decode_members({m: members[key][m] for m in ("hr.png", "lr.png")})
                pairs.append((d["hr.png"], d["lr.png"]))
            except Exception as exc:          # a bad held-out sample: validate on the others
                log.warning("samsr train: validation sample %r of %s skipped: %s", key, val_shard, exc)
                names.remove(key)
        if not pairs:
            print(f"samsr train: no decodable validation sample in {val_shard}; pass --val to validate",
                  flush=True)
            return None
        source = f"{val_shard} (first {len(names)} samples, held out of training)"
    cropped = tuple(evaluation.crop_pair(hr, lr, jc.val_crop, scale) for hr, lr in pairs)
    return ValSet(tuple(names), cropped, holdout, source)


class Validator:
    """Scores a model on a ValSet: `val/…` means over the images (one sample each, fixed seed)."""

    def __init__(self, cfg: Config, valset: ValSet, device) -> None:
        from samsr.structure.segmenters import build_segmenter

        self.cfg, self.valset, self.device = cfg, valset, device
        # the SAMSR student segments y↑ at inference: built now, so a bad segmenter fails at step 0
        self.segmenter = build_segmenter(cfg.segmenter) if cfg.method == "samsr-student" else None

    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            rows = [evaluation.evaluate_image(model, hr, lr, self.cfg.infer, samples=1, seed=self.cfg.infer.seed,
                                              segmenter=self.segmenter, soft=self.cfg.resshift.soft_masks,
                                              device=str(self.device))
                    for hr, lr in self.valset.pairs]
        finally:
            model.train(was_training)
        return evaluation.flat_means(evaluation.summarize(rows), PREFIX)


__all__ = ["ValSet", "Validator", "build", "holdout_keys", "enabled", "PREFIX"]

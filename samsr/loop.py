"""The plain single-process training loop: the reference the Ray Train job is compared against.

Reads top to bottom: batches from `samsr.data.make_batch`, one `train_step` per iteration, lr decay.
`progress`: a tqdm bar on stderr — False (the default: off, e.g. inside Ray workers), True, or None (on
when stderr is a terminal).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from samsr.config import Config
from samsr.data import Sample, make_batch
from samsr.ema import EMA
from samsr.method import SRMethod
from samsr.train_step import make_lr_schedule, make_optimizer, rrdb_pretrain_step, train_step

Log = Callable[[int, dict[str, float]], None]


def _quiet(step: int, metrics: dict[str, float]) -> None:
    return None


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "step"):
    """A tqdm bar of `total` units on stderr; `progress` None: only when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                disable=None if progress is None else not progress)


def _advance(bar, step: int, steps: int, every: int, metrics: dict[str, float], log: Log) -> None:
    """One step on the bar (the loss as its postfix); every `every` steps and at the last, `log` with the
    bar cleared while it writes."""
    bar.update(1)
    bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in ("loss", "rrdb_l1")}, refresh=False)
    if step % every == 0 or step == steps:
        with bar.external_write_mode():
            log(step, metrics)


def pretrain_rrdb(rrdb: torch.nn.Module, samples: Sequence[Sample], cfg: Config, seed: int,
                  iterations: int | None = None, log: Log = _quiet, progress: bool | None = False) -> list[float]:
    """Pretrain SAM-DiffSR's RRDB encoder alone with L1 to HR (METHOD.md §A). Returns the L1 history."""
    rng = np.random.default_rng(seed)
    steps = cfg.train.rrdb_iterations if iterations is None else iterations
    rrdb.train()
    for p in rrdb.parameters():
        p.requires_grad_(True)
    opt = make_optimizer(rrdb.parameters(), cfg.train.rrdb_lr)
    history = []
    with progress_bar(steps, "rrdb", progress) as bar:
        for step in range(1, steps + 1):
            batch = make_batch(samples, cfg.train.batch_size, cfg.data.hr_crop, cfg.data.scale, rng, cfg.data.flips)
            metrics = rrdb_pretrain_step(rrdb, opt, batch)
            history.append(metrics["rrdb_l1"])
            _advance(bar, step, steps, cfg.train.log_every, metrics, log)
    rrdb.eval()
    for p in rrdb.parameters():
        p.requires_grad_(False)
    return history


def train(method: SRMethod, samples: Sequence[Sample], cfg: Config, seed: int,
          iterations: int | None = None, log: Log = _quiet, ema: EMA | None = None,
          progress: bool | None = False) -> list[dict[str, float]]:
    """Train `method` for `iterations` (default cfg.train.iterations) steps, updating `ema` (if given)
    after every step. Returns per-step metrics."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    steps = cfg.train.iterations if iterations is None else iterations
    opt = make_optimizer(method.trainable_parameters(), cfg.train.lr)
    sched = make_lr_schedule(opt, cfg.train)
    history = []
    with progress_bar(steps, "train", progress) as bar:
        for step in range(1, steps + 1):
            batch = make_batch(samples, cfg.train.batch_size, cfg.data.hr_crop, cfg.data.scale, rng, cfg.data.flips)
            metrics = train_step(method, opt, batch, generator, cfg.train.grad_clip)
            sched.step()
            if ema is not None:
                ema.update(method)
            history.append(metrics)
            _advance(bar, step, steps, cfg.train.log_every, metrics, log)
    return history

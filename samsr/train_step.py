"""One optimisation step, the same in the plain loop, the demo and inside Ray Train workers.

`train_step` is method-agnostic: it asks the method (samsr/method.py) for its loss, then clips and
steps. `rrdb_pretrain_step` pretrains SAM-DiffSR's conditioning encoder alone with L1 (METHOD.md §A).
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F

from samsr.config import TrainConfig
from samsr.method import SRMethod


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(list(params), lr=lr)


def make_lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """Step decay: lr · gamma every `lr_decay_every` steps (SAM-DiffSR halves at 200k)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(cfg.lr_decay_every, 1), gamma=cfg.lr_decay_gamma)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op context elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(method: SRMethod, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               generator: torch.Generator, grad_clip: float, bf16: bool = False) -> dict[str, float]:
    """loss -> backward -> grad-norm clip -> step. Returns the method's metrics + grad_norm."""
    optimizer.zero_grad(set_to_none=True)
    device = batch["hr"].device
    with autocast(device, bf16):
        loss, metrics = method.loss(batch, generator)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else torch.tensor(0.0)
    optimizer.step()
    return {**metrics, "grad_norm": float(grad_norm)}


def rrdb_pretrain_step(rrdb: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """L1 between RRDB(lr) and hr, both (B,3,H,W) in [-1,1] (SRDiff's encoder pretraining)."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.l1_loss(rrdb(batch["lr"]), batch["hr"])
    loss.backward()
    optimizer.step()
    return {"rrdb_l1": loss.item()}

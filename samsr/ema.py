"""Exponential moving average of a model's trained weights: the copy that validation, `samsr eval` and
the logged model use (ResShift and most diffusion trainers do the same; one sample of a briefly trained
diffusion model is much noisier with the raw weights than with their average).

Only parameters that train (`requires_grad`) are averaged; frozen parts (SAM-DiffSR's RRDB during the
diffusion stage, the SAMSR student's frozen teacher copy) and buffers are copied as they are. The decay
warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a short run is not dominated by its
initial weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """`module`'s averaged twin. `update(live)` after every optimizer step; `module` is the average."""

    def __init__(self, live: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1); use train.ema_decay=0 to train without EMA")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(live).eval()
        self.module.requires_grad_(False)
        self._names = [name for name, p in live.named_parameters() if p.requires_grad]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        """Move the averaged weights towards `live`'s trained parameters (same architecture)."""
        self.updates += 1
        weight = 1.0 - self.current_decay()
        live_params, avg_params = dict(live.named_parameters()), dict(self.module.named_parameters())
        torch._foreach_lerp_([avg_params[n] for n in self._names],
                             [live_params[n].detach().to(avg_params[n].device) for n in self._names], weight)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates


def make_ema(live: nn.Module, decay: float) -> EMA | None:
    """An EMA of `live` when decay > 0 (train.ema_decay), else None (the raw weights are used)."""
    return EMA(live, decay) if decay > 0 else None


__all__ = ["EMA", "make_ema"]

"""The one interface both methods offer to the train step, the sampler loop and the batch jobs.

A *batch* is a dict of tensors on one device:
- `hr`     (B,3,H,W) in [-1,1]      HR crop
- `lr`     (B,3,H/s,W/s) in [-1,1]  its bicubic LR
- `spe`    (B,1,H,W) float          SAM-DiffSR structure map E of the HR masks (METHOD.md §A)
- `cover`  (B,1,H,W) float >= 1     coverage count C of the y↑ masks incl. background (METHOD.md §B)
- `cover_max` (B,) float            max of C over the *whole* image the crop came from
- `noise_rms` (B,) float            whole-image RMS of the SAM-Noise scale 1/sqrt(C) (METHOD.md §B)
A method reads only the keys it needs.
"""
from __future__ import annotations

from typing import Iterable, Protocol

import torch
from torch import Tensor

from samsr.diffusion import NoiseFn
from samsr.diffusion.samdiffsr import SamDiffSR
from samsr.diffusion.samsr import ResShiftTeacher, SamsrStudent


class SRMethod(Protocol):
    scale: int

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Scalar training loss for one batch and the numbers worth logging."""

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """What the optimizer updates (frozen parts, e.g. SAM-DiffSR's RRDB, excluded)."""

    def super_resolve(self, lr: Tensor, *, generator: torch.Generator | None = None,
                      noise_fn: NoiseFn | None = None, cover: Tensor | None = None) -> Tensor:
        """(B,3,h,w) in [-1,1] -> (B,3,h*s,w*s) in [-1,1]. `cover` (B,1,h*s,w*s): SAMSR only."""


def build_method(cfg) -> SRMethod:
    """An untrained model of `cfg.method` from its config (the student loads `resshift.teacher`)."""
    builders = {"samdiffsr": SamDiffSR.from_config, "samsr-teacher": ResShiftTeacher.from_config,
                "samsr-student": SamsrStudent.from_config}
    return builders[cfg.method](cfg)

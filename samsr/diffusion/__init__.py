"""Diffusion processes: `samdiffsr` (METHOD.md §A) and `resshift` (METHOD.md §B); import the module you need.

`NoiseFn` is the one type they share with their callers (samsr.method, samsr.infer): it lives here, so
the diffusions import nothing from the method interface that builds them.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

# noise_fn(step) -> a standard normal field shaped like the HR output, for sampler step `step`.
# Tiled inference passes one that crops a whole-image field, so tiles share the noise (DESIGN.md infer).
NoiseFn = Callable[[int], Tensor]

__all__ = ["NoiseFn"]

"""The space SAMSR's diffusion runs in (METHOD.md §B): an encoder/decoder pair.

Pixel space (`PixelSpace`, the identity) is the default and the only space shipped. A latent
autoencoder (the papers use a VQGAN f4) plugs in by subclassing `Space` and registering a factory
under a name (`register_space("vqgan-f4", factory)`), then `resshift.space=vqgan-f4`. Teacher and
student encode HR and y↑, run the diffusion and the losses on the codes, and decode the output; the
SAM maps (coverage, noise scale) are average-pooled onto the code grid with `to_grid`.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn


class Space(nn.Module, abc.ABC):
    """encode: (B,3,H,W) image in [-1,1] -> (B,channels,H/factor,W/factor) code; decode: the inverse.

    `clip` says whether the code lives in [-1,1] (pixel space: the sampler clips x̂ each step).
    A subclass holding frozen autoencoder weights keeps them as modules, so they are saved with the model.
    """

    channels: int = 3
    factor: int = 1
    clip: bool = False

    def train(self, mode: bool = True) -> "Space":
        return super().train(False)          # always frozen

    @abc.abstractmethod
    def encode(self, image: Tensor) -> Tensor:
        """(B,3,H,W) image in [-1,1] -> (B,channels,H/factor,W/factor) code."""

    @abc.abstractmethod
    def decode(self, code: Tensor) -> Tensor:
        """(B,channels,h,w) code -> (B,3,h*factor,w*factor) image."""

    def to_grid(self, pixel_map: Tensor) -> Tensor:
        """A per-pixel map (B,1,H,W) -> the code grid (B,1,H/factor,W/factor), by average pooling."""
        if self.factor == 1:
            return pixel_map
        h, w = pixel_map.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"a {h}x{w} map does not tile the code grid of factor {self.factor}; crop images "
                             f"and tiles to multiples of {self.factor}")
        return F.avg_pool2d(pixel_map.float(), self.factor)


class PixelSpace(Space):
    """The identity: diffusion in pixel space (the default)."""

    channels, factor, clip = 3, 1, True

    def encode(self, image: Tensor) -> Tensor:
        return image

    def decode(self, code: Tensor) -> Tensor:
        return code


SPACES: dict[str, Callable[[], Space]] = {"pixel": PixelSpace}


def register_space(name: str, factory: Callable[[], Space]) -> None:
    """Make `resshift.space=name` build `factory()`; re-registering a name replaces it."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a space needs a non-empty string name, got {name!r}")
    SPACES[name] = factory


def build_space(name: str) -> Space:
    """The registered space `name`; an unknown name is rejected with the known ones."""
    if name not in SPACES:
        raise ValueError(f"resshift.space={name!r} is not a registered space; known: {sorted(SPACES)} "
                         "(register a latent autoencoder with samsr.diffusion.space.register_space)")
    space = SPACES[name]()
    space.requires_grad_(False)
    return space.eval()


__all__ = ["Space", "PixelSpace", "SPACES", "register_space", "build_space"]

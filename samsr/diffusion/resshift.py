"""ResShift (METHOD.md §B): η schedule, forward process, posterior, deterministic step, prior, the
x̂-predicting denoiser, the teacher loss and the T-step sampler.

Time runs t = 1..T (η_0 = 0). Every formula takes √η_t and κ either as scalars (uniform schedule) or
as per-pixel tensors (B,1,H,W) (pixel-wise schedule, samnoise.py), broadcast against (B,3,H,W).
The scheduler holds no weights; randomness comes from a passed generator or noise function.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samsr.config import ResShiftConfig, UNetConfig
from samsr.diffusion import NoiseFn
from samsr.diffusion.samnoise import ETA_CLAMP, pixelwise_kappa, pixelwise_sqrt_eta
from samsr.nets.unet import UNet

Coef = Tensor | float


def eta_schedule(timesteps: int, kappa: float, power: float, etas_end: float, min_noise_level: float) -> Tensor:
    """√η_t for t = 1..T, stored at index t−1: (T,) float64 in (0, etas_end] (METHOD.md §B)."""
    if timesteps < 2:
        raise ValueError(f"timesteps={timesteps}: the ResShift schedule needs T >= 2")
    sqrt_eta_1 = min(min_noise_level / kappa, min_noise_level, math.sqrt(0.001))
    t = torch.arange(1, timesteps + 1, dtype=torch.float64)
    q = ((t - 1) / (timesteps - 1)) ** power * (timesteps - 1)
    b = (etas_end / sqrt_eta_1) ** (1.0 / (timesteps - 1))
    return sqrt_eta_1 * b ** q


# ---------------------------------------------------------------- the formulas (scalar or per-pixel)

def q_sample(x: Tensor, y_up: Tensor, noise: Tensor, sqrt_eta: Coef, kappa: Coef) -> Tensor:
    """x_t = x + η_t (y↑ − x) + κ √η_t ε; x, y↑, ε (B,3,H,W)."""
    return x + sqrt_eta ** 2 * (y_up - x) + kappa * sqrt_eta * noise


def posterior_coefficients(sqrt_eta: Coef, sqrt_eta_prev: Coef, kappa: Coef) -> tuple[Coef, Coef, Coef]:
    """q(x_{t−1}|x_t, x): mean = c_xt·x_t + c_x·x, variance = κ² η_{t−1} α_t / η_t (α_t = η_t − η_{t−1})."""
    eta, eta_prev = sqrt_eta ** 2, sqrt_eta_prev ** 2
    alpha = eta - eta_prev
    return eta_prev / eta, alpha / eta, kappa ** 2 * eta_prev * alpha / eta


def deterministic_coefficients(sqrt_eta: Coef, sqrt_eta_prev: Coef) -> tuple[Coef, Coef, Coef]:
    """x_{t−1} = k·x̂ + m·x_t + j·y↑ (the ε implied by x_t reused): returns (k, m, j)."""
    eta_prev = sqrt_eta_prev ** 2
    m = sqrt_eta_prev / sqrt_eta
    cross = sqrt_eta_prev * sqrt_eta            # √(η_{t−1} η_t)
    return 1 - eta_prev + cross - m, m, eta_prev - cross


def prior_sample(y_up: Tensor, noise: Tensor, sqrt_eta_T: Coef, kappa: Coef) -> Tensor:
    """x_T = y↑ + κ √η_T ε."""
    return y_up + kappa * sqrt_eta_T * noise


def input_scale(sqrt_eta: Coef, kappa: Coef) -> Coef:
    """1/√(κ² η_t + 1): the network sees x_t at roughly unit scale."""
    return (kappa ** 2 * sqrt_eta ** 2 + 1) ** -0.5


# ---------------------------------------------------------------- scheduler

class ResShiftScheduler:
    """Diffusers-style scheduler over t = T..1; no weights. `w` (B,1,H,W) turns on the pixel-wise schedule."""

    def __init__(self, sqrt_eta: Tensor, kappa: float, w: Tensor | None = None, clamp: float = ETA_CLAMP) -> None:
        if sqrt_eta.ndim != 1:
            raise ValueError(f"sqrt_eta must be (T,), got shape {tuple(sqrt_eta.shape)}")
        self.table = torch.cat([sqrt_eta.new_zeros(1), sqrt_eta]).double()   # index t, η_0 = 0
        self.kappa, self.w, self.clamp = float(kappa), w, clamp

    @classmethod
    def from_config(cls, rs: ResShiftConfig) -> "ResShiftScheduler":
        return cls(eta_schedule(rs.timesteps, rs.kappa, rs.power, rs.etas_end, rs.min_noise_level), rs.kappa)

    def pixelwise(self, w: Tensor) -> "ResShiftScheduler":
        """The same schedule with per-pixel κ' and η' (METHOD.md §B pixel-wise); w (B,1,H,W) in [0,1]."""
        return ResShiftScheduler(self.table[1:], self.kappa, w, self.clamp)

    @property
    def num_timesteps(self) -> int:
        return self.table.numel() - 1

    @property
    def timesteps(self) -> list[int]:
        return list(range(self.num_timesteps, 0, -1))

    def sqrt_eta_at(self, t: int | Tensor, ref: Tensor) -> Tensor:
        """√η_t (√η'_t when pixel-wise) broadcastable to ref (B,C,H,W); t int or (B,) in 0..T."""
        table = self.table.to(device=ref.device, dtype=ref.dtype)
        s = table[t] if isinstance(t, int) else table[t.to(ref.device).long()].view(-1, 1, 1, 1)
        return s if self.w is None else pixelwise_sqrt_eta(s, self.w.to(ref), self.clamp)

    def kappa_at(self, ref: Tensor) -> Coef:
        """κ, or κ' = (1−w)κ per pixel (B,1,H,W)."""
        return self.kappa if self.w is None else pixelwise_kappa(self.kappa, self.w.to(ref))

    def add_noise(self, x: Tensor, y_up: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
        return q_sample(x, y_up, noise, self.sqrt_eta_at(t, x), self.kappa_at(x))

    def scale_input(self, x_t: Tensor, t: int | Tensor) -> Tensor:
        return x_t * input_scale(self.sqrt_eta_at(t, x_t), self.kappa_at(x_t))

    def prior(self, y_up: Tensor, noise: Tensor) -> Tensor:
        return prior_sample(y_up, noise, self.sqrt_eta_at(self.num_timesteps, y_up), self.kappa_at(y_up))

    def step(self, x_hat: Tensor, x_t: Tensor, t: int, y_up: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_{t−1} from the prediction x̂: posterior sample if `noise` (B,3,H,W) is given, else deterministic."""
        s, s_prev = self.sqrt_eta_at(t, x_t), self.sqrt_eta_at(t - 1, x_t)
        if noise is None:
            k, m, j = deterministic_coefficients(s, s_prev)
            return k * x_hat + m * x_t + j * y_up
        c_xt, c_x, var = posterior_coefficients(s, s_prev, self.kappa_at(x_t))
        return c_xt * x_t + c_x * x_hat + var ** 0.5 * noise


# ---------------------------------------------------------------- network, loss, sampler

class Denoiser(nn.Module):
    """x̂ = y↑ + UNet([x_in, y↑], t); the last layer starts at zero, so an untrained model returns y↑.

    `channels` is the channel count of the space the diffusion runs in (3 in pixel space)."""

    def __init__(self, unet: UNetConfig, channels: int = 3) -> None:
        super().__init__()
        self.unet = UNet(2 * channels, channels, base=unet.base, mults=unet.mults, blocks_per_level=unet.blocks_per_level,
                         dropout=unet.dropout, zero_init_out=True, norm_groups=unet.norm_groups)

    def forward(self, x_in: Tensor, y_up: Tensor, t: Tensor | float) -> Tensor:
        """x_in (already scaled) and y↑ (B,C,H,W), t (B,) or a float -> x̂ (B,C,H,W)."""
        if not torch.is_tensor(t):
            t = torch.full((x_in.shape[0],), float(t), device=x_in.device)
        return y_up + self.unet(torch.cat([x_in, y_up], 1), t.float())


def standard_normal(like: Tensor, step: int, noise_fn: NoiseFn | None, generator: torch.Generator | None) -> Tensor:
    """A standard normal field shaped like `like`: noise_fn(step) when given, else from `generator`."""
    if noise_fn is not None:
        noise = noise_fn(step)
        if noise.shape != like.shape:
            raise ValueError(f"noise_fn({step}) returned shape {tuple(noise.shape)}, expected {tuple(like.shape)}")
        return noise.to(like)
    if generator is None:
        raise ValueError("drawing noise needs a torch.Generator (generator=...) or a noise_fn; neither was given")
    return torch.randn(like.shape, generator=generator, device=generator.device).to(like)


def teacher_loss(net: Denoiser, scheduler: ResShiftScheduler, x: Tensor, y_up: Tensor,
                 generator: torch.Generator) -> Tensor:
    """Plain ResShift: t ~ U{1..T}, ε ~ N(0,I), x-prediction, L2 to x (METHOD.md §B teacher); x, y↑ (B,3,H,W)."""
    gen_device = generator.device
    t = torch.randint(1, scheduler.num_timesteps + 1, (x.shape[0],), generator=generator, device=gen_device).to(x.device)
    noise = torch.randn(x.shape, generator=generator, device=gen_device).to(x)
    x_t = scheduler.add_noise(x, y_up, t, noise)
    x_hat = net(scheduler.scale_input(x_t, t), y_up, t)
    return F.mse_loss(x_hat, x)


Predict = Callable[[Tensor, Tensor, int], Tensor]   # (x_in, y↑, t) -> x̂


def sample(net: Predict, y_up: Tensor, scheduler: ResShiftScheduler, *, x_T: Tensor | None = None,
           deterministic: bool = False, noise_fn: NoiseFn | None = None,
           generator: torch.Generator | None = None, clip: bool = True) -> Tensor:
    """T-step sampler from the prior: y↑ (B,3,H,W) in [-1,1] -> x_0 (B,3,H,W) in [-1,1].

    Noise for the state x_s (s = T for the prior, then s = T−1..1) is noise_fn(s) or drawn from
    `generator`; `deterministic` uses the k, m, j step. x̂ is clipped to [-1,1] each step (pixel space).
    """
    T = scheduler.num_timesteps
    x_t = scheduler.prior(y_up, standard_normal(y_up, T, noise_fn, generator)) if x_T is None else x_T
    for t in scheduler.timesteps:
        x_hat = net(scheduler.scale_input(x_t, t), y_up, t)
        if clip:
            x_hat = x_hat.clamp(-1, 1)
        if t == 1:              # η_0 = 0: x_0 = x̂
            return x_hat
        noise = None if deterministic else standard_normal(y_up, t - 1, noise_fn, generator)
        x_t = scheduler.step(x_hat, x_t, t, y_up, noise)
    raise AssertionError("unreachable: the schedule has T >= 2 steps")


__all__ = ["eta_schedule", "q_sample", "posterior_coefficients", "deterministic_coefficients", "prior_sample",
           "input_scale", "ResShiftScheduler", "Denoiser", "standard_normal", "teacher_loss", "sample"]

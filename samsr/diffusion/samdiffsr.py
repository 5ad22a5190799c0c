"""SAM-DiffSR (METHOD.md §A): SRDiff residual diffusion with structure-modulated forward noise.

Schedules are pure functions over a weightless `Schedule`; `SamDiffSR` ties the frozen RRDB encoder,
the ε-predicting UNet and the schedule together behind the `SRMethod` protocol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samsr.config import Config
from samsr.images import upscale
from samsr.diffusion import NoiseFn
from samsr.nets.rrdb import RRDBNet
from samsr.nets.unet import UNet

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B,3,H,W), t (B,) long) -> ε̂ (B,3,H,W)


def cosine_beta_schedule(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """(T,) float64 betas of Nichol & Dhariwal's cosine schedule, clipped to [0, max_beta]."""
    if timesteps < 1:
        raise ValueError(f"timesteps={timesteps} must be >= 1")
    x = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, max_beta)


@dataclass(frozen=True)
class Schedule:
    """Per-step constants of a DDPM schedule, all (T,) float64; index t = 0..T-1 (METHOD.md §A)."""
    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    mask_coef: Tensor

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(timesteps: int = 100, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """The cosine schedule and everything q_sample and the posterior need, as a weightless Schedule."""
    betas = cosine_beta_schedule(timesteps, s, max_beta)
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    return Schedule(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=ac.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1 - ac).sqrt(),
        sqrt_recip_alphas_cumprod=(1 / ac).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1 / ac - 1).sqrt(),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_var.clamp(min=1e-20).log(),
        posterior_mean_coef1=betas * ac_prev.sqrt() / (1 - ac),
        posterior_mean_coef2=(1 - ac_prev) * alphas.sqrt() / (1 - ac),
        mask_coef=(1 - ac).sqrt() * betas,  # c_t = sqrt(1 - ᾱ_t) β_t
    )


def extract(a: Tensor, t: Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """a (T,), t (B,) long -> (B,1,...,1) with len(shape) dims, on t's device, in `dtype`."""
    return a.to(t.device)[t].to(dtype).reshape(t.shape[0], *((1,) * (len(shape) - 1)))


def mask_coefficient(schedule: Schedule, t: Tensor | int) -> Tensor:
    """c_t = sqrt(1 - ᾱ_t) β_t (float64), same shape as t (METHOD.md §A)."""
    if isinstance(t, Tensor):
        return schedule.mask_coef.to(t.device)[t]
    return schedule.mask_coef[t]


def to_residual(hr: Tensor, lr_up: Tensor, res_rescale: float) -> Tensor:
    """r0 = clip(res_rescale (x - y↑), -1, 1): (B,3,H,W) in [-1,1]."""
    return (res_rescale * (hr - lr_up)).clamp(-1, 1)


def from_residual(lr_up: Tensor, r0: Tensor, res_rescale: float) -> Tensor:
    """y↑ + r0 / res_rescale: (B,3,H,W), not clamped."""
    return lr_up + r0 / res_rescale


def q_sample(r0: Tensor, t: Tensor, noise: Tensor, structure: Tensor | None,
             schedule: Schedule) -> tuple[Tensor, Tensor]:
    """r0, ε (B,3,H,W), t (B,), E (B,1,H,W) | None -> (x_t, ε') with ε' = ε + c_t E (METHOD.md §A)."""
    if structure is None:
        eps_prime = noise
    else:
        if structure.shape[1] != 1 or structure.shape[0] != r0.shape[0] or structure.shape[2:] != r0.shape[2:]:
            raise ValueError(f"structure map has shape {tuple(structure.shape)}; expected (B,1,H,W) = "
                             f"({r0.shape[0]},1,{r0.shape[2]},{r0.shape[3]}), cropped like the HR")
        eps_prime = noise + extract(schedule.mask_coef, t, r0.shape, r0.dtype) * structure
    x_t = (extract(schedule.sqrt_alphas_cumprod, t, r0.shape, r0.dtype) * r0
           + extract(schedule.sqrt_one_minus_alphas_cumprod, t, r0.shape, r0.dtype) * eps_prime)
    return x_t, eps_prime


def p_sample_loop(denoise: EpsFn, shape: tuple[int, ...], schedule: Schedule, noise_fn: NoiseFn,
                  clip: bool = True) -> Tensor:
    """Ancestral DDPM with ε-prediction from r_T = noise_fn(T) -> r0 (B,3,H,W), in [-1,1] when clip."""
    T = schedule.timesteps

    def draw(step: int) -> Tensor:
        z = noise_fn(step)
        if tuple(z.shape) != tuple(shape):
            raise ValueError(f"noise_fn({step}) returned shape {tuple(z.shape)}; the sampler needs {tuple(shape)}")
        return z

    x = draw(T)
    for t in reversed(range(T)):
        eps = denoise(x, torch.full((shape[0],), t, dtype=torch.long, device=x.device))
        r0 = float(schedule.sqrt_recip_alphas_cumprod[t]) * x - float(schedule.sqrt_recipm1_alphas_cumprod[t]) * eps
        if clip:
            r0 = r0.clamp(-1, 1)
        x = float(schedule.posterior_mean_coef1[t]) * r0 + float(schedule.posterior_mean_coef2[t]) * x
        if t > 0:  # no noise at the last step
            x = x + math.exp(0.5 * float(schedule.posterior_log_variance_clipped[t])) * draw(t)
    return x


class SamDiffSR(nn.Module):
    """SAM-DiffSR behind the `SRMethod` protocol: frozen RRDB encoder + ε-UNet + cosine schedule."""

    def __init__(self, rrdb: RRDBNet, denoiser: UNet, schedule: Schedule, scale: int = 4,
                 res_rescale: float = 2.0, structure_modulation: bool = True) -> None:
        super().__init__()
        self.rrdb, self.denoiser, self.schedule = rrdb, denoiser, schedule
        self.scale, self.res_rescale, self.structure_modulation = scale, res_rescale, structure_modulation
        self.rrdb.requires_grad_(False)  # pretrained separately, frozen here (METHOD.md §A)
        self.rrdb.eval()

    @classmethod
    def from_config(cls, cfg: Config) -> "SamDiffSR":
        """Build from cfg.rrdb, cfg.unet, cfg.samdiffsr and cfg.data.scale (RRDB weights untrained)."""
        scale, sd = cfg.data.scale, cfg.samdiffsr
        rrdb = RRDBNet(cfg.rrdb.num_feat, cfg.rrdb.num_block, cfg.rrdb.grow, scale)
        denoiser = UNet(3, 3, cfg.unet.base, cfg.unet.mults, cfg.unet.blocks_per_level, cfg.unet.dropout,
                        cond_ch=rrdb.cond_channels, scale=scale, norm_groups=cfg.unet.norm_groups)
        return cls(rrdb, denoiser, make_schedule(sd.timesteps, sd.cosine_s, sd.max_beta), scale,
                   sd.res_rescale, sd.structure_modulation)

    def train(self, mode: bool = True) -> "SamDiffSR":
        super().train(mode)
        self.rrdb.eval()  # the encoder stays in eval mode
        return self

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.denoiser.parameters()

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """L1(ε_θ(x_t, t, RRDB(y)), ε') on batch hr (B,3,H,W), lr (B,3,H/s,W/s), optional spe (B,1,H,W)."""
        hr, lr = batch["hr"], batch["lr"]
        structure = batch.get("spe") if self.structure_modulation else None
        with torch.no_grad():
            cond = self.rrdb.features(lr)
        r0 = to_residual(hr, upscale(lr, self.scale), self.res_rescale)
        t = torch.randint(0, self.schedule.timesteps, (hr.shape[0],), generator=generator,
                          device=generator.device).to(hr.device)
        noise = torch.randn(r0.shape, generator=generator, device=generator.device, dtype=r0.dtype).to(hr.device)
        x_t, eps_prime = q_sample(r0, t, noise, structure, self.schedule)
        loss = F.l1_loss(self.denoiser(x_t, t, cond), eps_prime)
        return loss, {"loss": float(loss.detach()), "t_mean": float(t.float().mean())}

    @torch.no_grad()
    def super_resolve(self, lr: Tensor, *, generator: torch.Generator | None = None,
                      noise_fn: NoiseFn | None = None, cover: Tensor | None = None) -> Tensor:
        """(B,3,h,w) in [-1,1] -> (B,3,h*s,w*s) in [-1,1]: y↑ + r0/res_rescale, T-step DDPM (T = 100), no SAM."""
        b, _, h, w = lr.shape
        shape = (b, 3, h * self.scale, w * self.scale)
        if noise_fn is None:
            if generator is None:
                raise ValueError("super_resolve needs a torch.Generator (generator=...) or a noise_fn to draw noise")
            noise_fn = _generator_noise(generator, shape)
        cond = self.rrdb.features(lr)  # once per call, not per step
        r0 = p_sample_loop(lambda x, t: self.denoiser(x, t, cond), shape, self.schedule,
                           lambda step: noise_fn(step).to(device=lr.device, dtype=lr.dtype))
        return from_residual(upscale(lr, self.scale), r0, self.res_rescale).clamp(-1, 1)


def _generator_noise(generator: torch.Generator, shape: tuple[int, ...]) -> NoiseFn:
    """A NoiseFn drawing a fresh standard normal field of `shape` from `generator` at every call."""
    return lambda step: torch.randn(shape, generator=generator, device=generator.device)

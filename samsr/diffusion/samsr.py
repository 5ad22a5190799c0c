"""SAMSR (METHOD.md §B) behind the `SRMethod` protocol: the plain ResShift teacher and the one-step
student distilled from it with the SAM-Noise prior and the pixel-wise schedule, plus the semantic
consistency metric (SAM mask counts) and loss (frozen SAM image-encoder embeddings).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samsr.config import Config, ResShiftConfig
from samsr.diffusion import NoiseFn
from samsr.diffusion.resshift import Denoiser, ResShiftScheduler, sample, standard_normal, teacher_loss
from samsr.diffusion.samnoise import hard_noise_scale, image_stats, pixelwise_weight, sam_noise
from samsr.diffusion.space import Space, build_space
from samsr.images import to_uint8, upscale
from samsr.structure.masks import coverage

log = logging.getLogger(__name__)

# Reserved time input of the inverse map f⁻¹ (METHOD.md §B loss 2): diffusion steps are t = 1..T, so
# t = 0 never collides with one, and η_0 = 0 makes the input scale 1 (f⁻¹ sees x̃ unscaled).
INVERSE_T = 0

Segment = Callable[[np.ndarray], Sequence[np.ndarray]]   # (H,W,3) uint8 -> masks (H,W) bool


# ---------------------------------------------------------------- semantic consistency

class SamEmbedding(nn.Module):
    """Frozen SAM ViT image encoder at the input's own resolution: (B,3,H,W) in [-1,1] -> (B,C,⌈H/16⌉,⌈W/16⌉).

    Images go in as SAM expects them ([-1,1] -> 0..255 -> SAM's pixel mean/std, zero-padded to a
    multiple of the patch size), without the resize to 1024; the absolute positional embedding is
    interpolated (bicubic) to the patch grid, SAM's relative ones interpolate themselves.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.encoder = sam.image_encoder
        self.register_buffer("pixel_mean", sam.pixel_mean.detach().clone().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.detach().clone().view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "SamEmbedding":
        return super().train(False)          # always frozen

    def forward(self, img: Tensor) -> Tensor:
        x = ((img + 1) * 127.5 - self.pixel_mean) / self.pixel_std
        patch = self.encoder.patch_embed.proj.kernel_size[0]
        x = F.pad(x, (0, -x.shape[-1] % patch, 0, -x.shape[-2] % patch))
        x = self.encoder.patch_embed(x)                                  # (B,h,w,C)
        pos = self.encoder.pos_embed
        if pos is not None:
            if pos.shape[1:3] != x.shape[1:3]:
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic",
                                    align_corners=False).permute(0, 2, 3, 1)
            x = x + pos
        for block in self.encoder.blocks:
            x = block(x)
        return self.encoder.neck(x.permute(0, 3, 1, 2))


def semantic_loss(embed: SamEmbedding, pred: Tensor, target: Tensor) -> Tensor:
    """MSE between SAM embeddings of pred and target, both (B,3,H,W) in [-1,1]; gradient flows to pred only."""
    with torch.no_grad():
        target_emb = embed(target)
    return F.mse_loss(embed(pred), target_emb)


def mask_count_mse(pred: Tensor, target: Tensor, segment: Segment) -> float:
    """The public code's semantic metric: MSE of SAM mask-count maps (coverage C) of pred vs target,
    both (B,3,H,W) in [-1,1], averaged over the batch. No gradient."""
    errors = []
    for p, t in zip(to_uint8(pred), to_uint8(target)):
        cp = coverage(list(segment(p)), p.shape[:2]).astype(np.float64)
        ct = coverage(list(segment(t)), t.shape[:2]).astype(np.float64)
        errors.append(np.mean((cp - ct) ** 2))
    return float(np.mean(errors))


def build_sam_embedding(cfg: Config) -> SamEmbedding:
    """The frozen SAM encoder named by cfg.segmenter (tiny-sam or sam); superpixels have none."""
    from samsr.structure import segmenters

    seg = cfg.segmenter
    if seg.kind == "tiny-sam":
        return SamEmbedding(segmenters.build_tiny_sam(seg.tiny_seed, seg.tiny_image_size))
    if seg.kind == "sam":
        loaded = segmenters.SamSegmenter.from_checkpoint(seg.checkpoint, model_type=seg.model_type, device="cpu")
        return SamEmbedding(loaded.model)
    raise ValueError(f"resshift.loss_semantic > 0 needs a SAM image encoder, but segmenter.kind={seg.kind!r}; "
                     "set segmenter.kind=sam (or tiny-sam) or resshift.loss_semantic=0")


# ---------------------------------------------------------------- teacher

class ResShiftTeacher(nn.Module):
    """Plain ResShift (METHOD.md §B teacher): uniform schedule, Gaussian ε, x-prediction, L2 — in `space`
    (pixel space by default: HR and y↑ are encoded, the sampler's output decoded)."""

    def __init__(self, net: Denoiser, rs: ResShiftConfig, scale: int = 4, space: Space | None = None) -> None:
        super().__init__()
        self.net, self.rs, self.scale = net, rs, scale
        self.space = build_space(rs.space) if space is None else space
        self.scheduler = ResShiftScheduler.from_config(rs)

    @classmethod
    def from_config(cls, cfg: Config) -> "ResShiftTeacher":
        """An untrained teacher from cfg.unet, cfg.resshift, cfg.data.scale (returns bicubic until trained)."""
        space = build_space(cfg.resshift.space)
        return cls(Denoiser(cfg.unet, space.channels), cfg.resshift, cfg.data.scale, space)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.net.parameters()

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """L2(x̂, x) at t ~ U{1..T} on batch hr (B,3,H,W), lr (B,3,H/s,W/s); no SAM (uniform schedule)."""
        x = self.space.encode(batch["hr"])
        y = self.space.encode(upscale(batch["lr"], self.scale))
        loss = teacher_loss(self.net, self.scheduler, x, y, generator)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def super_resolve(self, lr: Tensor, *, generator: torch.Generator | None = None,
                      noise_fn: NoiseFn | None = None, cover: Tensor | None = None,
                      deterministic: bool = False) -> Tensor:
        """(B,3,h,w) in [-1,1] -> (B,3,h*s,w*s) in [-1,1]: T-step ResShift sampling (ancestral by default,
        the k,m,j step with `deterministic`; the prior noise is drawn either way). `cover` is ignored:
        the plain teacher has no SAM prior."""
        y = self.space.encode(upscale(lr, self.scale))
        code = sample(self.net, y, self.scheduler, deterministic=deterministic, noise_fn=noise_fn,
                      generator=generator, clip=self.space.clip)
        return self.space.decode(code).clamp(-1, 1)


# ---------------------------------------------------------------- student

class SamsrStudent(nn.Module):
    """One-step SAMSR (METHOD.md §B student): x̂ = f(x_T, T), x_T = y↑ + κ' √η'_T ε_sam, in `space`
    (pixel space by default; the SAM maps are pooled onto the code grid, the output decoded).

    Holds the trainable `net` and a frozen copy of the teacher (`teacher`) for distillation targets;
    both are in the state_dict, so a student checkpoint alone resumes training. The optional SAM
    encoder of the semantic loss is NOT part of the state_dict (frozen third-party weights).
    """

    needs_sam = True        # inference segments y↑ once (infer.upscale_array)

    def __init__(self, net: Denoiser, teacher: Denoiser, rs: ResShiftConfig, scale: int = 4,
                 embed: SamEmbedding | None = None, segment: Segment | None = None,
                 space: Space | None = None) -> None:
        super().__init__()
        self.net, self.teacher, self.rs, self.scale = net, teacher, rs, scale
        self.space = build_space(rs.space) if space is None else space
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.scheduler = ResShiftScheduler.from_config(rs)
        self.register_buffer("teacher_ready", torch.tensor(False))  # set once teacher weights are loaded
        object.__setattr__(self, "embed", embed)      # kept out of modules/state_dict on purpose
        self.segment = segment                         # optional: logs mask_count_mse

    @classmethod
    def from_teacher(cls, teacher: ResShiftTeacher, cfg: Config, *, embed: SamEmbedding | None = None,
                     segment: Segment | None = None) -> "SamsrStudent":
        """Student and frozen target copy both initialised from the teacher's weights."""
        student = cls.from_config(cfg, embed=embed, segment=segment, load_teacher=False)
        student.load_teacher(teacher.net.state_dict())
        return student

    @classmethod
    def from_config(cls, cfg: Config, *, embed: SamEmbedding | None = None, segment: Segment | None = None,
                    load_teacher: bool = True) -> "SamsrStudent":
        """Build from cfg; with load_teacher, weights come from the cfg.resshift.teacher checkpoint (path or
        s3:// URI). Without it (e.g. to load a student checkpoint next) the nets are untrained. The SAM
        encoder is built only when cfg.resshift.loss_semantic > 0 and none is passed."""
        if embed is None and cfg.resshift.loss_semantic > 0:
            embed = build_sam_embedding(cfg)
        space = build_space(cfg.resshift.space)
        student = cls(Denoiser(cfg.unet, space.channels), Denoiser(cfg.unet, space.channels), cfg.resshift,
                      cfg.data.scale, embed, segment, space)
        if load_teacher and cfg.resshift.teacher:
            student.load_teacher(teacher_state(cfg.resshift.teacher, cfg))
        return student

    def load_teacher(self, net_state: dict[str, Tensor]) -> None:
        """Copy a teacher Denoiser state_dict into both the student and the frozen target network."""
        self.net.load_state_dict(net_state)
        self.teacher.load_state_dict(copy.deepcopy(net_state))
        self.teacher_ready.fill_(True)

    def train(self, mode: bool = True) -> "SamsrStudent":
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.net.parameters()

    def prior(self, y_up: Tensor, noise: Tensor, cover: Tensor | None, cover_max: Tensor | None = None,
              noise_rms: Tensor | None = None, noise_scale: Tensor | None = None) -> tuple[Tensor, ResShiftScheduler]:
        """x_T = y↑ + κ' √η'_T ε_sam and the (pixel-wise) scheduler, on the code grid of `space`:
        y↑, noise (B,C,h,w) codes; cover (B,1,H,W) >= 1 and noise_scale at pixel resolution.

        cover None means background only (C ≡ 1): ε_sam is then plain Gaussian noise and κ' = 0.8κ.
        cover_max / noise_rms (B,) are whole-image statistics; when None, `cover` is taken to be the
        whole image. noise_scale (B,1,H,W) is the soft-mask scale map (default hard: 1/√C).
        """
        if cover is None:
            log.info("SAMSR prior without a cover map: C ≡ 1 (background only), so SAM-Noise is plain noise")
            f = self.space.factor
            cover = y_up.new_ones((y_up.shape[0], 1, y_up.shape[2] * f, y_up.shape[3] * f))
        cover = cover.to(y_up)
        if (cover_max is None) != (noise_rms is None):
            raise ValueError("pass both cover_max and noise_rms (whole-image statistics) or neither")
        if cover_max is None:
            cover_max, noise_rms = image_stats(cover, noise_scale)
        scale = hard_noise_scale(cover) if noise_scale is None else noise_scale.to(y_up)
        cover, scale = self.space.to_grid(cover), self.space.to_grid(scale)
        scheduler = self.scheduler
        if self.rs.pixelwise:
            scheduler = scheduler.pixelwise(pixelwise_weight(cover, cover_max, self.rs.weight_divisor))
        return scheduler.prior(y_up, sam_noise(noise, scale, noise_rms)), scheduler

    def _forward(self, x_T: Tensor, y_up: Tensor, scheduler: ResShiftScheduler) -> Tensor:
        """f(x_T, T): the one step."""
        T = scheduler.num_timesteps
        return self.net(scheduler.scale_input(x_T, T), y_up, T)

    def _inverse(self, x: Tensor, y_up: Tensor) -> Tensor:
        """f⁻¹(x) -> x_T: the same network at the reserved time INVERSE_T, input unscaled (η_0 = 0)."""
        return self.net(x, y_up, INVERSE_T)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Distillation + inverse + ground-truth (+ semantic) losses on hr, lr, cover, cover_max, noise_rms."""
        if not bool(self.teacher_ready):
            raise ValueError("the SAMSR student has no teacher weights; set resshift.teacher to a teacher "
                             "checkpoint or build it with SamsrStudent.from_teacher(teacher, cfg)")
        if self.rs.soft_masks and "noise_scale" not in batch:
            raise ValueError("resshift.soft_masks=true needs batch['noise_scale'] (B,1,H,W) from sam_noise_scale; "
                             "this batch has only the hard coverage — set resshift.soft_masks=false")
        hr, rs = batch["hr"], self.rs
        cover = batch.get("cover")
        if cover is not None and ("cover_max" not in batch or "noise_rms" not in batch):
            raise ValueError("batch has 'cover' but not 'cover_max'/'noise_rms'; compute them on the whole image "
                             "with samnoise.whole_image_stats before cropping")
        space = self.space
        x, y_up = space.encode(hr), space.encode(upscale(batch["lr"], self.scale))
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x)
        x_T, scheduler = self.prior(y_up, noise, cover, batch.get("cover_max"), batch.get("noise_rms"),
                                    batch.get("noise_scale"))
        with torch.no_grad():       # target x̃: the teacher's deterministic T-step output from x_T
            x_tilde = sample(self.teacher, y_up, scheduler, x_T=x_T, deterministic=True, clip=space.clip)
            z = self._inverse(x, y_up)                      # sg(f⁻¹(x))
        pred = self._forward(x_T, y_up, scheduler)
        terms = {"loss_distill": F.mse_loss(pred, x_tilde),
                 "loss_inverse": F.mse_loss(self._inverse(x_tilde, y_up), x_T),
                 "loss_gt": F.mse_loss(self._forward(z, y_up, scheduler), x)}
        weights = {"loss_distill": rs.loss_distill, "loss_inverse": rs.loss_inverse, "loss_gt": rs.loss_gt}
        if rs.loss_semantic > 0:
            if self.embed is None:
                raise ValueError("resshift.loss_semantic > 0 but the student has no SAM encoder; build it with "
                                 "SamsrStudent.from_config (which loads it) or pass embed=SamEmbedding(sam)")
            self.embed.to(hr.device)
            terms["loss_semantic"] = semantic_loss(self.embed, space.decode(pred), hr)
            weights["loss_semantic"] = rs.loss_semantic
        loss = sum(weights[k] * v for k, v in terms.items())
        metrics = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
        if self.segment is not None:
            metrics["mask_count_mse"] = mask_count_mse(space.decode(pred.detach()), hr, self.segment)
        return loss, metrics

    @torch.no_grad()
    def super_resolve(self, lr: Tensor, *, generator: torch.Generator | None = None,
                      noise_fn: NoiseFn | None = None, cover: Tensor | None = None,
                      cover_max: Tensor | None = None, noise_rms: Tensor | None = None,
                      noise_scale: Tensor | None = None) -> Tensor:
        """(B,3,h,w) in [-1,1] -> (B,3,h*s,w*s) in [-1,1] with ONE network call.

        ε comes from noise_fn(T) (tiled inference: crops of one whole-image field) or `generator`.
        cover (B,1,h*s,w*s): C of SAM's masks of y↑; None = background only, i.e. plain noise.
        Tiles must pass the whole image's cover_max and noise_rms (B,); without them `cover` is taken
        to be the whole image.
        """
        y_up = self.space.encode(upscale(lr, self.scale))
        noise = standard_normal(y_up, self.scheduler.num_timesteps, noise_fn, generator)
        x_T, scheduler = self.prior(y_up, noise, cover, cover_max, noise_rms, noise_scale)
        return self.space.decode(self._forward(x_T, y_up, scheduler)).clamp(-1, 1)


def teacher_state(uri: str, cfg: Config) -> dict[str, Tensor]:
    """The teacher Denoiser's state_dict from a samsr checkpoint (path or s3:// URI) of a samsr-teacher run."""
    from samsr.checkpoint import load_checkpoint

    payload = load_checkpoint(uri)
    tcfg = payload["config"]
    if tcfg.method != "samsr-teacher":
        raise ValueError(f"resshift.teacher={uri!r} is a {tcfg.method!r} checkpoint; point it at a samsr-teacher one")
    if tcfg.unet != cfg.unet:
        raise ValueError(f"teacher {uri!r} has unet {tcfg.unet}, the student config {cfg.unet}; the student "
                         "starts from the teacher, so set the student's unet section to the teacher's")
    states = payload["state"]
    name = "model" if "model" in states else (next(iter(states)) if len(states) == 1 else None)
    if name is None:
        raise ValueError(f"teacher checkpoint {uri!r} holds {sorted(states)}; expected one entry or 'model'")
    prefix = "net."
    return {k[len(prefix):]: v for k, v in states[name].items() if k.startswith(prefix)}


__all__ = ["INVERSE_T", "SamEmbedding", "semantic_loss", "mask_count_mse", "build_sam_embedding",
           "ResShiftTeacher", "SamsrStudent", "teacher_state"]

"""Segmenters: image (H,W,3) uint8 RGB -> ordered MaskRecords (DESIGN.md "segmenters.py").

- `SamSegmenter`: SAM's automatic mask generator; weights from a local path or s3:// URI, loaded
  with `weights_only=True`, checkpoint sha256 recorded.
- `TinySamSegmenter`: the same code path on a ~0.2M-parameter SAM with seeded random weights
  (tests and the quickstart; its masks carry no meaning).
- `SuperpixelSegmenter`: SLIC superpixels, the explicit non-SAM fallback: ordered by area, no IoU,
  and for SAMSR it gives C ≡ 1, i.e. plain noise. Its id and provenance say so.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import skimage
import torch
from segment_anything import SamAutomaticMaskGenerator, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from skimage.segmentation import slic

from samsr.config import SegmenterConfig
from samsr.storage import fetch_to_local
from samsr.structure.masks import MaskRecord, order_records, record_from_mask

# Explicit SAM builders by model type (segment-anything's own functions, no registry lookup).
BUILDERS: dict[str, Callable[[], Sam]] = {"vit_h": build_sam_vit_h, "vit_l": build_sam_vit_l, "vit_b": build_sam_vit_b}
SCORE_DECIMALS = 6   # scores are rounded once here, so the stored JSON and the in-memory order agree


class SegmenterError(ValueError):
    """A segmenter that cannot be built or run as configured."""


class Segmenter(Protocol):
    id: str
    is_sam: bool

    def provenance(self) -> dict[str, Any]:
        """JSON-ready: segmenter id, model type, checkpoint URI + sha256, generator settings."""

    def segment(self, image: np.ndarray) -> list[MaskRecord]:
        """(H,W,3) uint8 RGB -> masks ordered by `order_records`."""


# SamAutomaticMaskGenerator arguments taken from SegmenterConfig (output_mode is always binary_mask).
GENERATOR_FIELDS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                    "stability_score_offset", "box_nms_thresh", "crop_n_layers", "min_mask_region_area")


# What the tiny presets (samsr/configs/*-tiny.yaml) give the tiny random SAM: its random weights score
# every mask low, so SAM's default thresholds (pred_iou 0.88, stability 0.95) keep none on any photo.
# `samsr shard --segmenter tiny-sam` applies these too (explicit --set values still win).
TINY_SAM_SETTINGS: dict[str, Any] = {"tiny_image_size": 256, "points_per_side": 8, "points_per_batch": 64,
                                     "pred_iou_thresh": -1.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.99}


def generator_settings(cfg: SegmenterConfig | None = None, **changes: Any) -> dict[str, Any]:
    """Generator arguments of `cfg` (default: SegmenterConfig()) with `changes` applied; unknown names are errors."""
    unknown = sorted(set(changes) - set(GENERATOR_FIELDS))
    if unknown:
        raise SegmenterError(f"unknown generator setting {unknown[0]!r}; valid: {', '.join(GENERATOR_FIELDS)}")
    cfg = cfg or SegmenterConfig()
    return {**{name: getattr(cfg, name) for name in GENERATOR_FIELDS}, **changes}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise a torch device string ('cpu', 'cuda:1')."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SegmenterError(f"segmenter.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegmenterError(f"segmenter.device={name!r} but CUDA is not available here; use auto or cpu")
    return device


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Hex sha256 over (name, dtype, shape, bytes) of every state_dict entry in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_tiny_sam(seed: int, image_size: int = 256) -> Sam:
    """A ~0.2M-parameter SAM (segment-anything's classes) with random weights reproduced by `seed`.

    `image_size` must be a multiple of 64 (16 px patches, then the decoder's ×4 upscaling).
    """
    if image_size < 64 or image_size % 64:
        raise SegmenterError(f"tiny SAM image_size={image_size} must be a positive multiple of 64, e.g. 256")
    dim, grid = 48, image_size // 16
    with torch.random.fork_rng(devices=[]):   # seeds a private copy of the CPU RNG, global state untouched
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=image_size, patch_size=16, embed_dim=dim, depth=3, num_heads=2, mlp_ratio=2.0,
                out_chans=dim, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), window_size=0),
            prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                         input_image_size=(image_size, image_size), mask_in_chans=4),
            mask_decoder=MaskDecoder(
                transformer_dim=dim, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=dim,
                transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2)),
            pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
        )
    # Random 2×2 transposed-conv kernels paint a sub-patch checkerboard, so every random mask is speckle
    # spanning the whole image and box NMS keeps one; sharing each kernel's weights over its 2×2
    # positions makes masks unions of patches (still random, and varied enough to exercise the path).
    with torch.no_grad():
        for layer in sam.mask_decoder.output_upscaling:
            if isinstance(layer, torch.nn.ConvTranspose2d):
                layer.weight.copy_(layer.weight[:, :, :1, :1].expand_as(layer.weight))
    return sam.eval()


class SamSegmenter:
    """SAM's automatic mask generator on one model; build with `from_checkpoint` or `TinySamSegmenter`.

    `settings`: generator arguments (GENERATOR_FIELDS), missing ones from SegmenterConfig's defaults.
    """

    is_sam = True

    def __init__(self, model: Sam, *, segmenter_id: str, model_type: str, checkpoint_uri: str,
                 checkpoint_sha256: str, settings: Mapping[str, Any] | None = None,
                 device: str = "auto", random_weights: bool = False) -> None:
        settings = generator_settings(**(settings or {}))
        if settings["min_mask_region_area"] > 0 and importlib.util.find_spec("cv2") is None:
            raise SegmenterError(f"min_mask_region_area={settings['min_mask_region_area']} needs OpenCV (cv2), which "
                                 "is not installed; set segmenter.min_mask_region_area=0 or install "
                                 "opencv-python-headless")
        self.id = segmenter_id
        self.model_type = model_type
        self.checkpoint_uri = checkpoint_uri
        self.checkpoint_sha256 = checkpoint_sha256
        self.settings = settings
        self.random_weights = random_weights
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.generator = SamAutomaticMaskGenerator(self.model, output_mode="binary_mask", **settings)

    @classmethod
    def from_checkpoint(cls, uri: str, *, model_type: str = "vit_h", settings: Mapping[str, Any] | None = None,
                        device: str = "auto", builder: Callable[[], Sam] | None = None,
                        cache_dir: str | Path | None = None) -> SamSegmenter:
        """Load SAM weights from a local path or s3:// URI into `builder()` (default: the model_type's builder)."""
        if builder is None:
            if model_type not in BUILDERS:
                raise SegmenterError(f"segmenter.model_type={model_type!r} is unknown; valid: {', '.join(BUILDERS)}")
            builder = BUILDERS[model_type]
        if not uri:
            raise SegmenterError(
                f"segmenter.kind=sam needs a SAM {model_type} checkpoint: pass one (local path or s3:// URI) with "
                "--set segmenter.checkpoint=..., or choose --segmenter superpixel (the non-SAM fallback)")
        path = fetch_to_local(uri, cache_dir=cache_dir)   # raises StorageError naming the path/URI
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise SegmenterError(f"could not read {uri!r} ({path}) as a weights-only SAM state_dict: {err}") from err
        model = builder()
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise SegmenterError(f"checkpoint {uri!r} does not fit model_type={model_type!r} "
                                 f"(valid: {', '.join(BUILDERS)}); pick the matching type. {str(err)[:500]}") from err
        return cls(model, segmenter_id=f"sam-{model_type}", model_type=model_type, checkpoint_uri=uri,
                   checkpoint_sha256=file_sha256(path), settings=settings, device=device)

    def provenance(self) -> dict[str, Any]:
        return {"segmenter": self.id, "is_sam": True, "model_type": self.model_type,
                "checkpoint": self.checkpoint_uri, "checkpoint_sha256": self.checkpoint_sha256,
                "random_weights": self.random_weights, "fallback": None,
                "generator": {**self.settings, "output_mode": "binary_mask"}}

    def segment(self, image: np.ndarray) -> list[MaskRecord]:
        """(H,W,3) uint8 RGB -> non-empty masks, ordered; SAM resizes internally (ResizeLongestSide)."""
        _check_image(image)
        records = []
        for ann in self.generator.generate(image):
            if int(ann["area"]) == 0:
                continue   # an empty mask carries no structure
            # bbox/area recomputed from the mask: tight COCO box (SAM's own w,h are one pixel short)
            records.append(record_from_mask(ann["segmentation"], round(float(ann["predicted_iou"]), SCORE_DECIMALS),
                                            round(float(ann["stability_score"]), SCORE_DECIMALS)))
        return order_records(records)


class TinySamSegmenter(SamSegmenter):
    """`SamSegmenter` on `build_tiny_sam(seed)`: random weights, for tests and the quickstart only."""

    def __init__(self, seed: int = 0, image_size: int = 256, settings: Mapping[str, Any] | None = None,
                 device: str = "auto") -> None:
        model = build_tiny_sam(seed, image_size)
        super().__init__(model, segmenter_id=f"tiny-sam-random-seed{seed}", model_type=f"tiny-{image_size}",
                         checkpoint_uri="random-init", checkpoint_sha256=state_dict_sha256(model),
                         settings=settings, device=device, random_weights=True)


class SuperpixelSegmenter:
    """SLIC superpixels as masks: the fallback when no SAM checkpoint is available (not SAM)."""

    id = "superpixel-slic-fallback"
    is_sam = False

    def __init__(self, n_segments: int = 64, compactness: float = 10.0) -> None:
        if n_segments < 1 or compactness <= 0:
            raise SegmenterError(f"superpixel n_segments={n_segments} must be >= 1 and compactness={compactness} > 0")
        self.n_segments = n_segments
        self.compactness = compactness

    def provenance(self) -> dict[str, Any]:
        return {"segmenter": self.id, "is_sam": False, "model_type": None, "checkpoint": None,
                "checkpoint_sha256": None, "random_weights": False, "fallback": "superpixels, not SAM",
                "generator": {"method": "skimage.segmentation.slic", "n_segments": self.n_segments,
                              "compactness": self.compactness, "start_label": 1,
                              "scikit_image": skimage.__version__}}

    def segment(self, image: np.ndarray) -> list[MaskRecord]:
        """(H,W,3) uint8 RGB -> one mask per superpixel, no scores, ordered by area (largest first)."""
        _check_image(image)
        labels = slic(image, n_segments=self.n_segments, compactness=self.compactness,
                      start_label=1, channel_axis=-1)
        return order_records(record_from_mask(labels == k) for k in np.unique(labels))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image).__name__)
        raise SegmenterError(f"segmenters take an (H,W,3) uint8 RGB image, got shape {shape} dtype {dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise SegmenterError(f"empty image of shape {image.shape}")


def _sam(cfg: SegmenterConfig) -> Segmenter:
    return SamSegmenter.from_checkpoint(cfg.checkpoint, model_type=cfg.model_type,
                                        settings=generator_settings(cfg), device=cfg.device)


def _tiny_sam(cfg: SegmenterConfig) -> Segmenter:
    return TinySamSegmenter(cfg.tiny_seed, cfg.tiny_image_size, generator_settings(cfg), cfg.device)


def _superpixel(cfg: SegmenterConfig) -> Segmenter:
    return SuperpixelSegmenter(cfg.superpixel_segments, cfg.superpixel_compactness)


FACTORIES: dict[str, Callable[[SegmenterConfig], Segmenter]] = {
    "sam": _sam, "tiny-sam": _tiny_sam, "superpixel": _superpixel}


def build_segmenter(cfg: SegmenterConfig) -> Segmenter:
    """Segmenter for `cfg.kind` (sam | tiny-sam | superpixel)."""
    if cfg.kind not in FACTORIES:
        raise SegmenterError(f"segmenter.kind={cfg.kind!r} is unknown; valid: {', '.join(FACTORIES)}")
    return FACTORIES[cfg.kind](cfg)


__all__ = ["Segmenter", "SegmenterError", "GENERATOR_FIELDS", "TINY_SAM_SETTINGS", "generator_settings", "BUILDERS",
           "SamSegmenter", "TinySamSegmenter", "SuperpixelSegmenter", "build_tiny_sam", "build_segmenter", "resolve_device",
           "file_sha256", "state_dict_sha256"]

"""`samsr demo`: the whole method in a plain loop on scikit-image's bundled photos, no Ray, minutes on a CPU.

SAM-DiffSR: pretrain RRDB, train the structure-modulated diffusion model, super-resolve a held-out photo.
SAMSR: train the ResShift teacher, distil the one-step student, super-resolve the held-out photo.
Prints PSNR/SSIM (Y, border = scale) for bicubic and each model, saves a side-by-side PNG + metrics.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from samsr import config as config_mod
from samsr import images, metrics
from samsr.data import lr_upsampled, prepare_sample
from samsr.infer import sam_inputs, super_resolve_image
from samsr.loop import pretrain_rrdb, train
from samsr.structure.segmenters import build_segmenter

TRAIN_PHOTOS = ("astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
HELD_OUT = "coffee"


def bundled_photo(name: str) -> np.ndarray:
    """A real RGB8 photo shipped with scikit-image (no download)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:   # grayscale photos (camera, moon) as RGB
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def side_by_side(panels: Sequence[tuple[str, np.ndarray]]) -> Image.Image:
    """Label and concatenate equally sized RGB8 panels horizontally."""
    h, w = panels[0][1].shape[:2]
    sheet = Image.new("RGB", (w * len(panels), h + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(panels):
        sheet.paste(Image.fromarray(img), (i * w, 18))
        draw.text((i * w + 4, 3), label, fill="black")
    return sheet


def _printer(stage: str):
    def log(step: int, m: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in m.items() if k in ("loss", "rrdb_l1", "grad_norm")
                          or k.startswith("loss_"))
        print(f"  [{stage}] step {step}: {shown}", flush=True)
    return log


def _method_classes():
    from samsr.diffusion.samdiffsr import SamDiffSR
    from samsr.diffusion.samsr import ResShiftTeacher, SamsrStudent
    return SamDiffSR, ResShiftTeacher, SamsrStudent


def run(method: str = "samdiffsr", out_dir: str | Path = "demo-output", overrides: Sequence[str] = (),
        iterations: int | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Train a tiny model on bundled photos and report quality on a held-out one. Returns the metrics."""
    if method not in ("samdiffsr", "samsr"):
        raise ValueError(f"demo method {method!r}: choose 'samdiffsr' or 'samsr'")
    SamDiffSR, ResShiftTeacher, SamsrStudent = _method_classes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset = "samdiffsr-tiny" if method == "samdiffsr" else "samsr-teacher-tiny"
    cfg = config_mod.load(preset, overrides)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(seed)   # network initialisation; batches and noise draw from their own seeded generators
    scale = cfg.data.scale
    t0 = time.perf_counter()

    segmenter = build_segmenter(cfg.segmenter)
    print(f"segmenter: {segmenter.id}" + ("" if segmenter.is_sam else "  (fallback, not SAM)"), flush=True)
    soft = method == "samsr" and cfg.resshift.soft_masks
    samples = [prepare_sample(name, bundled_photo(name), scale, segmenter, soft_masks=soft) for name in TRAIN_PHOTOS]
    hr = images.crop_to_multiple(bundled_photo(HELD_OUT), scale)
    lr = images.make_lr(hr, scale)
    lr_t = images.to_tensor(lr)[None]
    panels = [("bicubic", lr_upsampled(lr, scale))]
    print(f"data: {len(samples)} training photos segmented in {time.perf_counter() - t0:.1f}s; held out: {HELD_OUT} "
          f"{hr.shape[1]}x{hr.shape[0]}", flush=True)

    if method == "samdiffsr":
        model = SamDiffSR.from_config(cfg)
        pretrain_rrdb(model.rrdb, samples, cfg, seed, log=_printer("rrdb"))
        with torch.no_grad():
            panels.append(("RRDB", images.to_uint8(model.rrdb(lr_t))[0]))
        train(model, samples, cfg, seed, iterations, log=_printer("diffusion"))
        sr = super_resolve_image(model, lr_t, cfg.infer, seed=seed)
        panels.append(("SAM-DiffSR", images.to_uint8(sr)[0]))
    else:
        teacher = ResShiftTeacher.from_config(cfg)
        train(teacher, samples, cfg, seed, iterations, log=_printer("teacher"))
        scfg = config_mod.load("samsr-student-tiny", overrides)
        student = SamsrStudent.from_teacher(teacher, scfg)
        train(student, samples, scfg, seed, iterations, log=_printer("student"))
        sr_teacher = super_resolve_image(teacher, lr_t, cfg.infer, seed=seed)
        panels.append(("teacher (15 steps)", images.to_uint8(sr_teacher)[0]))
        sr = super_resolve_image(student, lr_t, scfg.infer, seed=seed, **sam_inputs(panels[0][1], segmenter, soft))
        panels.append(("SAMSR (1 step)", images.to_uint8(sr)[0]))
    panels.append(("HR", hr))

    results = {label: metrics.evaluate(img, hr, scale) for label, img in panels[:-1]}
    side_by_side(panels).save(out / "side_by_side.png")
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'output':<20} {'PSNR-Y':>8} {'SSIM-Y':>8}")
    for label, m in results.items():
        print(f"{label:<20} {m['psnr_y']:8.2f} {m['ssim_y']:8.4f}")
    print(f"\nwrote {out / 'side_by_side.png'} and {out / 'metrics.json'} in {time.perf_counter() - t0:.0f}s", flush=True)
    return results

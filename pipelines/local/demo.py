"""`samsr demo`: a method trained in a plain loop on bundled photos (no Ray), scored on held-out photos
against bicubic with the evaluation code of `samsr eval` (samsr/evaluation.py).

SAM-DiffSR: pretrain the RRDB, train the structure-modulated diffusion (EMA weights), sample.
SAMSR: train the ResShift teacher, distil the one-step student from its EMA weights, sample both.
The default presets are the CPU recipe (`*-cpu`, minutes on 2 cores; benchmarks/RESULTS.md), `--preset
tiny` is a quick smoke run. Photos and split: pipelines/local/photos.py (`split="final"`: train on TRAIN,
score HELD_OUT; `"tune"`: train on TUNE_TRAIN, score TUNE_VAL — where recipes are chosen).
Writes `<photo>.png` side-by-sides (bicubic | models | HR), `metrics.json` and the trained models as samsr
checkpoints (`samdiffsr.pt`, `samsr-teacher.pt`, `samsr-student.pt`: `samsr eval/upscale --model`) under `out_dir`.
Progress (segmenting, training steps, scoring) shows as tqdm bars on stderr when it is a terminal.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipelines.local import photos
from pipelines.local.photos import bundled_photo
from samsr import config as config_mod
from samsr import evaluation
from samsr.checkpoint import save_checkpoint
from samsr.data import lr_upsampled, prepare_sample
from samsr.ema import make_ema
from samsr.infer import upscale_array
from samsr.loop import pretrain_rrdb, progress_bar, train
from samsr.structure.segmenters import build_segmenter

PRESETS = {"samdiffsr": ("samdiffsr",), "samsr": ("samsr-teacher", "samsr-student")}
CHECKPOINTS = {"SAM-DiffSR": "samdiffsr.pt", "teacher (15 steps)": "samsr-teacher.pt",
               "SAMSR (1 step)": "samsr-student.pt"}
SPLITS = {"final": (photos.TRAIN, photos.HELD_OUT), "tune": (photos.TUNE_TRAIN, photos.TUNE_VAL)}


def side_by_side(panels: Sequence[tuple[str, np.ndarray]]) -> Image.Image:
    """Label and concatenate equally sized RGB8 panels horizontally."""
    h, w = panels[0][1].shape[:2]
    sheet = Image.new("RGB", (w * len(panels), h + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(panels):
        sheet.paste(Image.fromarray(img), (i * w, 18))
        draw.text((i * w + 4, 3), label, fill="black")
    return sheet


def _printer(stage: str, echo: Callable[[str], None]):
    def log(step: int, m: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in m.items() if k in ("loss", "rrdb_l1", "grad_norm")
                          or k.startswith("loss_"))
        echo(f"  [{stage}] step {step}: {shown}")
    return log


class RRDBOnly(torch.nn.Module):
    """SAM-DiffSR's conditioning RRDB as an SR model of its own: is the encoder any good by itself?"""

    def __init__(self, rrdb: torch.nn.Module, scale: int) -> None:
        super().__init__()
        self.rrdb, self.scale = rrdb, scale

    @torch.no_grad()
    def super_resolve(self, lr, *, generator=None, noise_fn=None, cover=None):
        return self.rrdb(lr).clamp(-1, 1)


def train_models(method: str, samples, cfgs: Sequence[config_mod.Config], seed: int, iterations: int | None,
                 echo: Callable[[str], None] = print, progress: bool | None = False) -> dict[str, torch.nn.Module]:
    """Train the method in the plain loop; returns {label: model to sample (EMA weights when on)}.
    `progress`: tqdm bars of the steps (None: when stderr is a terminal)."""
    from samsr.diffusion.samdiffsr import SamDiffSR
    from samsr.diffusion.samsr import ResShiftTeacher, SamsrStudent

    cfg = cfgs[0]
    torch.manual_seed(seed)   # network initialisation; batches and noise draw from their own seeded generators
    if method == "samdiffsr":
        model = SamDiffSR.from_config(cfg)
        pretrain_rrdb(model.rrdb, samples, cfg, seed, log=_printer("rrdb", echo), progress=progress)
        ema = make_ema(model, cfg.train.ema_decay)
        train(model, samples, cfg, seed, iterations, log=_printer("diffusion", echo), ema=ema, progress=progress)
        final = ema.module if ema else model
        return {"RRDB": RRDBOnly(final.rrdb, cfg.data.scale), "SAM-DiffSR": final}
    teacher = ResShiftTeacher.from_config(cfg)
    ema = make_ema(teacher, cfg.train.ema_decay)
    train(teacher, samples, cfg, seed, iterations, log=_printer("teacher", echo), ema=ema, progress=progress)
    teacher = ema.module if ema else teacher
    student = SamsrStudent.from_teacher(teacher, cfgs[1])
    sema = make_ema(student, cfgs[1].train.ema_decay)
    train(student, samples, cfgs[1], seed, iterations, log=_printer("student", echo), ema=sema, progress=progress)
    return {"teacher (15 steps)": teacher, "SAMSR (1 step)": sema.module if sema else student}


def run(method: str = "samdiffsr", out_dir: str | Path = "demo-output", overrides: Sequence[str] = (),
        iterations: int | None = None, seed: int = 0, *, preset: str = "cpu", samples: int = 1,
        split: str = "final", student_overrides: Sequence[str] = (), eval_crop: int = 0,
        echo: Callable[[str], None] = lambda s: print(s, flush=True), progress: bool | None = None) -> dict:
    """Train on bundled photos, score the held-out ones against bicubic. Returns what metrics.json holds.
    `progress`: tqdm bars on stderr — None (default): when stderr is a terminal; True; False."""
    if method not in PRESETS:
        raise ValueError(f"demo method {method!r}: choose 'samdiffsr' or 'samsr'")
    if preset not in ("cpu", "tiny") or split not in SPLITS:
        raise ValueError(f"demo preset {preset!r} / split {split!r}: choose cpu|tiny and {'|'.join(SPLITS)}")
    names = PRESETS[method]
    cfgs = [config_mod.load(f"{names[0]}-{preset}", overrides)]
    cfgs += [config_mod.load(f"{n}-{preset}", [*overrides, *student_overrides]) for n in names[1:]]
    threads = torch.get_num_threads()
    if cfgs[0].train.num_threads:
        torch.set_num_threads(cfgs[0].train.num_threads)
    try:
        return _run(method, preset, cfgs, Path(out_dir), seed, iterations, samples, split, eval_crop, echo, progress)
    finally:
        torch.set_num_threads(threads)           # the caller's setting again (the demo runs in-process)


def _run(method: str, preset: str, cfgs: list, out: Path, seed: int, iterations: int | None, samples: int, split: str,
         eval_crop: int, echo: Callable[[str], None], progress: bool | None) -> dict:
    cfg, scale = cfgs[0], cfgs[0].data.scale

    out.mkdir(parents=True, exist_ok=True)
    train_names, eval_names = SPLITS[split]
    t0 = time.perf_counter()
    segmenter = build_segmenter(cfg.segmenter)
    echo(f"segmenter: {segmenter.id}" + ("" if segmenter.is_sam else "  (fallback, not SAM)"))
    soft = cfg.resshift.soft_masks
    with progress_bar(len(train_names), "segment", progress, unit="photo") as bar:
        data = []
        for n in train_names:
            data.append(prepare_sample(n, bundled_photo(n), scale, segmenter, soft_masks=soft))
            bar.update(1)
    echo(f"data: {len(data)} training photos ({', '.join(train_names)}) segmented in {time.perf_counter() - t0:.0f}s")
    models = train_models(method, data, cfgs, seed, iterations, echo, progress)
    train_seconds = time.perf_counter() - t0
    echo(f"trained in {train_seconds:.0f}s ({train_seconds / 60:.1f} min, data included); scoring "
         f"{', '.join(eval_names)} (seeds {seed}..{seed + samples - 1})")

    for label, model in models.items():       # `samsr upscale/eval --model OUT/<file>.pt` takes these
        if label in CHECKPOINTS:
            save_checkpoint(str(out / CHECKPOINTS[label]), {"model": model}, cfgs[-1] if "student" in CHECKPOINTS[label]
                            else cfgs[0])
    pairs = {n: evaluation.crop_pair(*evaluation.pair_from_hr(bundled_photo(n), scale), eval_crop, scale)
             for n in eval_names}
    results: dict = {"method": method, "preset": preset, "split": split, "seed": seed, "samples": samples,
                     "train_seconds": train_seconds, "train_photos": list(train_names), "models": {}}
    for label, model in models.items():
        n = 1 if isinstance(model, RRDBOnly) else samples
        seg = segmenter if getattr(model, "needs_sam", False) else None
        with progress_bar(len(pairs), f"score {label}", progress, unit="photo") as bar:
            rows = []
            for hr, lr in pairs.values():
                rows.append(evaluation.evaluate_image(model, hr, lr, cfg.infer, samples=n, seed=seed, segmenter=seg,
                                                      soft=soft))
                bar.update(1)
        summary = evaluation.summarize(rows)
        echo(f"\n{label}:\n{evaluation.format_rows(rows, list(pairs))}\n{evaluation.format_summary(summary, n)}")
        results["models"][label] = {"summary": summary, "rows": dict(zip(pairs, rows))}
    with progress_bar(len(pairs), "side-by-sides", progress, unit="photo") as bar:
        for name, (hr, lr) in pairs.items():
            panels = [("bicubic", lr_upsampled(lr, scale))]
            for label, model in models.items():
                seg = segmenter if getattr(model, "needs_sam", False) else None
                panels.append((label, upscale_array(model, lr, cfg.infer, segmenter=seg, soft=soft, seed=seed)))
            side_by_side([*panels, ("HR", hr)]).save(out / f"{name}.png")
            bar.update(1)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    echo(f"\nwrote {len(pairs)} side-by-sides and metrics.json to {out} in {time.perf_counter() - t0:.0f}s")
    return results


__all__ = ["run", "train_models", "side_by_side", "bundled_photo", "RRDBOnly"]

"""SAMSR's one step vs SAM-DiffSR's 100 steps (network time per image), SAM's pass apart, and the
quality of a briefly distilled student vs its 15-step teacher on held-out bundled photos.

    .venv/bin/python benchmarks/samsr_speed_quality.py [--size tiny|paper] [--lr-size 64] [--repeats 3]
        [--device cpu|cuda] [--bf16] [--sam-vit-b] [--quality] [--seed 1]

Speed: both methods built from their presets (`--size`), the student with SAM-DiffSR's UNet section so
the denoisers have the same size (parameter counts printed); untrained weights (time does not depend on
them). SAM-DiffSR's time includes its one RRDB pass; SAMSR's the one network call; the SAM pass that
SAMSR needs on y↑ is timed on its own (the tiny random SAM of the tests, and with `--sam-vit-b` a
ViT-B with random weights: the real architecture, so the real cost). Network calls are counted.

Quality (`--quality`): the teacher and student recipe of the slow test (tiny presets, 32 px crops) on
the demo's 5 training photos with the tiny random SAM for the y↑ masks, then PSNR/SSIM (Y, border 4)
on 5 held-out photos for bicubic, the teacher (15 steps, stochastic and deterministic) and the student.
Prints one JSON line per measurement; the numbers go to benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time

import numpy as np
import torch

from pipelines.local.photos import LEGACY_TRAIN as TRAIN_PHOTOS
from pipelines.local.photos import bundled_photo
from samsr import config, images, metrics
from samsr.data import lr_upsampled, prepare_sample
from samsr.diffusion.samdiffsr import SamDiffSR
from samsr.diffusion.samsr import ResShiftTeacher, SamsrStudent
from samsr.infer import sam_inputs, super_resolve_image
from samsr.loop import train
from samsr.structure.masks import coverage
from samsr.structure.segmenters import build_segmenter

HELD_OUT = ("coffee", "camera", "coins", "moon", "clock")
TEACHER_SET = ["data.hr_crop=32", "train.batch_size=16", "train.iterations=1000", "train.lr_decay_every=250"]
STUDENT_SET = ["data.hr_crop=32", "train.batch_size=16", "train.iterations=200", "train.lr=5e-5",
               "train.lr_decay_every=1000"]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def vit_b_segmenter(device: str):
    """segment-anything's ViT-B with random weights behind samsr's SAM wrapper (default generator)."""
    from segment_anything import build_sam_vit_b

    from samsr.structure.segmenters import SamSegmenter
    return SamSegmenter(build_sam_vit_b(checkpoint=None), segmenter_id="sam-vit_b-random", model_type="vit_b",
                        checkpoint_uri="random-init", checkpoint_sha256="", device=device, random_weights=True)


def speed(args) -> None:
    suffix = "-tiny" if args.size == "tiny" else ""
    sd_cfg = config.load(f"samdiffsr{suffix}")
    st_cfg = config.load(f"samsr-student{suffix}")
    st_cfg = dataclasses.replace(st_cfg, unet=sd_cfg.unet)      # same denoiser size as SAM-DiffSR's
    torch.manual_seed(0)
    sd = SamDiffSR.from_config(sd_cfg).to(args.device).eval()
    student = SamsrStudent.from_config(st_cfg, load_teacher=False).to(args.device).eval()
    print(json.dumps({"size": args.size, "samdiffsr_unet_params": n_params(sd.denoiser),
                      "samdiffsr_rrdb_params": n_params(sd.rrdb), "samsr_unet_params": n_params(student.net),
                      "samdiffsr_steps": sd_cfg.samdiffsr.timesteps, "lr_size": args.lr_size,
                      "out_size": args.lr_size * 4, "device": args.device, "threads": torch.get_num_threads(),
                      "bf16": args.bf16}), flush=True)
    g = torch.Generator().manual_seed(args.seed)
    lr = images.to_tensor(images.make_lr(images.crop_to_multiple(
        bundled_photo("coffee")[:args.lr_size * 4, :args.lr_size * 4], 4), 4))[None].to(args.device)
    y_up = lr_upsampled(images.to_uint8(lr.cpu())[0], 4)

    segs = {"tiny-sam": build_segmenter(config.load("samdiffsr-tiny").segmenter)}
    if args.sam_vit_b:
        segs["sam-vit-b-random"] = vit_b_segmenter(args.device)
    sam_times, cover = {}, None
    for name, seg in segs.items():
        sam_times[name] = timed(lambda: seg.segment(y_up), 1 if name != "tiny-sam" else args.repeats, "cpu")
        if cover is None:
            cover = coverage([r.segmentation for r in seg.segment(y_up)], y_up.shape[:2])
    cover_t = torch.from_numpy(cover.astype(np.float32))[None, None].to(args.device)

    autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())
    sd_calls, st_calls = count_calls(sd.denoiser), count_calls(student.net)
    with torch.no_grad(), autocast:
        t_sd = timed(lambda: sd.super_resolve(lr, generator=g), args.repeats, args.device)
        t_st = timed(lambda: student.super_resolve(lr, generator=g, cover=cover_t), args.repeats, args.device)
    per_run_sd, per_run_st = len(sd_calls) // (args.repeats + 1), len(st_calls) // (args.repeats + 1)
    print(json.dumps({"samdiffsr_s": t_sd, "samdiffsr_network_calls": per_run_sd, "samsr_s": t_st,
                      "samsr_network_calls": per_run_st, "speedup": t_sd / t_st,
                      **{f"sam_pass_s[{k}]": v for k, v in sam_times.items()},
                      **{f"speedup_with_sam_pass[{k}]": t_sd / (t_st + v) for k, v in sam_times.items()}}),
          flush=True)


def quality(args) -> None:
    tcfg = config.load("samsr-teacher-tiny", TEACHER_SET)
    scfg = config.load("samsr-student-tiny", STUDENT_SET)
    segmenter = build_segmenter(tcfg.segmenter)
    t0 = time.perf_counter()
    samples = [prepare_sample(n, bundled_photo(n), 4, segmenter) for n in TRAIN_PHOTOS]
    torch.manual_seed(args.seed)
    teacher = ResShiftTeacher.from_config(tcfg)
    train(teacher, samples, tcfg, seed=args.seed)
    t1 = time.perf_counter()
    student = SamsrStudent.from_teacher(teacher, scfg)
    train(student, samples, scfg, seed=args.seed + 1)
    t2 = time.perf_counter()
    print(json.dumps({"segmenter": segmenter.id, "train_photos": list(TRAIN_PHOTOS), "seed": args.seed,
                      "teacher_train_s": t1 - t0, "student_train_s": t2 - t1}), flush=True)
    student.eval()
    rows = []
    for name in HELD_OUT:
        hr = images.crop_to_multiple(bundled_photo(name), 4)
        lr_u8 = images.make_lr(hr, 4)
        lr = images.to_tensor(lr_u8)[None]
        y_up = lr_upsampled(lr_u8, 4)
        outs, times = {"bicubic": y_up}, {}
        for label, det in (("teacher_15", False), ("teacher_15_det", True)):
            t = time.perf_counter()
            sr = teacher.super_resolve(lr, generator=torch.Generator().manual_seed(0), deterministic=det)
            times[label] = time.perf_counter() - t
            outs[label] = images.to_uint8(sr)[0]
        t = time.perf_counter()
        sr = super_resolve_image(student, lr, scfg.infer, seed=0, **sam_inputs(y_up, segmenter))
        times["student_1"] = time.perf_counter() - t
        outs["student_1"] = images.to_uint8(sr)[0]
        row = {"photo": name, **{f"psnr_y[{k}]": metrics.psnr_y(v, hr, 4) for k, v in outs.items()},
               **{f"ssim_y[{k}]": metrics.ssim_y(v, hr, 4) for k, v in outs.items()},
               **{f"s[{k}]": v for k, v in times.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "photo"}
    print(json.dumps({"photo": "mean", **mean}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "paper"), default="tiny")
    p.add_argument("--lr-size", type=int, default=64, help="LR side in px (output is 4x)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the network calls")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sam-vit-b", action="store_true", help="also time a random-weight ViT-B SAM pass")
    p.add_argument("--quality", action="store_true", help="also train briefly and compare student vs teacher")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_speed:
        speed(args)
    if args.quality:
        quality(args)


if __name__ == "__main__":
    main()

"""Scoring a model against bicubic, image by image (METHOD.md "Evaluation protocol (both)").

The one place that turns (model, HR, LR) into numbers: `samsr eval`, validation while training, the
quickstart and the demo all call `evaluate_image` and `summarize`, so their figures agree.

Per image, for the model and for bicubic: PSNR-Y and SSIM-Y (border = scale), HaarPSI and GMSD, and
LPIPS only when local weights are given (never with random ones). A diffusion model is sampled
`samples` times with seeds `seed, seed+1, …`: `<metric>` is the mean score of single samples (what a
user gets from one call) and, when samples > 1, `mean_of_samples_<metric>` is the score of the pixel
mean of the samples — above the single-sample score when sampling noise, not the model, costs quality.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from samsr import images, metrics
from samsr.config import InferConfig

METRICS = ("psnr_y", "ssim_y", "haarpsi", "gmsd")
LOWER_IS_BETTER = ("gmsd", "lpips")
BICUBIC = "bicubic_"
MEAN_OF_SAMPLES = "mean_of_samples_"


def pair_from_hr(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(H,W,3) uint8 -> (HR cropped to a multiple of `scale`, its bicubic LR): what the shard job stores."""
    hr = images.crop_to_multiple(hr, scale)
    return hr, images.make_lr(hr, scale)


def check_pair(hr: np.ndarray, lr: np.ndarray, scale: int) -> None:
    """Raise ValueError naming both sizes unless HR is exactly LR × `scale`."""
    want = (lr.shape[0] * scale, lr.shape[1] * scale)
    if hr.shape[:2] != want:
        raise ValueError(f"HR {hr.shape[1]}x{hr.shape[0]} is not LR {lr.shape[1]}x{lr.shape[0]} x{scale} "
                         f"(expected HR {want[1]}x{want[0]}); crop the HR to a multiple of the scale")


def crop_pair(hr: np.ndarray, lr: np.ndarray, side: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Central window of a pair (HR = LR × scale), at most `side` HR px a side, on the LR grid; 0 = whole."""
    check_pair(hr, lr, scale)
    p = side // scale
    if p <= 0:
        return hr, lr
    h, w = lr.shape[:2]
    i, j = (h - min(p, h)) // 2, (w - min(p, w)) // 2
    lr_c = lr[i:i + min(p, h), j:j + min(p, w)]
    hr_c = hr[i * scale:(i + lr_c.shape[0]) * scale, j * scale:(j + lr_c.shape[1]) * scale]
    return np.ascontiguousarray(hr_c), np.ascontiguousarray(lr_c)


def score(sr: np.ndarray, hr: np.ndarray, scale: int, lpips_weights: str | None = None) -> dict[str, float]:
    """psnr_y, ssim_y, haarpsi, gmsd (+ lpips with a local weights file) of SR against HR, (H,W,3) 0..255."""
    out = metrics.evaluate(sr, hr, scale)
    if lpips_weights:
        out["lpips"] = metrics.lpips(sr, hr, lpips_weights)
    return out


def evaluate_image(method, hr: np.ndarray, lr: np.ndarray, infer: InferConfig, *, samples: int = 1, seed: int = 0,
                   segmenter=None, soft: bool = False, device: str = "cpu",
                   lpips_weights: str | None = None) -> dict[str, float]:
    """Scores of `method` and of bicubic on one pair: HR (H,W,3) uint8 = LR (h,w,3) uint8 × scale.

    Keys: `<metric>` (mean over single samples), `bicubic_<metric>`, and with samples > 1
    `mean_of_samples_<metric>` and `<metric>_sample_std` (spread of single samples on this image).
    """
    from samsr.data import lr_upsampled
    from samsr.infer import upscale_samples

    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    scale = method.scale
    check_pair(hr, lr, scale)
    row = {BICUBIC + k: v for k, v in score(lr_upsampled(lr, scale), hr, scale, lpips_weights).items()}
    outputs = upscale_samples(method, lr, infer, [seed + k for k in range(samples)], segmenter=segmenter,
                              soft=soft, device=device)
    singles = [score(sr, hr, scale, lpips_weights) for sr in outputs]
    for key in singles[0]:
        values = [s[key] for s in singles]
        row[key] = float(np.mean(values))
        if samples > 1:
            row[f"{key}_sample_std"] = float(np.std(values))
    if samples > 1:
        mean_image = np.mean(np.stack(outputs).astype(np.float64), axis=0)
        row.update({MEAN_OF_SAMPLES + k: v for k, v in score(mean_image, hr, scale, lpips_weights).items()})
    return row


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-image score rows -> {key: {mean, std, n}} over the rows that have the key (finite values),
    plus `delta_<metric>` = mean model score − mean bicubic score (positive = better for psnr/ssim/haarpsi)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values.setdefault(key, []).append(float(v))
    out = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for k, v in values.items()}
    return _with_deltas(out)


def _with_deltas(out: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    for key in list(out):
        if BICUBIC + key in out:
            out[f"delta_{key}"] = {"mean": out[key]["mean"] - out[BICUBIC + key]["mean"], "std": 0.0,
                                   "n": out[key]["n"]}
    return out


def _is_score(key: str, value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and not key.startswith("t_"))


class RunningSummary:
    """`summarize` kept as running sums — per key: count, mean and sum of squared deviations (Welford;
    parts merged with Chan et al.'s formula) — so a job's driver holds a few numbers per metric, never rows.
    Workers summarise their part (`add`) and send `as_dict()`; the driver `merge`s them. Keys starting
    with `t_` (timings) are left out."""

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}       # key -> [n, mean, m2]

    def add(self, row: Mapping[str, Any]) -> None:
        for key, v in row.items():
            if _is_score(key, v):
                self._merge(key, 1.0, float(v), 0.0)

    def _merge(self, key: str, n: float, mean: float, m2: float) -> None:
        if key not in self.stats:
            self.stats[key] = [n, mean, m2]
            return
        na, ma, m2a = self.stats[key]
        total = na + n
        delta = mean - ma
        self.stats[key] = [total, ma + delta * n / total, m2a + m2 + delta * delta * na * n / total]

    def merge(self, other: Mapping[str, Sequence[float]]) -> None:
        """Add another summary's `as_dict()`."""
        for key, (n, mean, m2) in other.items():
            if n:
                self._merge(key, float(n), float(mean), float(m2))

    def as_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.stats.items()}

    def summary(self) -> dict[str, dict[str, float]]:
        """The `summarize` format: {key: {mean, std, n}} plus `delta_<metric>`."""
        return _with_deltas({k: {"mean": mean, "std": math.sqrt(max(m2, 0.0) / n), "n": int(n)}
                             for k, (n, mean, m2) in self.stats.items()})


def flat_means(summary: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """{prefix + key: mean} of a `summarize` result: the numbers logged to MLflow."""
    return {prefix + k: v["mean"] for k, v in summary.items()}


def metric_names(summary: Mapping[str, Any]) -> list[str]:
    """The metrics a summary holds, in the protocol's order (lpips last when present)."""
    return [m for m in (*METRICS, "lpips") if m in summary]


def format_summary(summary: Mapping[str, Mapping[str, float]], samples: int = 1, label: str = "model") -> str:
    """A table: one row per metric, columns model (single samples) | mean of samples | bicubic | Δ."""
    lines = [f"{'metric':<8} {label + (' (1 sample)' if samples > 1 else ''):>22} "
             + (f"{f'mean of {samples} samples':>22} " if samples > 1 else "")
             + f"{'bicubic':>18} {'Δ vs bicubic':>13}"]

    def cell(key: str) -> str:
        s = summary.get(key)
        return "-" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f}"

    for m in metric_names(summary):
        arrow = "↓" if m in LOWER_IS_BETTER else "↑"
        lines.append(f"{m + arrow:<8} {cell(m):>22} " + (f"{cell(MEAN_OF_SAMPLES + m):>22} " if samples > 1 else "")
                     + f"{cell(BICUBIC + m):>18} {summary['delta_' + m]['mean']:>+13.4f}")
    return "\n".join(lines)


def format_rows(rows: Sequence[Mapping[str, Any]], names: Sequence[str], metric: str = "psnr_y") -> str:
    """One line per image: name, model and bicubic `metric` (and the mean of samples when present)."""
    lines = []
    for name, row in zip(names, rows):
        extra = f"  mean of samples {row[MEAN_OF_SAMPLES + metric]:.2f}" if MEAN_OF_SAMPLES + metric in row else ""
        lines.append(f"{name:<24} {metric} {row[metric]:7.2f}  bicubic {row[BICUBIC + metric]:7.2f}{extra}")
    return "\n".join(lines)


__all__ = ["METRICS", "BICUBIC", "MEAN_OF_SAMPLES", "pair_from_hr", "check_pair", "crop_pair", "score",
           "evaluate_image", "summarize", "RunningSummary", "flat_means", "metric_names", "format_summary", "format_rows"]

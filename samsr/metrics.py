"""Image quality metrics for SR evaluation (METHOD.md "Evaluation protocol (both)").

PSNR and SSIM on the BT.601 luma Y with `scale` border pixels shaved (the convention SR papers use),
computed by scikit-image (SSIM: 11x11 Gaussian window, sigma 1.5, population statistics, as Wang et al.);
HaarPSI and GMSD as weight-free perceptual scores, our numpy code (docs/decisions.md "Metrics": piq
was measured and not faster; our HaarPSI follows the authors' reference code); LPIPS (AlexNet) through
the `lpips` package, only from a local weights file. Images are RGB (H,W,3) uint8, or float in [0,255].
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

SSIM_WINDOW = 11            # Wang et al.: 11x11 Gaussian window, sigma 1.5 (what scikit-image uses for it)
SSIM_SIGMA = 1.5
DATA_RANGE = 255.0
HAARPSI_C, HAARPSI_ALPHA = 30.0, 4.2    # Reisenhofer et al. 2018
GMSD_C = 170.0                          # Xue et al. 2014, for 0..255 images


# ---------------------------------------------------------------- inputs and filters

def _as_rgb(img: np.ndarray, name: str) -> np.ndarray:
    """Check an (H,W,3) RGB image in 0..255 and return it as float64."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an RGB image shaped (H,W,3), got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float64)
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 or float in 0..255, got dtype {img.dtype}; convert to uint8 first")
    img = img.astype(np.float64)
    if not np.isfinite(img).all() or img.min() < 0.0 or img.max() > 255.0:
        raise ValueError(f"{name}: float values must be finite and in [0,255], got min {img.min()} max {img.max()}; "
                         "clip (and scale [0,1] data by 255) first")
    return img


def _as_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}; compare an SR output with the HR "
                         "image it reconstructs (crop the HR to a multiple of the scale first)")
    return _as_rgb(a, "first image"), _as_rgb(b, "second image")


def _same_matlab(x: np.ndarray, w_rows: np.ndarray, w_cols: np.ndarray) -> np.ndarray:
    """MATLAB conv2(x, kernel, 'same') for the separable kernel outer(w_rows, w_cols), up to its flip: zero
    padding; for an even kernel size k the window of output i covers inputs i-k/2+1 .. i+k/2."""
    x = np.pad(x, [((len(w) - 1) // 2, len(w) // 2) for w in (w_rows, w_cols)])
    x = sum(w * x[j:j + x.shape[0] - len(w_rows) + 1] for j, w in enumerate(w_rows))
    return sum(w * x[:, j:j + x.shape[1] - len(w_cols) + 1] for j, w in enumerate(w_cols))


def _mean2x2_down(x: np.ndarray) -> np.ndarray:
    """2x2 mean then every 2nd pixel (odd sides see a zero row/column), as in the HaarPSI/GMSD code."""
    x = np.pad(x, ((0, x.shape[0] % 2), (0, x.shape[1] % 2)))
    return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))


def _shave(y: np.ndarray, border: int) -> np.ndarray:
    if border < 0 or 2 * border >= min(y.shape):
        raise ValueError(f"border={border} must be >= 0 and leave pixels of a {y.shape[0]}x{y.shape[1]} image; "
                         "use border=scale for SR evaluation")
    return y[border:y.shape[0] - border, border:y.shape[1] - border]


def _similarity(a: np.ndarray, b: np.ndarray, c: float) -> np.ndarray:
    return (2.0 * a * b + c) / (a * a + b * b + c)


# ---------------------------------------------------------------- PSNR / SSIM on Y

def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """(H,W,3) RGB uint8 or float in [0,255] -> (H,W) float64 BT.601 luma in [16,235] (MATLAB rgb2ycbcr, unrounded)."""
    rgb = _as_rgb(img, "image")
    # METHOD.md "Evaluation protocol": Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _shaved_y(sr: np.ndarray, hr: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    sr, hr = _as_pair(sr, hr)
    return _shave(rgb_to_y(sr), border), _shave(rgb_to_y(hr), border)


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR (dB) on Y of two (H,W,3) RGB images in 0..255, `border` px shaved per side; inf if equal."""
    y_sr, y_hr = _shaved_y(sr, hr, border)
    with np.errstate(divide="ignore"):   # equal images: MSE 0 -> inf dB, no warning
        return float(peak_signal_noise_ratio(y_hr, y_sr, data_range=DATA_RANGE))


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """Mean SSIM on Y of two (H,W,3) RGB images in 0..255, `border` px shaved per side; in [-1,1]."""
    y_sr, y_hr = _shaved_y(sr, hr, border)
    if min(y_sr.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after shaving border={border}, "
                         f"got {y_sr.shape[0]}x{y_sr.shape[1]}")
    # Wang et al. 2004 (ssim_index.m): scikit-image filters the whole image and averages the map without
    # its 5 px margin, i.e. over the 'valid' region the reference code uses; K1=0.01, K2=0.03 (its defaults)
    return float(structural_similarity(y_sr, y_hr, data_range=DATA_RANGE, gaussian_weights=True,
                                       sigma=SSIM_SIGMA, use_sample_covariance=False))


# ---------------------------------------------------------------- HaarPSI / GMSD

def _luma(rgb: np.ndarray) -> np.ndarray:
    """NTSC luma Y (unshifted, 0..255), the luminance HaarPSI and GMSD use."""
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _yiq(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NTSC YIQ with the coefficients of the HaarPSI reference code."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return _luma(rgb), 0.596 * r - 0.274 * g - 0.322 * b, 0.211 * r - 0.523 * g + 0.312 * b


def _haar_responses(y: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """|Haar wavelet| responses of (H,W) `y` at `scale` (filter side 2**scale, entries ±2**-scale), both orientations."""
    k = 2 ** scale
    step = np.repeat([-1.0, 1.0], k // 2)
    box = np.full(k, 1.0 / k)
    return np.abs(_same_matlab(y, step, box)), np.abs(_same_matlab(y, box, step))


def haarpsi(a: np.ndarray, b: np.ndarray) -> float:
    """HaarPSI of two (H,W,3) RGB images in 0..255 -> similarity in [0,1], 1.0 for identical images."""
    a, b = _as_pair(a, b)
    # Reisenhofer et al. 2018: YIQ, 2x2 mean + dyadic subsampling, 3 Haar scales on Y
    ya, ia, qa = (_mean2x2_down(ch) for ch in _yiq(a))
    yb, ib, qb = (_mean2x2_down(ch) for ch in _yiq(b))
    ha, hb = [_haar_responses(ya, s) for s in (1, 2, 3)], [_haar_responses(yb, s) for s in (1, 2, 3)]
    sims, weights = [], []
    for o in range(2):  # orientations
        sims.append(sum(_similarity(ha[s][o], hb[s][o], HAARPSI_C) for s in (0, 1)) / 2)  # scales 1 and 2
        weights.append(np.maximum(ha[2][o], hb[2][o]))                                     # scale 3
    # chroma: |2x2 mean| of I and Q, weighted by the mean of the two luma weight maps
    half = np.full(2, 0.5)
    chroma = [np.abs(_same_matlab(ch, half, half)) for ch in (ia, qa, ib, qb)]
    sims.append((_similarity(chroma[0], chroma[2], HAARPSI_C) + _similarity(chroma[1], chroma[3], HAARPSI_C)) / 2)
    weights.append((weights[0] + weights[1]) / 2)
    total = sum(float(w.sum()) for w in weights)
    if total == 0.0:  # all-zero weights only happen when both images are black, i.e. identical
        return 1.0
    alpha = HAARPSI_ALPHA
    v = sum(float((w / (1.0 + np.exp(-alpha * s))).sum()) for s, w in zip(sims, weights)) / total
    return (math.log(v / (1.0 - v)) / alpha) ** 2


def _prewitt_magnitude(y: np.ndarray) -> np.ndarray:
    avg, diff = np.full(3, 1.0 / 3.0), np.array([1.0, 0.0, -1.0])
    return np.hypot(_same_matlab(y, avg, diff), _same_matlab(y, diff, avg))


def gmsd(a: np.ndarray, b: np.ndarray) -> float:
    """GMSD of two (H,W,3) RGB images in 0..255 -> deviation >= 0 (lower is better), 0.0 for identical images."""
    a, b = _as_pair(a, b)
    # Xue et al. 2014: luma, 2x2 mean + subsample by 2, Prewitt magnitudes, std (1/N, eq. 9) of the GMS map
    ga, gb = (_prewitt_magnitude(_mean2x2_down(_luma(x))) for x in (a, b))
    return float(_similarity(ga, gb, GMSD_C).std())


def evaluate(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    """Scores of an SR output against its HR, both (H,W,3) RGB uint8: psnr_y, ssim_y (border = scale), haarpsi, gmsd."""
    if np.shape(sr) != np.shape(hr):
        raise ValueError(f"SR output shape {np.shape(sr)} differs from HR shape {np.shape(hr)}; "
                         "crop the HR to a multiple of the scale before super-resolving its LR")
    return {"psnr_y": psnr_y(sr, hr, scale), "ssim_y": ssim_y(sr, hr, scale),
            "haarpsi": haarpsi(sr, hr), "gmsd": gmsd(sr, hr)}


# ---------------------------------------------------------------- LPIPS (local weights only)

_LPIPS_HOWTO = ("save one with `torch.save(lpips.LPIPS(net='alex').state_dict(), PATH)` on a machine that can "
                "download the AlexNet weights, then copy it here")


def lpips_available(weights_path: str | os.PathLike | None) -> bool:
    """True when `weights_path` names a local LPIPS-AlexNet state_dict file (nothing is ever downloaded)."""
    return weights_path is not None and Path(weights_path).is_file()


@functools.lru_cache(maxsize=2)
def _lpips_model(path: str, mtime_ns: int):
    """`lpips.LPIPS` (AlexNet, v0.1) with every weight from the state_dict at `path` (cached per path and version)."""
    import lpips as lpips_pkg  # torch and lpips only when LPIPS is actually asked for
    import torch

    with warnings.catch_warnings():
        # lpips passes torchvision the deprecated `pretrained=False`, i.e. weights=None: random init, no download
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*deprecated", category=UserWarning)
        model = lpips_pkg.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state if isinstance(state, dict) else {}
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{path} is not an LPIPS-AlexNet state_dict: missing {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}; {_LPIPS_HOWTO}")
    try:
        model.load_state_dict(state)   # strict: extra keys or other shapes are a different network
    except RuntimeError as exc:
        raise ValueError(f"{path} is not an LPIPS-AlexNet state_dict: {' '.join(str(exc).split())[:300]}; "
                         f"{_LPIPS_HOWTO}") from None
    return model.eval()


def lpips(a: np.ndarray, b: np.ndarray, weights_path: str | os.PathLike) -> float:
    """LPIPS v0.1 (AlexNet) of two (H,W,3) RGB images in 0..255 -> distance >= 0, from a local weights file."""
    if not lpips_available(weights_path):
        raise FileNotFoundError(f"LPIPS needs local weights at {str(weights_path)!r} and found no file there; "
                                f"{_LPIPS_HOWTO}. HaarPSI and GMSD need no weights.")
    import torch

    a, b = _as_pair(a, b)
    path = Path(weights_path).resolve()
    model = _lpips_model(str(path), path.stat().st_mtime_ns)
    with torch.no_grad():
        x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 127.5 - 1.0   # [-1,1]
        return float(model(x[0:1], x[1:2], normalize=False))

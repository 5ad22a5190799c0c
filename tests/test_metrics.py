"""samsr.metrics against hand-computed values and independent implementations (METHOD.md "Evaluation protocol")."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage, signal
from skimage import data

from samsr import metrics


def distort(img: np.ndarray, noise: float, blur: float, seed: int) -> np.ndarray:
    """Gaussian blur (std `blur` px) + Gaussian noise (std `noise`), rounded to uint8."""
    rng = np.random.default_rng(seed)
    x = img.astype(np.float64)
    if blur:
        x = ndimage.gaussian_filter(x, sigma=(blur, blur, 0.0))
    x = x + rng.normal(0.0, noise, img.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def astronaut_pair() -> tuple[np.ndarray, np.ndarray]:
    hr = data.astronaut()                       # (512,512,3) uint8, bundled with scikit-image
    return distort(hr, noise=10.0, blur=1.0, seed=0), hr


# ---------------------------------------------------------------- Y and PSNR

def test_rgb_to_y_known_values():
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    y = metrics.rgb_to_y(img)
    assert y.dtype == np.float64 and y.shape == (1, 5)
    np.testing.assert_allclose(y[0], [16.0, 235.0, 16.0 + 65.481, 16.0 + 128.553, 16.0 + 24.966], atol=1e-12)
    np.testing.assert_allclose(metrics.rgb_to_y(img.astype(np.float32)), y, atol=1e-12)


@pytest.mark.parametrize("bad", [np.zeros((4, 4)), np.zeros((4, 4, 4), np.uint8), np.full((4, 4, 3), 256.0),
                                 np.full((4, 4, 3), np.nan), np.zeros((4, 4, 3), np.int64)])
def test_rgb_to_y_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="image"):
        metrics.rgb_to_y(bad)


def test_psnr_constant_y_offset_uint8():
    # +1 on R, G and B moves Y by exactly (65.481 + 128.553 + 24.966) / 255 = 219/255
    hr = np.random.default_rng(1).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    d = 219.0 / 255.0
    assert metrics.psnr_y(hr + 1, hr, border=4) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)


def test_psnr_constant_y_offset_float():
    hr = np.random.default_rng(2).uniform(0, 200, (16, 16, 3))
    d = 2.5
    sr = hr + d * 255.0 / 219.0
    assert metrics.psnr_y(sr, hr, border=0) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
    assert metrics.psnr_y(sr, hr, border=0) == pytest.approx(40.17200343523835, abs=1e-9)


def test_psnr_hand_computed_mse():
    hr = np.zeros((6, 6, 3), np.uint8)          # Y = 16 everywhere
    sr = hr.copy()
    sr[2, 3, 0] = 255                           # dY = 65.481
    sr[4, 1, 1] = 10                            # dY = 1285.53 / 255
    mse_full = (65.481 ** 2 + (1285.53 / 255) ** 2) / 36
    assert metrics.psnr_y(sr, hr, border=0) == pytest.approx(10 * math.log10(255 ** 2 / mse_full), abs=1e-9)
    mse_inner = (65.481 ** 2 + (1285.53 / 255) ** 2) / 16   # border 1 keeps rows/cols 1..4
    assert metrics.psnr_y(sr, hr, border=1) == pytest.approx(10 * math.log10(255 ** 2 / mse_inner), abs=1e-9)
    mse_b2 = 65.481 ** 2 / 4                                # border 2 keeps rows/cols 2..3: only (2,3)
    assert metrics.psnr_y(sr, hr, border=2) == pytest.approx(10 * math.log10(255 ** 2 / mse_b2), abs=1e-9)


def test_psnr_border_is_shaved():
    hr = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    sr = hr.copy()
    sr[:2] = 255 - sr[:2]
    sr[:, -2:] = 0
    sr[5, 1] = 7
    assert metrics.psnr_y(sr, hr, border=2) == math.inf
    assert math.isfinite(metrics.psnr_y(sr, hr, border=1))
    assert metrics.psnr_y(hr, hr, border=0) == math.inf


@pytest.mark.parametrize("fn, side, match", [(metrics.psnr_y, 8, "border=4"), (metrics.ssim_y, 18, "11x11")])
def test_too_few_pixels_is_an_error(fn, side, match):
    # psnr: border 4 leaves nothing of 8 px; ssim: border 4 leaves 10 px < the 11 px window
    img = np.zeros((side, side, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        fn(img, img, border=4)


# ---------------------------------------------------------------- SSIM

def _ssim_wang(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 (ssim_index.m) written out: 11x11 Gaussian (sigma 1.5) statistics over the 'valid'
    region, population (co)variances, mean of the map; FFT correlation, independent of scikit-image."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def stat(v):
        return signal.fftconvolve(v, w[::-1, ::-1], mode="valid")

    mx, my = stat(x), stat(y)
    vx, vy, cxy = stat(x * x) - mx * mx, stat(y * y) - my * my, stat(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))).mean())


def test_ssim_is_wang_et_al_on_a_photo(astronaut_pair):
    sr, hr = astronaut_pair
    for border in (0, 4):
        y_sr, y_hr = (metrics.rgb_to_y(x)[border:512 - border, border:512 - border] for x in (sr, hr))
        # scikit-image filters the whole image then drops 5 px per side: the reference code's 'valid' region
        assert metrics.ssim_y(sr, hr, border=border) == pytest.approx(_ssim_wang(y_sr, y_hr), abs=1e-9)


def test_ssim_fixed_reference(astronaut_pair):
    sr, hr = astronaut_pair
    assert metrics.ssim_y(sr, hr, border=4) == pytest.approx(0.7697796636046, abs=1e-6)
    assert metrics.ssim_y(hr, hr, border=4) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- HaarPSI / GMSD

def test_identical_images(astronaut_pair):
    _, hr = astronaut_pair
    assert metrics.haarpsi(hr, hr) == pytest.approx(1.0, abs=1e-12)
    assert metrics.gmsd(hr, hr) == pytest.approx(0.0, abs=1e-12)
    black = np.zeros((16, 16, 3), np.uint8)
    assert metrics.haarpsi(black, black) == 1.0


def test_haarpsi_matches_authors_reference(astronaut_pair):
    # 0.85044903454712: rgcda/haarpsi haarPsi.py (haar_psi_numpy) on the same pair, run outside this repo
    sr, hr = astronaut_pair
    assert metrics.haarpsi(sr, hr) == pytest.approx(0.85044903454712, abs=1e-9)
    assert metrics.haarpsi(hr, sr) == pytest.approx(metrics.haarpsi(sr, hr), abs=1e-12)


def test_gmsd_fixed_reference(astronaut_pair):
    # 0.04968467212806: piq 0.8.0 gmsd(data_range=255) on the same pair
    sr, hr = astronaut_pair
    assert metrics.gmsd(sr, hr) == pytest.approx(0.04968467212806, abs=1e-9)


def test_more_noise_scores_worse():
    hr = data.chelsea()[:128, 100:260]
    noisy = [distort(hr, noise=s, blur=0.0, seed=4) for s in (3.0, 10.0, 30.0)]
    h = [metrics.haarpsi(x, hr) for x in noisy]
    g = [metrics.gmsd(x, hr) for x in noisy]
    assert 1.0 > h[0] > h[1] > h[2] > 0.0
    assert 0.0 < g[0] < g[1] < g[2]


def test_agrees_with_piq():
    piq = pytest.importorskip("piq")
    torch = pytest.importorskip("torch")
    hr = data.coffee()[:200, :300]
    sr = distort(hr, noise=8.0, blur=0.8, seed=5)
    a, b = (torch.from_numpy(x).permute(2, 0, 1)[None].double() for x in (sr, hr))
    assert metrics.gmsd(sr, hr) == pytest.approx(float(piq.gmsd(a, b, data_range=255.0)), abs=1e-9)
    # piq's YIQ matrix has one more digit (0.5959 vs 0.596, ...) than the authors' code we follow
    assert metrics.haarpsi(sr, hr) == pytest.approx(float(piq.haarpsi(a, b, data_range=255.0)), abs=1e-4)


# ---------------------------------------------------------------- evaluate

def test_evaluate(astronaut_pair):
    sr, hr = astronaut_pair
    scores = metrics.evaluate(sr, hr, scale=4)
    assert set(scores) == {"psnr_y", "ssim_y", "haarpsi", "gmsd"}
    assert scores["psnr_y"] == pytest.approx(28.98647481583, abs=1e-6)
    assert scores["ssim_y"] == pytest.approx(0.7697796636046, abs=1e-6)
    assert all(isinstance(v, float) for v in scores.values())


def test_evaluate_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(32, 28, 3\)"):
        metrics.evaluate(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 28, 3), np.uint8), scale=4)


# ---------------------------------------------------------------- LPIPS

def test_lpips_without_weights_says_where_it_looked(tmp_path):
    missing = tmp_path / "alex.pth"
    assert not metrics.lpips_available(missing) and not metrics.lpips_available(None)
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(FileNotFoundError, match="LPIPS needs local weights at .*alex.pth"):
        metrics.lpips(img, img, missing)


def _lpips_reference(lpips_pkg, torch, path):
    """An LPIPS-AlexNet built by the `lpips` package, saved to `path`: its bundled linear layers on an AlexNet
    with fixed random weights (numpy seed 7, He-scaled), so nothing is downloaded and the numbers are fixed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torchvision's `pretrained=` deprecation; pnet_rand: no download
        ref = lpips_pkg.LPIPS(net="alex", pnet_rand=True, pretrained=True, verbose=False)
    rng = np.random.default_rng(7)
    state = ref.state_dict()
    for k, v in state.items():
        if k.startswith("net."):
            std = (2.0 / v[0].numel()) ** 0.5 if v.ndim == 4 else 0.05
            state[k] = torch.from_numpy(rng.normal(0.0, std, tuple(v.shape))).float()
    ref.load_state_dict(state)
    torch.save(ref.state_dict(), path)
    return ref


def test_lpips_rejects_a_foreign_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    lpips_pkg = pytest.importorskip("lpips")
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    assert metrics.lpips_available(path)
    img = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="not an LPIPS-AlexNet state_dict: missing lin0"):
        metrics.lpips(img, img, path)
    state = _lpips_reference(lpips_pkg, torch, path).state_dict()
    state["extra.weight"] = torch.zeros(1)                     # strict: a key LPIPS-AlexNet lacks is an error
    torch.save(state, path)
    with pytest.raises(ValueError, match="not an LPIPS-AlexNet state_dict: .*extra.weight"):
        metrics.lpips(img, img, path)


def test_lpips_matches_the_lpips_package(tmp_path, monkeypatch):
    lpips_pkg = pytest.importorskip("lpips")
    torch = pytest.importorskip("torch")

    def no_download(*args, **kwargs):
        raise AssertionError(f"LPIPS tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = tmp_path / "lpips_alex.pth"
    ref = _lpips_reference(lpips_pkg, torch, path)
    rng = np.random.default_rng(6)
    a = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int64) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    x, y = (torch.from_numpy(v).permute(2, 0, 1)[None].float() / 127.5 - 1.0 for v in (a, b))
    with torch.no_grad():
        expected = float(ref(x, y, normalize=False))              # lpips' own forward on [-1,1] inputs
    ours = metrics.lpips(a, b, path)                               # uint8 in, weights from the file
    assert ours == pytest.approx(expected, rel=1e-6)
    # 0.0054467277: the hand-built AlexNet this package replaced (issue 9), same file and images
    assert ours == pytest.approx(0.0054467277, rel=1e-5)
    assert metrics.lpips(a, a, path) == 0.0
    assert not (tmp_path / "torch_home").exists()                 # nothing fetched into the torch hub cache

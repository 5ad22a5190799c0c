"""SAM-Noise and the pixel-wise schedule (METHOD.md §B): variance 1/C, whole-image standardisation,
hand-computed W, κ', η' on overlapping masks, the clamp."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from samsr.config import ResShiftConfig
from samsr.diffusion import samnoise as sn
from samsr.diffusion.resshift import ResShiftScheduler, eta_schedule


def overlapping_masks() -> tuple[torch.Tensor, np.ndarray]:
    """Three hard masks on 8x8 and their coverage counted by hand: C in {1, 2, 3}, some background."""
    m = np.zeros((3, 8, 8), dtype=bool)
    m[0, :5, :] = True          # top rows
    m[1, :, :5] = True          # left columns
    m[2, 1:3, 1:3] = True       # inside both
    count = m.sum(0)
    cover = count + (count == 0)
    return torch.from_numpy(m).float(), cover.astype(np.float64)


def test_hard_masks_have_per_pixel_variance_one_over_c():
    masks, cover = overlapping_masks()
    assert sorted(np.unique(cover)) == [1, 2, 3]
    draws = 12_000                      # channels of one call = independent draws per pixel
    eps = sn.sam_noise_from_masks(masks, torch.Generator().manual_seed(0), channels=draws)
    var = eps.var(dim=0).double().numpy()
    # relative standard error of a variance estimate: √(2/n) = 1.3%; 5σ per pixel (64 pixels)
    assert np.allclose(var, 1 / cover, rtol=5 * math.sqrt(2 / draws))
    for c in (1, 2, 3):     # pooled over each class: tighter
        pooled = var[cover == c].mean()
        assert abs(pooled * c - 1) < 5 * math.sqrt(2 / (draws * (cover == c).sum()))
    scale, c_map = sn.sam_noise_scale(masks)
    assert np.allclose(c_map.numpy(), cover)
    assert np.allclose(scale.numpy(), 1 / np.sqrt(cover), atol=1e-6)
    assert np.allclose(sn.hard_noise_scale(torch.from_numpy(cover)).numpy(), 1 / np.sqrt(cover), atol=1e-6)


def test_disjoint_masks_give_unit_variance():
    m = torch.zeros(3, 6, 6)
    m[0, :2], m[1, 2:4], m[2, 4:] = 1, 1, 1
    eps = sn.sam_noise_from_masks(m, torch.Generator().manual_seed(1), channels=8000)
    assert abs(float(eps.var(0).mean()) - 1) < 5 * math.sqrt(2 / (8000 * 36))
    assert torch.equal(sn.sam_noise_scale(m)[0], torch.ones(6, 6))


def test_soft_masks_scale_by_hand():
    m = torch.tensor([[[0.5, 1.0], [0.0, 0.0]],
                      [[0.5, 0.0], [0.25, 0.0]]])
    # M_0 = 1 − max_k M_k = [[0.5, 0], [0.75, 1]]; C = [[1.5, 1], [1, 1]]
    scale, cover = sn.sam_noise_scale(m)
    assert cover.tolist() == [[1.5, 1.0], [1.0, 1.0]]
    expected = [[math.sqrt(0.75) / 1.5, 1.0], [math.sqrt(0.0625 + 0.5625), 1.0]]
    assert np.allclose(scale.numpy(), expected, atol=1e-6)
    eps = sn.sam_noise_from_masks(m, torch.Generator().manual_seed(2), channels=20_000)
    assert np.allclose(eps.var(0).numpy(), np.square(expected), rtol=5 * math.sqrt(2 / 20_000))


def test_whole_image_stats_by_hand():
    cover = np.array([[1, 2], [4, 1]], dtype=np.uint8)
    cmax, rms = sn.whole_image_stats(cover)
    assert cmax == 4.0 and rms == pytest.approx(math.sqrt((1 + 0.5 + 0.25 + 1) / 4))
    bmax, brms = sn.image_stats(torch.from_numpy(cover).float()[None, None])
    assert bmax.tolist() == [4.0] and brms.tolist() == pytest.approx([rms])
    with pytest.raises(ValueError, match=">= 1"):
        sn.whole_image_stats(np.zeros((2, 2)))


def test_standardisation_is_per_whole_image_not_per_crop():
    g = torch.Generator().manual_seed(3)
    cover = torch.randint(1, 5, (1, 1, 32, 48), generator=g).float()
    noise = torch.randn((1, 3, 32, 48), generator=g)
    cmax, rms = sn.whole_image_stats(cover[0, 0].numpy())
    whole = sn.sam_noise(noise, sn.hard_noise_scale(cover), torch.tensor([rms]))
    crop = (slice(None), slice(None), slice(5, 21), slice(7, 31))
    cropped = sn.sam_noise(noise[crop], sn.hard_noise_scale(cover[crop]), torch.tensor([rms]))
    assert torch.equal(cropped, whole[crop])
    # and the whole-image field is standardised: zero mean, unit std (statistical, n = 4608)
    n = whole.numel()
    assert abs(float(whole.mean())) < 5 / math.sqrt(n)
    assert abs(float(whole.std()) - 1) < 5 / math.sqrt(2 * n)


def test_pixelwise_schedule_on_overlapping_masks_by_hand():
    # one row of 4 pixels: mask A covers pixels 0-1, mask B pixels 1-2, pixel 3 is background
    cover = torch.tensor([[[[1.0, 2.0, 1.0, 1.0]]]])
    w = sn.pixelwise_weight(cover, torch.tensor([2.0]), 5.0)
    # W = C / max C = [0.5, 1, 0.5, 0.5]; w = W / 5
    assert w.flatten().tolist() == pytest.approx([0.1, 0.2, 0.1, 0.1])
    c = ResShiftConfig()
    sched = ResShiftScheduler(eta_schedule(15, 2.0, c.power, c.etas_end, c.min_noise_level), 2.0).pixelwise(w)
    assert sched.kappa_at(cover).flatten().tolist() == pytest.approx([1.8, 1.6, 1.8, 1.8])
    s13 = 0.82995066                                    # √η_13 of the default schedule
    assert sched.sqrt_eta_at(13, cover).flatten().tolist() == pytest.approx(
        [1.1 * s13, 0.99, 1.1 * s13, 1.1 * s13], abs=1e-6)       # 1.2 · s13 = 0.9959 -> clamp 0.99
    assert sched.sqrt_eta_at(1, cover).flatten().tolist() == pytest.approx([0.022, 0.024, 0.022, 0.022], abs=1e-7)
    assert sched.sqrt_eta_at(15, cover).flatten().tolist() == pytest.approx([0.99] * 4)


def test_background_only_gives_point_eight_kappa_everywhere():
    cover = torch.ones(2, 1, 3, 5)
    cmax, _ = sn.image_stats(cover)
    w = sn.pixelwise_weight(cover, cmax, 5.0)
    assert torch.allclose(sn.pixelwise_kappa(2.0, w), torch.full_like(cover, 1.6))
    assert torch.allclose(sn.pixelwise_sqrt_eta(0.5, w), torch.full_like(cover, 0.6))


def test_pixelwise_eta_nondecreasing_and_clamped_everywhere():
    g = torch.Generator().manual_seed(4)
    cover = torch.randint(1, 9, (2, 1, 6, 6), generator=g).float()
    sched = ResShiftScheduler.from_config(ResShiftConfig()).pixelwise(
        sn.pixelwise_weight(cover, cover.flatten(1).amax(1), 5.0))
    etas = torch.stack([sched.sqrt_eta_at(t, cover) ** 2 for t in range(0, 16)])
    assert torch.all(etas[1:] >= etas[:-1])
    assert float(etas.max()) <= 0.99 ** 2 + 1e-7
    assert float((1 - etas).min()) >= 0.0199 - 1e-6

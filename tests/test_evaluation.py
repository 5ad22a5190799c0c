"""samsr.evaluation: the scores `samsr eval`, validation, the quickstart and the demo share."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.local.photos import bundled_photo
from samsr import config, evaluation
from samsr.data import lr_upsampled
from samsr.diffusion.samdiffsr import SamDiffSR
from samsr.diffusion.samsr import ResShiftTeacher
from samsr.ema import EMA


@pytest.fixture(scope="module")
def coffee_pair() -> tuple[np.ndarray, np.ndarray]:
    return evaluation.pair_from_hr(bundled_photo("coffee")[100:203, 200:330], 4)   # HR cropped to 100x128


def test_pair_from_hr_is_the_shard_jobs_pair(coffee_pair):
    from samsr import images

    hr, lr = coffee_pair
    assert hr.shape == (100, 128, 3) and lr.shape == (25, 32, 3)
    assert np.array_equal(lr, images.make_lr(hr, 4))


def test_bicubic_scores_of_a_fixed_pair(coffee_pair):
    hr, lr = coffee_pair
    scores = evaluation.score(lr_upsampled(lr, 4), hr, 4)
    assert scores == pytest.approx({"psnr_y": 30.653334877226307, "ssim_y": 0.870998200159887,
                                    "haarpsi": 0.8472287509686754, "gmsd": 0.08557143129096662}, abs=1e-9)


def test_an_untrained_teacher_scores_exactly_bicubic(coffee_pair):
    torch.manual_seed(0)
    teacher = ResShiftTeacher.from_config(config.load("samsr-teacher-tiny"))    # zero-initialised residual
    row = evaluation.evaluate_image(teacher, *coffee_pair, config.InferConfig(), samples=2, seed=3)
    for m in evaluation.METRICS:
        assert row[m] == row["bicubic_" + m] == row["mean_of_samples_" + m]
        assert row[m + "_sample_std"] == 0.0
    assert row["psnr_y"] == pytest.approx(30.653334877226307, abs=1e-9)


def test_mean_of_samples_is_named_apart_and_averages_noise_out(coffee_pair):
    torch.manual_seed(0)
    noisy = SamDiffSR.from_config(config.load("samdiffsr-tiny", ["samdiffsr.timesteps=4"]))   # random UNet
    hr, lr = evaluation.crop_pair(*coffee_pair, 48, 4)
    one = evaluation.evaluate_image(noisy, hr, lr, config.InferConfig(), samples=1, seed=0)
    assert "mean_of_samples_psnr_y" not in one and "psnr_y_sample_std" not in one
    four = evaluation.evaluate_image(noisy, hr, lr, config.InferConfig(), samples=4, seed=0)
    assert four["psnr_y_sample_std"] > 0
    assert four["mean_of_samples_psnr_y"] > four["psnr_y"] + 1.0        # averaging 4 samples removes noise
    again = evaluation.evaluate_image(noisy, hr, lr, config.InferConfig(), samples=4, seed=0)
    assert again == four                                                  # fixed seeds, same numbers


def test_check_and_crop_pairs(coffee_pair):
    hr, lr = coffee_pair
    with pytest.raises(ValueError, match=r"HR 128x96 is not LR 32x25 x4 \(expected HR 128x100\)"):
        evaluation.check_pair(hr[:96], lr, 4)
    hr_c, lr_c = evaluation.crop_pair(hr, lr, 64, 4)
    assert hr_c.shape == (64, 64, 3) and lr_c.shape == (16, 16, 3)
    assert np.array_equal(hr_c, hr[16:80, 32:96]) and np.array_equal(lr_c, lr[4:20, 8:24])
    assert evaluation.crop_pair(hr, lr, 0, 4)[0] is hr
    assert evaluation.crop_pair(hr, lr, 400, 4)[1].shape == lr.shape


def test_summary_deltas_and_table():
    rows = [{"psnr_y": 30.0, "bicubic_psnr_y": 29.0, "gmsd": 0.1, "bicubic_gmsd": 0.12, "key": "a"},
            {"psnr_y": 32.0, "bicubic_psnr_y": 32.0, "gmsd": 0.08, "bicubic_gmsd": 0.08, "key": "b"}]
    summary = evaluation.summarize(rows)
    assert summary["psnr_y"] == {"mean": 31.0, "std": 1.0, "n": 2}
    assert summary["delta_psnr_y"]["mean"] == pytest.approx(0.5)
    assert summary["delta_gmsd"]["mean"] == pytest.approx(-0.01)
    assert evaluation.flat_means(summary, "eval/set5/")["eval/set5/bicubic_psnr_y"] == 30.5
    table = evaluation.format_summary(summary)
    assert "psnr_y↑" in table and "gmsd↓" in table and "+0.5000" in table and "key" not in table


def test_ema_warms_up_and_averages_only_trained_parameters():
    live = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    live[1].requires_grad_(False)
    ema = EMA(live, decay=0.9)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live[1].weight.add_(1.0)
    ema.update(live)                             # first update: decay min(0.9, 2/11)
    assert torch.allclose(ema.module[0].weight, before + (1 - 2 / 11))
    assert not torch.equal(ema.module[1].weight, live[1].weight)           # frozen parts are not averaged
    assert all(not p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="train.ema_decay=0"):
        EMA(live, decay=1.0)

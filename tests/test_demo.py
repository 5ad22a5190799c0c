"""`samsr demo` end to end through the CLI: segment bundled photos, pretrain RRDB, train with EMA, sample,
score the held-out photos against bicubic with the evaluation code of `samsr eval`."""
import json

import pytest
import torch
from PIL import Image

from pipelines.cli import main
from pipelines.local.photos import HELD_OUT
from samsr.checkpoint import load_checkpoint

# Bicubic ×4, Y channel, 4 px border, central 128 px crops of the held-out photos: deterministic.
BICUBIC_PSNR_Y_128 = {"coffee": 28.879659751519632, "camera": 24.777711646851472, "moon": 40.53839578692107,
                      "grace_hopper": 26.440163602149205}


@pytest.mark.slow
def test_samdiffsr_demo_through_the_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    # the tiny preset, SAM prompted with 4x4 points, one torch thread and a 20-step sampler keep the test in the
    # suite's budget; the CPU recipe samples with T = 100
    rc = main(["demo", "--preset", "tiny", "--out", str(out), "--iterations", "40", "--seed", "3",
               "--samples", "2", "--eval-crop", "128", "--set", "train.rrdb_iterations=150",
               "--set", "train.log_every=50", "--set", "samdiffsr.timesteps=20", "--set", "train.num_threads=1",
               "--set", "segmenter.points_per_side=4"])
    assert rc == 0
    results = json.loads((out / "metrics.json").read_text())
    assert list(results["models"]) == ["RRDB", "SAM-DiffSR"] and results["samples"] == 2
    rrdb, diff = results["models"]["RRDB"], results["models"]["SAM-DiffSR"]
    for name in HELD_OUT:
        assert diff["rows"][name]["bicubic_psnr_y"] == pytest.approx(BICUBIC_PSNR_Y_128[name], abs=1e-9)
        assert 15.0 < diff["rows"][name]["psnr_y"] < 45.0            # a real image near bicubic, not noise
        assert "mean_of_samples_psnr_y" in diff["rows"][name] and "mean_of_samples_psnr_y" not in rrdb["rows"][name]
    # 150 L1 steps take the RRDB from noise (~12 dB after 30 steps) to a real upscaler
    assert rrdb["summary"]["psnr_y"]["mean"] > 22.0
    assert diff["summary"]["delta_psnr_y"]["mean"] == pytest.approx(
        diff["summary"]["psnr_y"]["mean"] - diff["summary"]["bicubic_psnr_y"]["mean"])
    with Image.open(out / "coffee.png") as sheet:
        assert sheet.size == (4 * 128, 128 + 18)                     # bicubic | RRDB | SAM-DiffSR | HR
    payload = load_checkpoint(str(out / "samdiffsr.pt"))            # the EMA weights, for samsr eval/upscale
    assert payload["config"].name == "samdiffsr-tiny" and torch.isfinite(
        payload["state"]["model"]["denoiser.conv_out.weight"]).all()
    printed = capsys.readouterr().out
    assert "segmenter: tiny-sam-random-seed0" in printed and "mean of 2 samples" in printed
    assert f"bicubic {BICUBIC_PSNR_Y_128['coffee']:7.2f}" in printed

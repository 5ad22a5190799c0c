"""`samsr demo` end to end through the CLI: segment bundled photos, pretrain RRDB, train, sample, score."""
import json

import pytest
from PIL import Image

from pipelines.cli import main

# Bicubic ×4 of scikit-image's coffee photo (600×400), Y channel, 4 px border: deterministic.
BICUBIC_PSNR_Y = 27.37962978559384
BICUBIC_SSIM_Y = 0.7668929891575462


@pytest.mark.slow
def test_samdiffsr_demo_through_the_cli(tmp_path, capsys, two_torch_threads):
    out = tmp_path / "demo"
    # a 20-step sampler keeps the test in CI's budget; the demo itself samples with T = 100
    rc = main(["demo", "--out", str(out), "--iterations", "40", "--seed", "3",
               "--set", "train.rrdb_iterations=150", "--set", "train.log_every=50",
               "--set", "samdiffsr.timesteps=20"])
    assert rc == 0
    results = json.loads((out / "metrics.json").read_text())
    assert list(results) == ["bicubic", "RRDB", "SAM-DiffSR"]
    assert results["bicubic"]["psnr_y"] == pytest.approx(BICUBIC_PSNR_Y, abs=1e-9)
    assert results["bicubic"]["ssim_y"] == pytest.approx(BICUBIC_SSIM_Y, abs=1e-9)
    # 150 L1 steps take the RRDB from noise (~12 dB after 30 steps) to a real upscaler
    assert results["RRDB"]["psnr_y"] > 22.0
    # the diffusion output is a real image near the bicubic one, not noise or a constant
    assert 15.0 < results["SAM-DiffSR"]["psnr_y"] < 40.0
    assert 0.0 < results["SAM-DiffSR"]["haarpsi"] <= 1.0
    with Image.open(out / "side_by_side.png") as sheet:
        assert sheet.size == (4 * 600, 400 + 18)
    printed = capsys.readouterr().out
    assert "segmenter: tiny-sam-random-seed0" in printed
    assert f"{BICUBIC_PSNR_Y:8.2f}" in printed

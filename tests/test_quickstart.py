"""`samsr quickstart` end to end in a fresh process, as a user runs it: local stack up (moto S3, MLflow,
token-auth Ray head), shard -> train (with validation) -> upscale -> eval on bundled photos, then
`samsr local down`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipelines import local
from pipelines.local import photos, quickstart
from samsr import config, images, metrics

BICUBIC_COFFEE_PSNR_Y_256 = 27.128934704400947    # bicubic x4 of coffee's central 256 px: deterministic
# The quickstart's preset made cheaper for the test, passed as a YAML file with `--preset` (what a user can
# do too): a 10-step sampler instead of 100 for validation, upscale and eval (the same code path, ~10x
# less sampling), SAM prompted with 4x4 points instead of 8x8, and no masks of y↑ (SAMSR's; SAM-DiffSR
# trains on the HR masks alone). `make quickstart` itself is unchanged.
TEST_PRESET = ["samdiffsr.timesteps=10", "segmenter.points_per_side=4", "shard.lrup_masks=false"]


@pytest.mark.slow
def test_quickstart_shards_trains_and_upscales_on_a_local_stack(tmp_path):
    import boto3
    from mlflow import MlflowClient

    work = tmp_path / "qs"
    preset = tmp_path / "quickstart-test.yaml"
    preset.write_text(config.dump_yaml(config.load(quickstart.PRESET, TEST_PRESET)))
    samsr = os.path.join(os.path.dirname(sys.executable), "samsr")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    proc = subprocess.run([samsr, "quickstart", "--workdir", str(work), "--keep", "--iterations", "20",
                           "--rrdb-iterations", "20", "--preset", str(preset)], env=env, capture_output=True,
                          text=True, timeout=900)
    stack = work / "stack"
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert local.status(stack) == {"s3": True, "mlflow": True, "ray": True}
        state = local.read_state(stack)
        results = json.loads((work / "metrics.json").read_text())
        assert set(results["photos"]) == {"coffee", "camera", "moon", "grace_hopper"} and results["samples"] == 2
        assert results["photos"]["coffee"]["bicubic_psnr_y"] == pytest.approx(BICUBIC_COFFEE_PSNR_Y_256, abs=1e-9)
        for name, row in results["photos"].items():       # a briefly trained model: a real image, not noise
            assert 15.0 < row["psnr_y"] < 45.0 and "mean_of_samples_psnr_y" in row, name
        assert "mean of 2 samples" in proc.stdout and "bicubic" in proc.stdout
        s3 = boto3.client("s3", endpoint_url=state["s3"], region_name="us-east-1",
                          aws_access_key_id=local.LOCAL_AWS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=local.LOCAL_AWS["AWS_SECRET_ACCESS_KEY"])
        for name in quickstart.UPSCALED:                  # whole photos upscaled x4 from their LR: real images
            hr = images.crop_to_multiple(photos.bundled_photo(name), 4)
            body = s3.get_object(Bucket=quickstart.BUCKET, Key=f"sr/{name}.png")["Body"].read()
            sr = images.decode_image(body, scale=1)
            assert sr.shape == hr.shape and 15.0 < metrics.psnr_y(sr, hr, 4) < 45.0, name
        client = MlflowClient(state["mlflow"])
        (run,) = client.search_runs([client.get_experiment_by_name("samsr-quickstart").experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["method"] == "samdiffsr"
        assert (run.data.params["samdiffsr.timesteps"], run.data.params["shard.lrup_masks"]) == ("10", "False")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "rrdb/rrdb_l1")][-1] == 20
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr_y")] == [20]
        assert run.data.metrics["eval/bundled-holdout/bicubic_psnr_y"] == pytest.approx(
            results["summary"]["bicubic_psnr_y"]["mean"])
        assert f"run {run.info.run_id}" in proc.stdout
        assert "token" not in json.dumps(state) and oct((stack / local.TOKEN).stat().st_mode & 0o777) == "0o600"
    finally:
        down = subprocess.run([samsr, "local", "down", "--dir", str(stack)], env=env, capture_output=True,
                              text=True, timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert local.status(stack) == {} and not any(local.pid_alive(pid) for pid in state["pids"].values())

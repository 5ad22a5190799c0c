"""GPUs mean what the settings say (issue 8, item 4): 0 is CPU; > 0 is asked of the cluster (so an
autoscaler adds GPU nodes) and waited for, never probed; a CPU-only cluster gives one clear line in
bounded time instead of a job that silently runs on CPU or hangs."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from pipelines.local.photos import bundled_photo
from pipelines.rayenv import ResourceUnavailable, require_gpus
from samsr import config
from samsr.checkpoint import save_checkpoint
from test_upscale_job import encoded, untrained_teacher

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_no_preset_asks_for_a_gpu_and_the_cluster_jobs_do():
    for name in config.presets():
        cfg = config.load(name)
        gpus = (cfg.shard.gpus_per_actor, cfg.upscale.gpus_per_actor, cfg.eval.gpus_per_actor, cfg.job.use_gpu)
        assert gpus == (0.0, 0.0, 0.0, False), name
    for job, key in [("shard", "shard.gpus_per_actor=1"), ("upscale", "upscale.gpus_per_actor=1"),
                     ("eval", "eval.gpus_per_actor=1"), ("train", "job.use_gpu=true")]:
        spec = yaml.safe_load((CLUSTER / "kuberay" / f"rayjob-{job}.yaml").read_text())["spec"]
        assert key in spec["entrypoint"], job


def test_zero_gpus_means_cpu_and_asks_for_nothing(ray_local):
    t0 = time.perf_counter()
    require_gpus("samsr upscale", 0.0, 8, "--gpus-per-actor 0", wait_s=600)
    assert time.perf_counter() - t0 < 60                   # no wait: waiting would take the 600 s


def test_gpus_asked_of_a_cpu_only_cluster_fail_after_the_wait(ray_local):
    t0 = time.perf_counter()
    with pytest.raises(ResourceUnavailable) as info:
        require_gpus("samsr upscale", 1.0, 2, "--gpus-per-actor 0", wait_s=1.5, poll_s=0.5)
    waited = time.perf_counter() - t0
    assert 1.5 <= waited < 60
    assert str(info.value) == (
        "samsr upscale asks for 2 GPU(s) (2 × 1) but the Ray cluster has 0 after 1.5 s of waiting (its autoscaler, "
        "if any, was asked for them): add a GPU worker group, raise the wait (gpu_wait_s), or pass "
        "--gpus-per-actor 0 to run on CPU")


def test_upscale_with_gpus_on_a_cpu_only_cluster_is_refused_in_one_line(ray_local, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encoded(bundled_photo("coffee")[:20, :24]))
    model, cfg = untrained_teacher()
    save_checkpoint(str(tmp_path / "model.pt"), {"model": model}, cfg)
    capsys.readouterr()
    rc = cli.main(["upscale", "--config", "samsr-teacher-tiny", "--model", str(tmp_path / "model.pt"),
                   "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--gpus-per-actor", "1",
                   "--set", "upscale.gpu_wait_s=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "asks for 1 GPU(s)" in err[0] and "--gpus-per-actor 0" in err[0]
    assert not (tmp_path / "out").exists()                     # nothing ran on CPU instead


@pytest.mark.parametrize("key, message", [
    ("shard.gpus_per_actor=-1", "shard.gpus_per_actor=-1.0 must be >= 0"),
    ("upscale.actors=0", "upscale.actors=0 must be >= 1"),
    ("eval.cpus_per_actor=0", "eval.cpus_per_actor=0.0 must be > 0"),
    ("job.gpu_wait_s=-5", "job.gpu_wait_s=-5.0 must be >= 0"),
    ("job.num_workers=0", "job.num_workers=0 must be >= 1"),
])
def test_impossible_resource_settings_are_rejected_by_name(key, message):
    with pytest.raises(config.ConfigError, match=message.replace(".", r"\.")):
        config.load("samsr-teacher-tiny", [key])

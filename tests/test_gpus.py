"""GPUs mean what the settings say (issue 8, item 4): 0 is CPU; > 0 is asked of the cluster (so an
autoscaler adds GPU nodes) and waited for, never probed, with a line every interval while waiting; free
GPUs count, not the cluster's total; a CPU-only cluster gives one clear line in bounded time, and a Ray
the job started itself (no autoscaler) gives it at once, instead of a job that silently runs on CPU or hangs."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from pipelines import cli, rayenv
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


@pytest.fixture
def autoscaler(monkeypatch):
    """The bundles each `request_resources` call asked for, in order (the call itself does nothing)."""
    calls = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources", lambda bundles=None, **_: calls.append(bundles))
    return calls


def gpus(monkeypatch, free: float, total: float) -> None:
    """The connected Ray reports `free` of `total` GPUs."""
    monkeypatch.setattr("ray.available_resources", lambda: {"CPU": 4.0, "GPU": free})
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 4.0, "GPU": total})


def test_zero_gpus_means_cpu_and_asks_for_nothing(ray_local, autoscaler):
    t0 = time.perf_counter()
    require_gpus("samsr upscale", 0.0, 8, "--gpus-per-actor 0", wait_s=600)
    assert time.perf_counter() - t0 < 60                   # no wait: waiting would take the 600 s
    assert autoscaler == []


def test_the_session_ray_is_one_this_process_started(ray_local):
    assert rayenv.started_own_ray()                        # tests/conftest.py: ray.init(num_cpus=4)


def test_gpus_asked_of_the_jobs_own_cpu_only_ray_fail_at_once(ray_local, autoscaler):
    lines = []
    t0 = time.perf_counter()
    with pytest.raises(ResourceUnavailable) as info:
        require_gpus("samsr upscale", 1.0, 2, "--gpus-per-actor 0", wait_s=600, echo=lines.append)
    assert time.perf_counter() - t0 < 60                   # no wait: waiting would take the 600 s
    assert str(info.value) == (
        "samsr upscale asks for 2 GPU(s) (2 × 1) but this job started its own local Ray, which has 0 free (0 in all) "
        "and no autoscaler to add them: point RAY_ADDRESS at a cluster with GPU workers, or pass --gpus-per-actor 0 "
        "to run on CPU")
    assert lines == [] and autoscaler == []                # nothing waited for, nothing asked


def test_gpus_asked_of_a_cpu_only_cluster_are_waited_for_with_a_line_each_interval(ray_local, autoscaler,
                                                                                    monkeypatch):
    monkeypatch.setattr(rayenv, "started_own_ray", lambda: False)    # as a driver joining a cluster
    lines = []
    t0 = time.perf_counter()
    with pytest.raises(ResourceUnavailable) as info:
        require_gpus("samsr upscale", 1.0, 2, "--gpus-per-actor 0", wait_s=1.2, poll_s=0.2, line_every_s=0.5,
                     echo=lines.append)
    waited = time.perf_counter() - t0
    assert 1.2 <= waited < 60
    assert str(info.value) == (
        "samsr upscale asks for 2 GPU(s) (2 × 1) but the Ray cluster has 0 free (0 in all) after 1.2 s of waiting "
        "(its autoscaler, if any, was asked for them): add a GPU worker group, raise the wait (gpu_wait_s), or pass "
        "--gpus-per-actor 0 to run on CPU")
    assert lines[0] == ("samsr upscale: waiting up to 1.2 s for 2 GPU(s) (2 × 1): 0 free, 0 in the cluster; "
                        "asked the autoscaler for 2 bundle(s) of {GPU: 1}")
    assert len(lines) >= 2 and all(line.startswith("samsr upscale: still waiting (") for line in lines[1:])
    assert all("for 2 GPU(s) (2 × 1): 0 free, 0 in the cluster" in line for line in lines)
    assert autoscaler == [[{"GPU": 1.0}] * 2, []]         # asked, then withdrawn


@pytest.mark.parametrize("own", [False, True])
def test_free_gpus_are_counted_not_the_clusters_total(autoscaler, monkeypatch, own):
    gpus(monkeypatch, free=0.0, total=2.0)                 # two GPUs, both held by other work
    monkeypatch.setattr(rayenv, "started_own_ray", lambda: own)
    lines = []
    t0 = time.perf_counter()
    with pytest.raises(ResourceUnavailable, match=r"asks for 2 GPU\(s\) \(2 × 1\) but .* 0 free \(2 in all\)"):
        require_gpus("samsr eval", 1.0, 2, "--gpus-per-actor 0", wait_s=600 if own else 1.2, poll_s=0.2,
                     line_every_s=0.5, echo=lines.append)
    waited = time.perf_counter() - t0
    if own:                                                # at once, though the wait is 600 s
        assert waited < 60 and lines == [] and autoscaler == []
    else:
        assert 1.2 <= waited < 60
        assert lines and all("0 free, 2 in the cluster" in line for line in lines)
        assert autoscaler == [[{"GPU": 1.0}] * 2, []]


def test_enough_free_gpus_return_at_once_asking_nothing(autoscaler, monkeypatch):
    gpus(monkeypatch, free=2.0, total=4.0)
    monkeypatch.setattr(rayenv, "started_own_ray", lambda: False)
    lines = []
    t0 = time.perf_counter()
    require_gpus("samsr eval", 0.5, 4, "--gpus-per-actor 0", wait_s=600, echo=lines.append)
    assert time.perf_counter() - t0 < 60 and lines == [] and autoscaler == []


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
    assert "this job started its own local Ray, which has 0 free (0 in all)" in err[0]     # refused, not waited
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

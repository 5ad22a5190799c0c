"""Every job on a multi-node cluster (tests/conftest.py `ray_cluster`: Ray's own harness, a 0-CPU head and
two worker nodes on 127.0.0.1, each its own raylet and object store), run as a user's driver process with
RAY_ADDRESS set: local paths refused in seconds with nothing written, accepted with --shared-fs after the
check on every node (pipelines/nodes.py), and a worker node killed mid-job survived."""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines import nodes
from pipelines.local.photos import bundled_photo
from samsr import config, images, locations, records, storage
from samsr.shards.process import write_shards_in_process
from samsr.structure.segmenters import build_segmenter
from test_eval_job import png, untrained_teacher_checkpoint
from test_shard_job import BAD, BEFORE_THE_MOVE, GOOD, S3_INPUT, SUPERPIXEL, digests
from test_train_job import PHOTOS, photo_png
from test_upscale_job import bicubic


def job(module: str, preset: str, *sets: str) -> list[str]:
    argv = [sys.executable, "-m", f"pipelines.{module}", "--config", preset]
    for s in sets:
        argv += ["--set", s]
    return argv


def finish(proc, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


class Driver:
    """A job's driver process on the cluster, its output collected line by line as it comes."""

    def __init__(self, cluster, argv: list[str]) -> None:
        self.proc = cluster.start(argv)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_until(self, what: str, done, timeout: float = 300) -> None:
        """Poll `done()` until true; fails if the driver ends first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not done():
            assert self.running(), f"the job ended before {what}:\n" + "".join(self.lines)[-4000:]
            assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s:\n" + "".join(self.lines)[-4000:]
            time.sleep(0.2)

    def result(self, timeout: float = 600) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return rc, "".join(self.lines)


@pytest.fixture
def cluster(ray_cluster):
    """The session's multi-node cluster with both worker nodes (a test before may have killed one)."""
    ray_cluster.ensure_workers(2)
    return ray_cluster


def test_local_paths_are_told_apart_from_remote_ones():
    assert [nodes.local_path(v) for v in ("s3://b/x", "runs:/1/model", "models:/m@a", "http://h:5000", "")] == [""] * 5
    assert nodes.local_path("./shards") == "./shards" and nodes.local_path("/data/m.pt") == "/data/m.pt"
    assert nodes.local_path("sqlite:////srv/mlflow.db") == "/srv/mlflow.db"
    assert nodes.local_path("sqlite:///mlflow.db") == "mlflow.db" and nodes.local_path("file:///srv/mlruns") == "/srv/mlruns"


@pytest.mark.slow
def test_a_local_output_is_refused_in_seconds_and_accepted_with_shared_fs(cluster, tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("rgb.png", "photo.jpg", "odd_size.png"):
        (tmp_path / "in" / name).write_bytes(GOOD[name])
    out = tmp_path / "out"
    sets = [*SUPERPIXEL, f"shard.input={tmp_path / 'in'}", f"shard.output={out}", "shard.samples_per_shard=2",
            "shard.cpus_per_actor=1"]
    t0 = time.monotonic()
    rc, printed = finish(cluster.start(job("shard", "samdiffsr", *sets)))
    lines = [line for line in printed.splitlines() if line.startswith("python -m pipelines.shard")]
    assert rc == locations.EXIT_USAGE and len(lines) == 1, printed[-3000:]
    assert "the Ray cluster has 3 nodes" in lines[0] and "s3://" in lines[0] and "--shared-fs" in lines[0]
    assert time.monotonic() - t0 < 60 and not out.exists()                   # refused before any work
    # said to be shared (all nodes here are on one machine): checked on every node, then the job runs
    rc, printed = finish(cluster.start(job("shard", "samdiffsr", *sets, "shard.shared_fs=true")))
    assert rc == 0, printed[-3000:]
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    assert not list(Path(tmp_path).rglob(f"{nodes.MARKER}*"))                 # the markers are gone


def test_a_node_that_cannot_see_a_path_is_named(tmp_path):
    missing = nodes._look([str(tmp_path / "marker")], [str(tmp_path), str(tmp_path / "gone")])
    assert missing == {"markers": [str(tmp_path / "marker")], "paths": [str(tmp_path / "gone")]}


def upload_shard_input(s3) -> str:
    client = s3.client()
    s3.bucket("shard-fixture")
    for name, data in [*GOOD.items(), *((n, d) for n, (d, _) in BAD.items())]:
        client.put_object(Bucket="shard-fixture", Key=f"photos/{name}", Body=data)
    return S3_INPUT


def photo_crops(count: int, side: int) -> dict[str, np.ndarray]:
    """`count` different side x side crops of the bundled photos, keyed a/00.png, b/01.png, ..."""
    photos = [bundled_photo(name) for name in ("coffee", "chelsea", "astronaut")]
    crops = {}
    for i in range(count):
        img = photos[i % 3]
        y, x = 7 * i % (img.shape[0] - side), 11 * i % (img.shape[1] - side)
        crops[f"{'ab'[i % 2]}/{i:02d}.png"] = img[y:y + side, x:x + side]
    return crops


@pytest.mark.slow
@pytest.mark.nodeloss
def test_shard_upscale_and_eval_survive_a_lost_worker_node(cluster, s3):
    """Three jobs at once on the 2-worker cluster, as drivers with RAY_ADDRESS set; once each is at work a
    worker node is killed (no graceful shutdown). Each exits 0 with complete outputs: the shard tars
    byte-identical to tests/test_shard_job.py's undisturbed run, every upscaled image present and equal to
    its reference (an untrained SAMSR teacher returns bicubic exactly), every HR image scored."""
    bucket = s3.bucket("multinode")
    model = f"{bucket}/models/teacher.pt"
    untrained_teacher_checkpoint(model)
    lr, hr = photo_crops(12, 24), photo_crops(8, 64)
    for key, img in lr.items():
        storage.write_bytes(f"{bucket}/lr/{key}", png(img))
    for key, img in hr.items():
        storage.write_bytes(f"{bucket}/hr/{key}", png(img))
    shard_out = f"{bucket}/shards"
    shard = Driver(cluster, job("shard", "samdiffsr", *SUPERPIXEL, f"shard.input={upload_shard_input(s3)}",
                                f"shard.output={shard_out}", "shard.samples_per_shard=4", "shard.actors=2",
                                "shard.cpus_per_actor=0.5", "shard.batch_size=2"))
    up = Driver(cluster, job("upscale", "samsr-teacher-tiny", f"upscale.input={bucket}/lr", f"upscale.output={bucket}/sr",
                             f"upscale.model={model}", "upscale.actors=2", "upscale.cpus_per_actor=0.5"))
    ev = Driver(cluster, job("eval", "samsr-teacher-tiny", f"eval.hr={bucket}/hr", f"eval.model={model}",
                             f"eval.output={bucket}/eval", "eval.actors=2", "eval.cpus_per_actor=0.5"))
    for driver in (up, ev):                          # Ray Data has started its actor pool
        driver.wait_until("a dataset at work", lambda d=driver: "Starting execution of Dataset" in "".join(d.lines))
    shard.wait_until("a shard plan", lambda: storage.exists(f"{shard_out}/_plan.json"))
    at_kill = {"shards": len(storage.list_files(f"{shard_out}/_manifest")),
               "upscaled": len(storage.list_files(f"{bucket}/sr", (".png",))),
               "running": [d.running() for d in (shard, up, ev)]}
    cluster.kill_worker()
    results = {name: d.result() for name, d in (("shard", shard), ("upscale", up), ("eval", ev))}
    for name, (rc, printed) in results.items():
        assert rc == 0, f"{name}:\n{printed[-4000:]}"
    assert at_kill["running"] == [True] * 3 and at_kill["shards"] < 5 and at_kill["upscaled"] < len(lr), at_kill

    assert digests(shard_out) == BEFORE_THE_MOVE
    stats = json.loads(storage.read_bytes(f"{shard_out}/_stats.json"))
    assert (stats["ok"], stats["known_bad"], stats["shards_missing"]) == (12, 5, 0)

    manifest = records.read_latest(f"{bucket}/sr/_manifest", "input").to_pylist()
    assert sorted((m["input"], m["status"]) for m in manifest) == [(f"{bucket}/lr/{k}", "ok") for k in sorted(lr)]
    for key, img in lr.items():
        out = images.decode_image(storage.read_bytes(f"{bucket}/sr/{key}"), scale=1)
        assert np.array_equal(out, bicubic(png(img))), key

    rows = records.read_latest(f"{bucket}/eval/scores", "hr").to_pylist()
    assert sorted(r["key"] for r in rows if r["status"] == "ok") == sorted(hr)
    assert all(r["psnr_y"] == r["bicubic_psnr_y"] for r in rows)


@pytest.mark.slow
@pytest.mark.nodeloss
def test_two_worker_training_survives_a_lost_worker_node(cluster, s3, mlflow_server):
    """Default settings (job.max_failures 3), one rank per worker node (3 of 4 CPUs each); once the first
    checkpoint is on S3 a worker node is killed and a fresh one joins, as an autoscaler would replace it.
    Ray Train restarts the group from that checkpoint: exit 0, all iterations, one MLflow run (the driver's),
    FINISHED, each step logged once."""
    from mlflow import MlflowClient

    bucket = s3.bucket("multinode-train")
    cfg = config.load("samsr-teacher-tiny", ["segmenter.kind=superpixel"])
    write_shards_in_process([(f"{n}.png", photo_png(n)) for n in PHOTOS], f"{bucket}/shards", cfg,
                            build_segmenter(cfg.segmenter), per_shard=2)
    iterations = 24
    driver = Driver(cluster, job(
        "train", "samsr-teacher-tiny", f"job.shards={bucket}/shards", f"job.storage={bucket}/runs", "job.name=lost-node",
        "job.num_workers=2", "job.cpus_per_worker=3", "job.experiment=multinode-train", "job.sample_pool=2",
        "job.crops_per_sample=2", f"train.iterations={iterations}", "train.checkpoint_every=6", "train.log_every=1",
        "train.batch_size=2", "train.num_threads=1", "data.hr_crop=32", "job.val_images=0", "job.system_metrics_s=0"))
    driver.wait_until("a checkpoint", lambda: any(u.endswith("model.pt") for u in
                                                  storage.list_files(f"{bucket}/runs/lost-node")), timeout=420)
    cluster.kill_worker()
    cluster.ensure_workers(2)                        # the autoscaler's replacement
    rc, printed = driver.result(timeout=900)
    assert rc == 0, printed[-4000:]
    assert re.search(rf"samsr train: done at step {iterations}\b", printed), printed[-4000:]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("multinode-train").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, iterations + 1)), steps          # each step once, none lost
    assert "restart" in printed.lower() or "recover" in printed.lower(), printed[-4000:]

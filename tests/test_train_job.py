"""`samsr train` (pipelines/train.py): Ray Train with 2 DDP workers on shards, rank 0 logging to a real
MLflow server, checkpoints under Ray Train storage, and resume after a failure into the same MLflow run."""
from __future__ import annotations

import ast
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.local import services
from pipelines.local.photos import bundled_photo
from samsr import config, storage
from samsr.checkpoint import load_checkpoint
from samsr.shards import stream
from samsr.shards.process import write_shards_in_process
from samsr.structure.segmenters import build_segmenter

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo_png(name: str) -> bytes:
    """A 96x96 crop of a bundled photo as PNG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(bundled_photo(name)[:96, :96]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    cfg = config.load("samsr-teacher-tiny", ["segmenter.kind=superpixel"])
    write_shards_in_process([(f"{n}.png", photo_png(n)) for n in PHOTOS], str(folder), cfg,
                            build_segmenter(cfg.segmenter), per_shard=2)
    return folder


def test_stream_reads_shards_into_batches(shards):
    uris = stream.list_shards(str(shards))
    assert [Path(u).name for u in uris] == ["shard-00000.tar", "shard-00001.tar"]
    counts = stream.shard_counts(uris)                       # no manifests here: counted from the tars
    assert counts == {uris[0]: 2, uris[1]: 2}
    assert stream.usable_shards(counts) == counts
    it = stream.batches(uris, batch_size=3, hr_crop=32, scale=4, seed=0, pool=2, crops_per_sample=2)
    first = next(it)
    assert first["hr"].shape == (3, 3, 32, 32) and first["lr"].shape == (3, 3, 8, 8)
    assert first["cover"].min() >= 1 and first["spe"].shape == (3, 1, 32, 32)
    again = next(stream.batches(uris, batch_size=3, hr_crop=32, scale=4, seed=0, pool=2, crops_per_sample=2))
    assert torch.equal(first["hr"], again["hr"])            # same seed, same batches
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        stream.list_shards(str(shards / "nothing-here"))


def test_stream_errors_reach_the_training_loop(shards, tmp_path):
    from samsr.shards import format as fmt

    members = fmt.read_tar((shards / "shard-00000.tar").read_bytes())
    key = sorted(members)[0]
    cut = {k: v for k, v in members[key].items() if not k.startswith("lrup.")}
    (tmp_path / "shard-00000.tar").write_bytes(fmt.tar_bytes([(key, cut)]))
    ok = next(stream.batches([str(tmp_path / "shard-00000.tar")], batch_size=2, hr_crop=32, scale=4, seed=0, pool=1))
    assert torch.equal(ok["cover"], torch.ones_like(ok["cover"]))      # no lrup.*: C ≡ 1 for SAM-DiffSR
    with pytest.raises(ValueError, match="no lrup.. members"):        # raised in the prefetch thread
        next(stream.batches([str(tmp_path / "shard-00000.tar")], batch_size=2, hr_crop=32, scale=4, seed=0,
                            pool=1, need_cover=True))
    del cut["hr.seg.png"]
    (tmp_path / "shard-00001.tar").write_bytes(fmt.tar_bytes([(key, cut)]))
    with pytest.raises(ValueError, match=r"lacks \['hr.seg.png'\]"):
        next(stream.batches([str(tmp_path / "shard-00001.tar")], batch_size=2, hr_crop=32, scale=4, seed=0, pool=1))


def test_a_resumed_tracker_logs_no_step_twice(mlflow_server):
    from mlflow import MlflowClient

    from pipelines.tracking.runs import Tracker

    cfg = config.load("samsr-teacher-tiny", [f"job.tracking_uri={mlflow_server}", "job.experiment=tracker-resume"])
    first = Tracker(cfg, "resumed")
    for step in range(1, 5):                   # the checkpoint was at step 3, then the run died after step 4
        first.metrics(step, {"loss": float(step)})
    first.metrics(3, {"val/psnr_y": 20.0})
    first.finish(False)
    again = Tracker(cfg, "resumed", first.run_id)             # steps 4.. run again from the checkpoint
    for step in range(4, 7):
        again.metrics(step, {"loss": 10.0 + step})
    again.metrics(6, {"val/psnr_y": 21.0})
    again.finish(True)
    client = MlflowClient(mlflow_server)
    loss = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "loss"))
    assert loss == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0)]
    val = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "val/psnr_y"))
    assert val == [(3, 20.0), (6, 21.0)]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_checkpoint_folders_ray_train_does_not_list_are_removed(tmp_path):
    from pipelines import train

    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_orphan", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pt").write_bytes(b"x")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")      # Ray Train's own file stays
    removed = train.remove_orphan_checkpoints(None, str(tmp_path), [str(tmp_path / "checkpoint_a"),
                                                                    str(tmp_path / "checkpoint_b") + "/"])
    assert removed == [str(tmp_path / "checkpoint_orphan")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_a", "checkpoint_b",
                                                          "checkpoint_manager_snapshot.json", "other"]


@pytest.mark.slow
def test_two_workers_log_to_mlflow_and_a_submitted_rerun_resumes_the_same_run(ray_local, mlflow_server, shards,
                                                                               tmp_path, ray_head):
    """The first run (in-process Ray) fails after step 4; the same command, submitted with `ray job submit`
    to the session's token-auth head, resumes it from the step-3 checkpoint into the same MLflow run."""
    import sys

    from mlflow import MlflowClient

    from pipelines import train

    # userinfo in the tracking URI (our MLflow server has no auth and ignores it): the workers must use it,
    # and it must reach neither MLflow params, nor checkpoints, nor Ray's own files (its logs, exported
    # Train run state: Ray Train V2 exports the loop config)
    password = "pw-" + secrets.token_hex(8)
    with_user = mlflow_server.replace("://", f"://bob:{password}@", 1)
    sets = [f"job.shards={shards}", f"job.storage={tmp_path / 'runs'}", "job.name=resume-test",
            "job.num_workers=2", "job.experiment=train-job-test",
            "job.sample_pool=2", "job.crops_per_sample=2", "train.iterations=6", "train.checkpoint_every=3",
            "train.log_every=1", "train.batch_size=4", "train.num_threads=1", "data.hr_crop=32",
            "train.eval_every=3", "job.val_images=1", "job.val_crop=48", "job.register=train-job-teacher",
            "job.register_alias=smoke", "job.system_metrics_s=0.5"]
    # job.max_failures=0: the hook fails every attempt, so Ray Train's restarts would only repeat it
    cfg = config.load("samsr-teacher-tiny", [*sets, f"job.tracking_uri={with_user}", "job.max_failures=0"])
    with pytest.raises(Exception, match="fail_after_steps"):
        train.run(cfg, fail_after_steps=4)
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("train-job-test")
    (failed,) = client.search_runs([exp.experiment_id])
    assert failed.info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(failed.info.run_id, "loss")) == [1, 2, 3, 4]
    # a worker that outlived its killed driver would leave a checkpoint Ray Train does not know about
    run_dir = tmp_path / "runs" / "resume-test"
    (kept_before,) = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]     # not Ray's snapshot .json
    orphan = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    shutil.copytree(kept_before, orphan)

    # the same job again (same name + storage), as a `ray job submit` entrypoint: it resumes from step 3.
    # A command line is kept in Ray's job table, so this one names the server without userinfo.
    argv = [sys.executable, "-m", "pipelines.train", "--config", "samsr-teacher-tiny"]
    for s in [*sets, f"job.tracking_uri={mlflow_server}"]:
        argv += ["--set", s]
    proc = ray_head.head.submit(argv, timeout=400)       # tests/conftest.py: one token-auth head per session
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in printed, printed[-4000:]
    # token auth is on: the head's job API refuses a client with another token
    bad = subprocess.run([services.venv_script("ray"), "job", "list", "--address", ray_head.head.url],
                         env={**os.environ, **ray_head.head.client_env(), "RAY_AUTH_TOKEN": "0" * 64},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    done = re.search(r"samsr train: done at step (\d+); checkpoint (\S+); MLflow run (\w+)", printed)
    assert done, printed[-4000:]
    out = {"step": int(done[1]), "checkpoint": done[2], "mlflow_run_id": done[3],
           "removed": ast.literal_eval(re.search(r"checkpoint\(s\) left by a killed run: (\[.*\])", printed)[1])}
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [failed.info.run_id] and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert out["mlflow_run_id"] == run.info.run_id and out["step"] == 6
    assert run.data.params["job.num_workers"] == "2" and run.data.params["train.lr"] == "0.001"
    assert run.data.params["job.tracking_uri"] == mlflow_server.replace("://", "://***@", 1)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]           # step 4 ran again after the resume, logged once
    for key in run.data.metrics:                           # no metric holds a step twice
        logged = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(logged) == len(set(logged)), (key, logged)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "data/skipped_samples")
            if m.step == 6] == [(6, 0.0)]
    # only the checkpoints Ray Train kept are left: the one from before the failure and the last one
    assert [Path(p).name for p in out["removed"]] == [orphan.name] and not orphan.exists()
    left = sorted(load_checkpoint(str(p / "model.pt"))["extra"]["step"] for p in run_dir.glob("checkpoint_*")
                  if p.is_dir())
    assert left == [3, 6] and (kept_before / "model.pt").exists()
    # validation on the held-out shard sample (EMA weights, fixed seed) at steps 3 and 6, bicubic beside it
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/psnr_y")}
    bicubic = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/bicubic_psnr_y")}
    assert sorted(val) == sorted(bicubic) == [3, 6]
    assert len(set(bicubic.values())) == 1 and 15.0 < bicubic[3] < 45.0
    # 6 tiny steps from a zero-initialised residual stay near bicubic (seen: 0.3-1.6 dB; the two ranks' data
    # order varies), where a diverged model is far off
    assert abs(val[6] - bicubic[6]) < 3.0
    delta = client.get_metric_history(run.info.run_id, "val/delta_psnr_y")
    assert [m.value for m in delta if m.step == 6] == [pytest.approx(val[6] - bicubic[6])]
    assert {"val/ssim_y", "val/haarpsi", "val/bicubic_haarpsi"} <= set(run.data.metrics)
    spread = client.get_metric_history(run.info.run_id, "replica_param_spread")   # DDP kept replicas equal
    assert sorted((m.step, m.value) for m in spread) == [(3, 0.0), (6, 0.0)]
    # sample grids as step images (the UI's slider): one per checkpoint, before and after the resume
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in grids) == [3, 6], grids
    assert all(p.startswith("images/samples+step+") for p in grids)
    # MLflow's system metrics from rank 0's node, continued after the resume
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0.0 <= m.value <= 100.0 for m in cpu)
    assert len({m.step for m in cpu}) == len(cpu)
    # the final model, registered: version 1 of train-job-teacher, alias smoke
    version = client.get_model_version_by_alias("train-job-teacher", "smoke")
    assert (version.version, version.run_id) == ("1", run.info.run_id)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]

    payload = load_checkpoint(out["checkpoint"])
    assert payload["config"].method == "samsr-teacher" and payload["extra"]["step"] == 6
    assert payload["extra"]["mlflow_run_id"] == run.info.run_id
    out_weight = payload["state"]["model"]["net.unet.conv_out.weight"]
    assert float(out_weight.abs().sum()) > 0                 # trained away from its zero init
    assert np.isfinite(float(out_weight.sum()))

    # the MLflow model: our loader, weights-only, same weights; and the pyfunc predicts SR images
    import mlflow.pyfunc

    from pipelines.tracking.model import load_method
    method, mcfg = load_method(f"runs:/{run.info.run_id}/model", tracking_uri=mlflow_server)
    assert mcfg.method == "samsr-teacher"
    assert torch.equal(method.state_dict()["net.unet.conv_out.weight"], out_weight)
    lr = bundled_photo("coffee")[:24, :20]
    mlflow.set_tracking_uri(mlflow_server)
    try:
        (sr,) = mlflow.pyfunc.load_model("models:/train-job-teacher@smoke").predict(lr[None], params={"seed": 0})
        model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model"))
    finally:
        mlflow.set_tracking_uri(None)
    assert sr.shape == (96, 80, 3) and sr.dtype == np.uint8
    assert not list(model_dir.rglob("*.pkl"))                  # models from code: nothing pickled

    # `samsr eval --model runs:/…` adds eval/<set>/* and the per-image table to that same run
    from pipelines import eval as eval_job

    (tmp_path / "val").mkdir()
    for name in ("coffee", "camera"):
        (tmp_path / "val" / f"{name}.png").write_bytes(photo_png(name))
    result = eval_job.run(config.load("samsr-teacher-tiny", [
        f"eval.model=runs:/{run.info.run_id}/model", f"eval.hr={tmp_path / 'val'}", "eval.set_name=two-photos",
        f"eval.tracking_uri={mlflow_server}", "eval.cpus_per_actor=0.5"]))
    assert result["ok"] == 2 and result["mlflow_run_id"] == run.info.run_id
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval/two-photos/psnr_y"] == pytest.approx(result["summary"]["psnr_y"]["mean"])
    assert logged["eval/two-photos/bicubic_psnr_y"] == pytest.approx(result["summary"]["bicubic_psnr_y"]["mean"])
    assert logged["eval/two-photos/images"] == 2.0
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval/two-photos")] == ["eval/two-photos/scores.json"]

    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    leaks = [p for root in (session, tmp_path, Path(ray_head.head.temp_dir)) for p in root.rglob("*") if p.is_file()
             and password.encode() in p.read_bytes()]
    assert leaks == [], [line for p in leaks for line in p.read_text(errors="replace").splitlines() if password in line]


def test_orphan_checkpoints_on_s3_are_removed_and_kept_ones_stay(s3):
    """The S3 side of remove_orphan_checkpoints (Ray Train storage on s3://; SAM-DiffSR's two stages and
    their checkpoints on S3 are trained in tests/test_local_stack.py's README run)."""
    from pipelines import train

    bucket = s3.bucket("train-orphans")
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_2000-01-01_00-00-00.000000"):
        storage.write_bytes(f"{bucket}/runs/r/{name}/model.pt", b"x")
    storage.write_bytes(f"{bucket}/runs/r/checkpoint_manager_snapshot.json", b"{}")
    fs, path = storage.filesystem(f"{bucket}/runs/r")
    removed = train.remove_orphan_checkpoints(fs, path, [f"{path}/checkpoint_a", f"{path}/checkpoint_b/"])
    assert removed == [f"{path}/checkpoint_2000-01-01_00-00-00.000000"]
    assert sorted(storage.list_files(f"{bucket}/runs/r")) == [
        f"{bucket}/runs/r/checkpoint_a/model.pt", f"{bucket}/runs/r/checkpoint_b/model.pt",
        f"{bucket}/runs/r/checkpoint_manager_snapshot.json"]


def test_use_gpu_on_a_cpu_only_cluster_is_refused_before_training(ray_local, shards, tmp_path, capsys):
    from pipelines import train

    capsys.readouterr()
    rc = train.main(["--config", "samsr-teacher-tiny", "--set", f"job.shards={shards}", "--set",
                     f"job.storage={tmp_path / 'runs'}", "--set", "job.use_gpu=true", "--set", "job.num_workers=2",
                     "--set", "job.gpu_wait_s=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "samsr train asks for 2 GPU(s) (2 × 1)" in err[0] and "no --use-gpu" in err[0]
    assert "this job started its own local Ray" in err[0]
    assert not (tmp_path / "runs").exists()


def test_cli_flags_map_to_config_overrides_and_bad_splits_are_refused():
    from pipelines import cli, train, train_data
    from pipelines.tracking.client import redact_uri
    from pipelines.tracking.runs import run_params

    args = cli.build_parser().parse_args(
        ["train", "--config", "samsr-teacher-tiny", "--shards", "s3://b/shards", "--storage", "s3://b/runs",
         "--name", "r1", "--num-workers", "4", "--use-gpu", "--experiment", "e", "--tracking-uri", "http://h:5000",
         "--iterations", "9", "--val", "s3://b/val-hr", "--set", "train.batch_size=8"])
    cfg = config.load(args.config, cli.train_overrides(args))
    assert (cfg.job.shards, cfg.job.storage, cfg.job.name, cfg.job.num_workers) == ("s3://b/shards", "s3://b/runs", "r1", 4)
    assert (cfg.job.use_gpu, cfg.job.experiment, cfg.job.tracking_uri, cfg.train.iterations) == (True, "e", "http://h:5000", 9)
    assert cfg.job.val == "s3://b/val-hr"
    assert train_data.per_worker_batch(cfg) == 2
    with pytest.raises(config.ConfigError, match="train.batch_size=6 must split evenly over job.num_workers=4"):
        train_data.per_worker_batch(config.replace(cfg, train=config.replace(cfg.train, batch_size=6)))
    with pytest.raises(config.ConfigError, match="job.shards"):
        train.run(config.load("samsr-teacher-tiny"))
    assert redact_uri("https://alice:s3cret@mlflow.example:443/x") == "https://***@mlflow.example:443/x"
    secret = config.replace(cfg, job=config.replace(cfg.job, tracking_uri="http://u:pw@h:5000"))
    assert run_params(secret)["job.tracking_uri"] == "http://***@h:5000"
    assert [s for s, _ in train.stages(config.load("samdiffsr-tiny"))] == ["rrdb", "diffusion"]

"""`samsr eval` (pipelines/eval.py): Ray Data scoring of HR images on S3 (moto server) against bicubic,
bad inputs recorded, LR matched by key, per-image records in Parquet parts per run (samsr.records) and
the summary from the driver's running sums; clear up-front errors from the CLI."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import cli
from pipelines import eval as eval_job
from pipelines import eval_records
from pipelines.local.photos import bundled_photo
from samsr import config, evaluation, images, records, storage
from samsr.checkpoint import save_checkpoint
from samsr.data import lr_upsampled
from samsr.diffusion.samsr import ResShiftTeacher


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def untrained_teacher_checkpoint(uri: str) -> None:
    torch.manual_seed(0)
    cfg = config.load("samsr-teacher-tiny")
    save_checkpoint(uri, {"model": ResShiftTeacher.from_config(cfg)}, cfg)


def test_set_names_and_lr_matching(tmp_path):
    assert eval_job.set_name(config.EvalConfig(hr="s3://b/div2k/valid_hr/")) == "valid_hr"
    assert eval_job.set_name(config.EvalConfig(hr="x", set_name="Set 5!")) == "Set-5"
    (tmp_path / "hr" / "a").mkdir(parents=True)
    (tmp_path / "lr" / "a").mkdir(parents=True)
    for name in ("a/0801.png", "b.png", "c.png"):
        (tmp_path / "hr" / name).write_bytes(b"x")
    (tmp_path / "lr" / "a" / "0801x4.png").write_bytes(b"x")       # DIV2K's LR naming
    (tmp_path / "lr" / "b.jpg").write_bytes(b"x")                  # another suffix, same stem
    cfg = config.load("samdiffsr-tiny", [f"eval.hr={tmp_path / 'hr'}", f"eval.lr={tmp_path / 'lr'}"])
    items, failed = eval_job.plan(cfg)
    assert [(i["key"], i["lr"].split("/lr/")[1]) for i in items] == [("a/0801.png", "a/0801x4.png"), ("b.png", "b.jpg")]
    assert [(f["key"], f["reason"]) for f in failed] == [("c.png", "no_lr")]


def test_cli_refuses_lpips_without_weights_and_a_missing_model_in_seconds(tmp_path, capsys):
    import ray

    (tmp_path / "hr").mkdir()
    (tmp_path / "hr" / "a.png").write_bytes(png(bundled_photo("coffee")[:64, :64]))
    untrained_teacher_checkpoint(str(tmp_path / "model.pt"))
    t0 = time.perf_counter()
    rc = cli.main(["eval", "--model", str(tmp_path / "model.pt"), "--hr", str(tmp_path / "hr"),
                   "--lpips-weights", str(tmp_path / "lpips_alex.pth")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "LPIPS weights not found at" in err and "never computed with random weights" in err
    rc = cli.main(["eval", "--model", str(tmp_path / "nope.pt"), "--hr", str(tmp_path / "hr")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"looked at {tmp_path / 'nope.pt'}" in err
    assert time.perf_counter() - t0 < 60 and not ray.is_initialized()      # refused before any work


def test_exit_codes_count_recorded_bad_inputs_as_done():
    def code(*reasons: str) -> int:
        return eval_job.exit_code(eval_job.counts([{"status": "failed" if r else "ok", "reason": r} for r in reasons]))

    assert code("", "corrupt", "too_large", "unsafe_key", "no_lr", "size_mismatch") == 0
    assert code("", "read_error") == 1 and code("", "eval_error") == 1     # a usable image that was not scored
    assert code("corrupt") == 1 and code() == 1                            # nothing scored


def test_eval_refuses_an_output_among_its_inputs_and_missing_folders(tmp_path, capsys):
    def refused(argv: list[str], *where: str, entry=cli.main) -> None:
        t0 = time.perf_counter()
        rc, err = entry(argv), capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and all(w in err for w in where), (rc, err)
        assert time.perf_counter() - t0 < 60

    hr, lr = tmp_path / "hr", tmp_path / "lr"
    hr.mkdir()
    lr.mkdir()
    files = {hr / "a.png": png(bundled_photo("coffee")[:64, :64]), lr / "a.png": png(bundled_photo("coffee")[:16, :16])}
    for path, data in files.items():
        path.write_bytes(data)
    model = str(tmp_path / "model.pt")
    untrained_teacher_checkpoint(model)
    before = sorted(tmp_path.rglob("*"))
    base = ["eval", "--model", model, "--hr", str(hr)]
    refused(base + ["--output", str(hr)], "is the input")
    refused(base + ["--output", str(hr / "scores")], "inside the input", str(hr / "scores"))
    refused(base + ["--lr", str(lr), "--output", str(lr / "scores")], "inside the input", str(lr))
    refused(base + ["--output", str(tmp_path)], "inside the output")
    refused(["eval", "--model", model, "--hr", str(tmp_path / "hrr")], "does not exist", str(tmp_path / "hrr"))
    refused(base + ["--lr", str(tmp_path / "lrr")], "LR input", str(tmp_path / "lrr"))
    refused(["--set", f"eval.model={model}", "--set", f"eval.hr={hr}", "--set", f"eval.output={hr}/x"],
            "pipelines.eval", "inside the input", entry=eval_job.main)
    assert sorted(tmp_path.rglob("*")) == before and {p: p.read_bytes() for p in files} == files
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", "--model", model, "--hr", str(tmp_path / "empty")]) == 1     # nothing to score
    assert "no images under" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_s3_records_bad_inputs_and_matches_lr_by_key(ray_local, s3, mlflow_server, tmp_path):
    bucket = s3.bucket("eval-job")
    good = {"a.png": bundled_photo("coffee")[:70, :90], "sub/b.png": bundled_photo("chelsea")[:64, :64]}
    for key, img in good.items():
        storage.write_bytes(f"{bucket}/hr/{key}", png(img))
    storage.write_bytes(f"{bucket}/hr/bad.png", b"not an image at all")
    storage.write_bytes(f"{bucket}/hr/odd\\name.png", png(good["a.png"]))
    untrained_teacher_checkpoint(f"{bucket}/models/teacher.pt")
    job = config.load("samdiffsr-tiny", [f"eval.model={bucket}/models/teacher.pt", f"eval.hr={bucket}/hr",
                                         f"eval.output={bucket}/eval-out", "eval.samples=2",
                                         "eval.cpus_per_actor=0.5"])
    result = eval_job.run(job)
    assert (result["ok"], result["failed"], result["set"]) == (2, 2, "hr") and eval_job.exit_code(result) == 0
    assert set(result) == {"set", *records.COUNTS, "summary", "seconds", "images_per_s", "run", "records"}
    folder = f"{bucket}/eval-out/{eval_job.SCORES}"
    assert records.runs(folder) == [result["run"]] and result["records"] == f"{folder}/{result['run']}"
    rows = {r["key"] or r["hr"].rsplit("/", 1)[1]: r for r in records.read_latest(folder, "hr").to_pylist()}
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        "a.png": ("ok", ""), "sub/b.png": ("ok", ""), "bad.png": ("failed", "corrupt"),
        "odd\\name.png": ("failed", "unsafe_key")}
    for key, img in good.items():       # untrained teacher = bicubic, LR made as the shard job makes it
        hr, lr = evaluation.pair_from_hr(img, 4)
        want = evaluation.score(lr_upsampled(lr, 4), hr, 4)
        assert rows[key]["psnr_y"] == rows[key]["bicubic_psnr_y"] == pytest.approx(want["psnr_y"], abs=1e-9)
        assert rows[key]["mean_of_samples_haarpsi"] == pytest.approx(want["haarpsi"], abs=1e-9)
    summary = json.loads(storage.read_text(f"{bucket}/eval-out/summary.json"))
    assert summary["summary"]["delta_psnr_y"]["mean"] == 0.0 and summary["samples"] == 2
    # the driver's running sums give what summarising the records gives
    want = evaluation.summarize({k: v for k, v in r.items() if not k.startswith("t_") and v is not None}
                                for r in rows.values() if r["status"] == "ok")
    assert summary["summary"].keys() == want.keys() and summary["summary"]["psnr_y"]["n"] == 2
    for key, value in want.items():
        assert summary["summary"][key]["mean"] == pytest.approx(value["mean"], abs=1e-9), key
        assert summary["summary"][key]["std"] == pytest.approx(value["std"], abs=1e-9), key

    # given LR, matched by key; a pair whose sizes disagree is recorded, the rest goes on
    hr_img = images.crop_to_multiple(good["a.png"], 4)
    storage.write_bytes(f"{bucket}/pairs/hr/x.png", png(hr_img))
    storage.write_bytes(f"{bucket}/pairs/lr/xx4.png", png(images.make_lr(hr_img, 4)))
    storage.write_bytes(f"{bucket}/pairs/hr/y.png", png(hr_img))
    storage.write_bytes(f"{bucket}/pairs/lr/y.png", png(images.make_lr(hr_img, 4)[:-2]))
    # ... here without --output: the per-image parts go to the MLflow run (artifacts), with a capped table
    from mlflow import MlflowClient

    paired = eval_job.run(config.load("samdiffsr-tiny", [
        f"eval.model={bucket}/models/teacher.pt", f"eval.hr={bucket}/pairs/hr", f"eval.lr={bucket}/pairs/lr",
        "eval.cpus_per_actor=0.5", "eval.set_name=pairs", f"eval.tracking_uri={mlflow_server}"]))
    assert (paired["ok"], paired["failed"]) == (1, 1) and eval_job.exit_code(paired) == 0 and not paired["records"]
    client = MlflowClient(mlflow_server)
    logged = client.get_run(paired["mlflow_run_id"])
    assert logged.info.status == "FINISHED" and logged.data.metrics["eval/pairs/images"] == 1.0
    assert logged.data.metrics["eval/pairs/psnr_y"] == pytest.approx(rows["a.png"]["psnr_y"], abs=1e-9)
    artifacts = sorted(a.path for a in client.list_artifacts(paired["mlflow_run_id"], "eval"))
    assert artifacts == ["eval/pairs"] and [a.path for a in client.list_artifacts(
        paired["mlflow_run_id"], "eval/pairs")] == ["eval/pairs/scores.json"]
    local = client.download_artifacts(paired["mlflow_run_id"], f"{eval_records.ARTIFACTS}/pairs", str(tmp_path))
    assert records.runs(local) == [paired["run"]]
    reasons = {r["key"]: r["reason"] for r in records.read_latest(local, "hr").to_pylist()}
    assert reasons == {"x.png": "", "y.png": "size_mismatch"}
    assert paired["summary"]["psnr_y"]["mean"] == pytest.approx(rows["a.png"]["psnr_y"], abs=1e-9)

    # a rerun adds its own run's part and leaves the first run's as it was: here one whose LR folder holds
    # nothing, so every image is refused up front and the driver writes the part (no Ray Data)
    before = {uri: storage.read_bytes(uri) for uri in records.part_uris(folder)}
    again = eval_job.run(config.load("samdiffsr-tiny", [
        f"eval.model={bucket}/models/teacher.pt", f"eval.hr={bucket}/hr", f"eval.lr={bucket}/none",
        f"eval.output={bucket}/eval-out"]))
    assert (again["ok"], again["known_bad"], eval_job.exit_code(again)) == (0, 4, 1)
    assert records.runs(folder) == [result["run"], again["run"]]
    assert {uri: storage.read_bytes(uri) for uri in records.part_uris(folder, result["run"])} == before
    newest = {r["hr"].rsplit("/", 1)[1]: (r["run"], r["reason"]) for r in records.read_latest(folder, "hr").to_pylist()}
    assert newest == {"a.png": (again["run"], "no_lr"), "b.png": (again["run"], "no_lr"),
                      "bad.png": (again["run"], "no_lr"), "odd\\name.png": (again["run"], "unsafe_key")}
    table = eval_records.first_rows(eval_records.ScoreSink(result["run"], folder), limit=3)
    assert len(table) == 3 and {r["hr"] for r in table} <= {r["hr"] for r in rows.values()}

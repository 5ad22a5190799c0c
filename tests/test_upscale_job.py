"""`samsr upscale` (pipelines/upscale.py): Ray Data batch inference from an S3 prefix (moto server) into
another, keys mirrored, bad inputs recorded, existing outputs skipped; a model from a real MLflow server."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import upscale
from pipelines.photos import bundled_photo
from samsr import config, images, storage
from samsr.checkpoint import save_checkpoint
from samsr.diffusion.samsr import ResShiftTeacher, SamsrStudent


def encoded(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def bicubic(data: bytes) -> np.ndarray:
    lr = images.decode_image(data, scale=1)
    return images.to_uint8(images.upscale(images.to_tensor(lr)[None], 4))[0]


def untrained_teacher() -> tuple[ResShiftTeacher, config.Config]:
    torch.manual_seed(0)
    cfg = config.load("samsr-teacher-tiny")
    return ResShiftTeacher.from_config(cfg), cfg


def test_output_keys_mirror_inputs_and_model_overrides_are_limited():
    assert upscale.output_key("a/b.jpg") == "a/b.png" and upscale.output_key("c.PNG") == "c.png"
    upscale.check_model_overrides(["infer.tile=64", "segmenter.checkpoint=s3://b/sam.pth"])
    with pytest.raises(config.ConfigError, match="model override 'train.lr'"):
        upscale.check_model_overrides(["train.lr=1"])


@pytest.mark.slow
def test_s3_prefix_to_prefix_with_bad_inputs_skips_and_overwrite(ray_local, s3):
    bucket = s3.bucket("upscale-job")
    good = {"lr/a.png": encoded(bundled_photo("coffee")[:20, :24]),
            "lr/sub/b.jpg": encoded(bundled_photo("chelsea")[:16, :16], "JPEG")}
    bad = {"lr/bad.png": b"not an image at all", "lr/tiny.png": encoded(bundled_photo("coffee")[:4, :4]),
           "lr/odd\\name.png": good["lr/a.png"]}
    for key, data in {**good, **bad}.items():
        storage.write_bytes(f"{bucket}/{key}", data)
    model, cfg = untrained_teacher()
    save_checkpoint(f"{bucket}/models/teacher.pt", {"model": model}, cfg)
    job = config.load("samsr-teacher-tiny", [f"upscale.input={bucket}/lr", f"upscale.output={bucket}/sr",
                                             f"upscale.model={bucket}/models/teacher.pt", "upscale.actors=1",
                                             "upscale.cpus_per_actor=0.5"])
    stats = upscale.run(job)
    assert (stats["ok"], stats["skipped"], stats["failed"]) == (2, 0, 3)
    # an untrained teacher returns y↑ exactly, so each output is the bicubic x4 of its input
    for key, data in good.items():
        out = images.decode_image(storage.read_bytes(f"{bucket}/sr/{upscale.output_key(key[3:])}"), scale=1)
        assert np.array_equal(out, bicubic(data)), key
    manifest = [json.loads(line) for line in storage.read_text(f"{bucket}/sr/_manifest.jsonl").splitlines()]
    by_input = {m["input"].split("/lr/", 1)[1]: (m["status"], m["reason"]) for m in manifest}
    assert by_input == {"a.png": ("ok", ""), "sub/b.jpg": ("ok", ""), "bad.png": ("failed", "corrupt"),
                        "tiny.png": ("failed", "too_small"), "odd\\name.png": ("failed", "unsafe_key")}
    assert sorted(storage.list_files(f"{bucket}/sr", (".png",))) == [f"{bucket}/sr/a.png", f"{bucket}/sr/sub/b.png"]

    again = upscale.run(job)                                   # nothing to do: outputs exist
    assert (again["ok"], again["skipped"], again["failed"]) == (0, 2, 3)
    forced = upscale.run(config.replace(job, upscale=config.replace(job.upscale, overwrite=True)))
    assert (forced["ok"], forced["skipped"]) == (2, 0)


@pytest.mark.slow
def test_mlflow_model_of_a_samsr_student_runs_sam_in_the_actor(ray_local, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from pipelines.mlflow_model import log_model

    teacher, _ = untrained_teacher()
    scfg = config.load("samsr-student-tiny")                 # segmenter: the tiny random SAM
    student = SamsrStudent.from_teacher(teacher, scfg)
    save_checkpoint(str(tmp_path / "student.pt"), {"model": student}, scfg)
    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("upscale-job-test"))
    log_model(mlflow_server, run.info.run_id, str(tmp_path / "student.pt"))
    (tmp_path / "in" / "x").mkdir(parents=True)
    data = encoded(bundled_photo("astronaut")[:24, :24])
    (tmp_path / "in" / "x" / "p.png").write_bytes(data)
    job = config.load("samsr-student-tiny", [f"upscale.input={tmp_path / 'in'}", f"upscale.output={tmp_path / 'out'}",
                                             f"upscale.model=runs:/{run.info.run_id}/model",
                                             f"upscale.tracking_uri={mlflow_server}", "upscale.cpus_per_actor=0.5"])
    stats = upscale.run(job, ["infer.tile=8", "infer.overlap=2"])
    assert stats["ok"] == 1 and stats["failed"] == 0
    out = images.decode_image((tmp_path / "out" / "x" / "p.png").read_bytes(), scale=1)
    # untrained student: y↑ per tile, blended; the SAM pass ran (a student without it would fail)
    assert out.shape == (96, 96, 3)
    assert float(np.abs(out.astype(int) - bicubic(data).astype(int)).mean()) < 1.0

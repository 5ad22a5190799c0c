"""`samsr upscale` (pipelines/upscale.py): Ray Data batch inference from an S3 prefix (moto server) into
another, keys mirrored, bad inputs recorded, existing outputs skipped; a model from a real MLflow server;
up-front refusals (overlapping or missing locations, a missing model) in seconds; exit codes; size limit."""
from __future__ import annotations

import io
import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import cli, upscale
from pipelines.local.photos import bundled_photo
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


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and which holds (almost) no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def refused(capsys, argv: list[str], *where: str, entry=cli.main) -> str:
    """Run a command that must be refused before any work: exit 2, one line on stderr naming `where`, fast."""
    capsys.readouterr()                                       # only what this command writes
    t0 = time.perf_counter()
    rc = entry(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, (rc, err)
    assert all(w in err for w in where), (where, err)
    assert time.perf_counter() - t0 < 60, err
    return err


def test_output_keys_mirror_inputs_and_model_overrides_are_limited():
    assert upscale.output_key("a/b.jpg") == "a/b.png" and upscale.output_key("c.PNG") == "c.png"
    upscale.check_model_overrides(["infer.tile=64", "segmenter.checkpoint=s3://b/sam.pth"])
    with pytest.raises(config.ConfigError, match="model override 'train.lr'"):
        upscale.check_model_overrides(["train.lr=1"])


def test_oversize_inputs_are_refused_from_the_header_before_decoding(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header_only(3000, 3000))       # 9 Mpx LR: a 144 Mpx output at x4, over 120 Mpx
    row = {"input": str(huge), "output": "", "status": "", "reason": "", "message": ""}
    out = upscale.decode_row(row, max_pixels=120_000_000, scale=4)
    assert (out["status"], out["reason"]) == ("failed", "too_large")
    assert "output would be 12000x12000 = 144000000 px, over data.max_pixels=120000000" in out["message"]
    small = tmp_path / "small.png"
    small.write_bytes(encoded(bundled_photo("coffee")[:20, :24]))
    got = upscale.decode_row({**row, "input": str(small)}, max_pixels=20 * 24 * 16, scale=4)
    assert got["status"] == "" and (got["h"], got["w"]) == (20, 24) and len(got["lr_raw"]) == 20 * 24 * 3
    assert upscale.decode_row({**row, "input": str(small)}, max_pixels=20 * 24 * 16 - 1, scale=4)["reason"] == "too_large"
    # the decode task reserves memory for the largest LR the limit lets through, and follows it
    high, low = config.DataConfig(max_pixels=120_000_000), config.DataConfig(max_pixels=16_000_000)
    assert upscale.lr_pixel_limit(high) == 7_500_000 and upscale.lr_pixel_limit(low) == 1_000_000
    assert images.decode_memory(7_500_000) - images.decode_memory(4_000_000) == 3_500_000 * images.DECODE_BYTES_PER_PIXEL


def test_exit_codes_count_recorded_bad_inputs_as_done():
    def code(*rows: tuple[str, str]) -> int:
        return upscale.exit_code(upscale.summarize([{"input": f"i{k}", "status": s, "reason": r}
                                                    for k, (s, r) in enumerate(rows)], 1.0))

    # a rerun of a finished job: everything skipped, the known-bad inputs recorded again
    assert code(("skipped", "exists"), ("failed", "corrupt"), ("failed", "too_large"), ("failed", "unsafe_key"),
                ("failed", "output_collision")) == 0
    assert code(("ok", ""), ("failed", "too_small")) == 0
    for retry in ("upscale_error", "write_error", "read_error"):     # a good input that could not be done
        assert code(("ok", ""), ("skipped", "exists"), ("failed", retry)) == 1
    assert code(("failed", "corrupt")) == 1 and code() == 1          # nothing done


def test_cli_refuses_overlapping_folders_and_leaves_the_inputs_untouched(tmp_path, capsys):
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    files = {inp / "a.png": encoded(bundled_photo("coffee")[:20, :24]),
             inp / "sub" / "b.png": encoded(bundled_photo("chelsea")[:16, :16])}
    for path, data in files.items():
        path.write_bytes(data)
    model, cfg = untrained_teacher()
    save_checkpoint(str(tmp_path / "model.pt"), {"model": model}, cfg)
    before = sorted(tmp_path.rglob("*"))
    base = ["upscale", "--config", "samsr-teacher-tiny", "--model", str(tmp_path / "model.pt"), "--input", str(inp)]
    for out, word in [(inp, "is the input"), (inp / "sr", "inside the input"), (inp / "sub" / "..", "is the input"),
                      (tmp_path, "inside the output")]:
        refused(capsys, base + ["--output", str(out), "--overwrite"], word, str(out))
    refused(capsys, ["upscale", "--model", str(tmp_path / "model.pt"), "--input", str(tmp_path / "inn"),
                     "--output", str(tmp_path / "out")], "does not exist", str(tmp_path / "inn"))
    refused(capsys, base + ["--output", str(tmp_path / "out"), "--model", str(tmp_path / "modle.pt")],
            f"looked at {tmp_path / 'modle.pt'}")
    refused(capsys, base + ["--output", str(tmp_path / "out"), "--model", "runs:/0123456789abcdef/model",
                            "--tracking-uri", "http://127.0.0.1:9"], "MLflow server http://127.0.0.1:9 does not answer")
    refused(capsys, base + ["--output", str(tmp_path / "out"), "--tile", "-1"], "infer.tile=-1")
    refused(capsys, ["--set", "upscale.model=" + str(tmp_path / "model.pt"), "--set", f"upscale.input={inp}",
                     "--set", f"upscale.output={inp / 'sr'}"], "inside the input", entry=upscale.main)
    assert sorted(tmp_path.rglob("*")) == before                  # nothing written, no manifest, no outputs
    assert {path: path.read_bytes() for path in files} == files


def test_cli_refuses_overlapping_prefixes_missing_buckets_and_a_dead_endpoint(s3, tmp_path, capsys, monkeypatch):
    bucket = s3.bucket("upscale-refusals")
    inputs = {f"{bucket}/lr/a.png": encoded(bundled_photo("coffee")[:20, :24])}
    for uri, data in inputs.items():
        storage.write_bytes(uri, data)
    model, cfg = untrained_teacher()
    save_checkpoint(f"{bucket}/models/teacher.pt", {"model": model}, cfg)
    before = storage.list_files(bucket)
    base = ["upscale", "--config", "samsr-teacher-tiny", "--model", f"{bucket}/models/teacher.pt", "--overwrite"]
    for inp, out, word in [(f"{bucket}/lr", f"{bucket}/lr/", "is the input"), (f"{bucket}/lr", f"{bucket}/lr/sr",
                           "inside the input"), (f"{bucket}/lr/", bucket, "inside the output")]:
        refused(capsys, base + ["--input", inp, "--output", out], word, out)
    refused(capsys, base + ["--input", "s3://upscale-no-such-in/lr", "--output", f"{bucket}/sr"],
            "bucket 'upscale-no-such-in' does not exist", s3.url)
    refused(capsys, base + ["--input", f"{bucket}/lr", "--output", "s3://upscale-no-such-out/sr"],
            "bucket 'upscale-no-such-out' does not exist")
    refused(capsys, base + ["--input", f"{bucket}/lr", "--output", f"{bucket}/sr", "--model", f"{bucket}/models/nope.pt"],
            f"no model at '{bucket}/models/nope.pt'")
    assert storage.list_files(bucket) == before and storage.read_bytes(f"{bucket}/lr/a.png") == inputs[f"{bucket}/lr/a.png"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")    # nothing listens there
    refused(capsys, base + ["--input", f"{bucket}/lr", "--output", f"{bucket}/sr"], "cannot be reached", "127.0.0.1:9")


@pytest.mark.slow
def test_s3_prefix_to_prefix_with_bad_inputs_skips_and_overwrite(ray_local, s3):
    bucket = s3.bucket("upscale-job")
    good = {"lr/a.png": encoded(bundled_photo("coffee")[:20, :24]),
            "lr/sub/b.jpg": encoded(bundled_photo("chelsea")[:16, :16], "JPEG")}
    bad = {"lr/bad.png": b"not an image at all", "lr/tiny.png": encoded(bundled_photo("coffee")[:4, :4]),
           "lr/odd\\name.png": good["lr/a.png"], "lr/huge.png": png_header_only(3000, 3000)}
    for key, data in {**good, **bad}.items():
        storage.write_bytes(f"{bucket}/{key}", data)
    model, cfg = untrained_teacher()
    save_checkpoint(f"{bucket}/models/teacher.pt", {"model": model}, cfg)
    sets = [f"upscale.input={bucket}/lr", f"upscale.output={bucket}/sr", f"upscale.model={bucket}/models/teacher.pt",
            "upscale.actors=1", "upscale.cpus_per_actor=0.5"]
    job = config.load("samsr-teacher-tiny", sets)
    stats = upscale.run(job)
    assert (stats["ok"], stats["skipped"], stats["failed"], stats["known_bad"]) == (2, 0, 4, 4)
    assert upscale.exit_code(stats) == 0                       # every good input done, bad ones recorded
    # an untrained teacher returns y↑ exactly, so each output is the bicubic x4 of its input
    for key, data in good.items():
        out = images.decode_image(storage.read_bytes(f"{bucket}/sr/{upscale.output_key(key[3:])}"), scale=1)
        assert np.array_equal(out, bicubic(data)), key
    manifest = [json.loads(line) for line in storage.read_text(f"{bucket}/sr/_manifest.jsonl").splitlines()]
    by_input = {m["input"].split("/lr/", 1)[1]: (m["status"], m["reason"]) for m in manifest}
    assert by_input == {"a.png": ("ok", ""), "sub/b.jpg": ("ok", ""), "bad.png": ("failed", "corrupt"),
                        "tiny.png": ("failed", "too_small"), "odd\\name.png": ("failed", "unsafe_key"),
                        "huge.png": ("failed", "too_large")}
    assert sorted(storage.list_files(f"{bucket}/sr", (".png",))) == [f"{bucket}/sr/a.png", f"{bucket}/sr/sub/b.png"]

    # a finished job run again: nothing to write, the bad inputs recorded again, exit 0 (was 1) — here as
    # the `python -m pipelines.upscale` entrypoint that `ray job submit` and the RayJob run
    argv = ["--config", "samsr-teacher-tiny"] + [a for s in sets for a in ("--set", s)]
    assert upscale.main(argv) == 0
    again = [json.loads(line) for line in storage.read_text(f"{bucket}/sr/_manifest.jsonl").splitlines()]
    assert sorted(m["status"] for m in again) == ["failed"] * 4 + ["skipped"] * 2
    forced = upscale.run(config.replace(job, upscale=config.replace(job.upscale, overwrite=True)))
    assert (forced["ok"], forced["skipped"]) == (2, 0)


@pytest.mark.slow
def test_mlflow_model_of_a_samsr_student_runs_sam_in_the_actor(ray_local, mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    from pipelines.tracking.model import log_model

    teacher, _ = untrained_teacher()
    scfg = config.load("samsr-student-tiny")                 # segmenter: the tiny random SAM
    student = SamsrStudent.from_teacher(teacher, scfg)
    save_checkpoint(str(tmp_path / "student.pt"), {"model": student}, scfg)
    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("upscale-job-test"))
    assert log_model(mlflow_server, run.info.run_id, str(tmp_path / "student.pt"), scfg, "tiny-student", "champion") == 1
    (tmp_path / "in" / "x").mkdir(parents=True)
    data = encoded(bundled_photo("astronaut")[:24, :24])
    name = "p" * 246 + ".jpg"                                # 250 bytes: output written next to a short temp name
    (tmp_path / "in" / "x" / name).write_bytes(data)
    job = config.load("samsr-student-tiny", [f"upscale.input={tmp_path / 'in'}", f"upscale.output={tmp_path / 'out'}",
                                             "upscale.model=models:/tiny-student@champion",   # registry alias
                                             f"upscale.tracking_uri={mlflow_server}", "upscale.cpus_per_actor=0.5"])
    stats = upscale.run(job, ["infer.tile=8", "infer.overlap=2"])
    assert stats["ok"] == 1 and stats["failed"] == 0
    out = images.decode_image((tmp_path / "out" / "x" / ("p" * 246 + ".png")).read_bytes(), scale=1)
    # untrained student: y↑ per tile, blended; the SAM pass ran (a student without it would fail)
    assert out.shape == (96, 96, 3)
    assert float(np.abs(out.astype(int) - bicubic(data).astype(int)).mean()) < 1.0
    # a run id with a typo: refused on the driver in seconds, one line, before Ray Data starts
    refused(capsys, ["upscale", "--config", "samsr-student-tiny", "--model", f"runs:/{run.info.run_id[:-1]}x/model",
                     "--tracking-uri", mlflow_server, "--input", str(tmp_path / "in"), "--output",
                     str(tmp_path / "out2")], "no MLflow model", run.info.run_id[:-1])
    refused(capsys, ["upscale", "--config", "samsr-student-tiny", "--model", "models:/tiny-student@champoin",
                     "--tracking-uri", mlflow_server, "--input", str(tmp_path / "in"), "--output",
                     str(tmp_path / "out2")], "no MLflow model", "champoin")
    assert not (tmp_path / "out2").exists()

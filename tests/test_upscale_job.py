"""`samsr upscale` (pipelines/upscale.py): Ray Data batch inference from an S3 prefix (moto server) into
another, keys mirrored, bad inputs recorded in Parquet parts per run (samsr.records), existing outputs
skipped; a model from a real MLflow server; up-front refusals (overlapping or missing locations, a missing
model) in seconds; exit codes; size limit; the model actor's stage does model work only."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import cli, upscale
from pipelines import upscale_stages as stages
from pipelines.local.photos import bundled_photo
from samsr import config, images, records, storage
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
    args = cli.build_parser().parse_args(["upscale", "--model", "m.pt", "--input", "i", "--output", "o",
                                          "--min-actors", "2", "--max-actors", "8"])
    assert config.actor_pool(config.load("samsr-teacher-tiny", cli.upscale_overrides(args)).upscale) == (2, 8)


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
        tally = records.Tally(upscale.KNOWN_BAD).add_rows([{"input": f"i{k}", "status": s, "reason": r}
                                                           for k, (s, r) in enumerate(rows)])
        return upscale.exit_code(upscale.summarize(tally.as_dict(), 1.0))

    # a rerun of a finished job: everything skipped, the known-bad inputs recorded again
    assert code(("skipped", "exists"), ("failed", "corrupt"), ("failed", "too_large"), ("failed", "unsafe_key"),
                ("failed", "output_collision")) == 0
    assert code(("ok", ""), ("failed", "too_small")) == 0
    for retry in ("upscale_error", "write_error", "read_error"):     # a good input that could not be done
        assert code(("ok", ""), ("skipped", "exists"), ("failed", retry)) == 1
    assert code(("failed", "corrupt")) == 1 and code() == 1          # nothing done


def test_the_stages_in_one_process_model_work_only_in_the_actor(tmp_path):
    """decode -> UpscaleModel (SR pixels; writes nothing) -> encode_row (PNG, the output) -> write_records
    (one part; only counts come back), as Ray runs them, here without Ray."""
    model, cfg = untrained_teacher()
    save_checkpoint(str(tmp_path / "model.pt"), {"model": model}, cfg)
    data = encoded(bundled_photo("coffee")[:20, :24])
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    plan = [{"input": str(tmp_path / n), "output": str(tmp_path / "out" / n), "status": "", "reason": "", "message": ""}
            for n in ("a.png", "bad.png")]
    decoded = [stages.decode_row(row, max_pixels=10**6, scale=4) for row in plan]
    batch = {k: np.array([row[k] for row in decoded], dtype=object) for k in decoded[0]}   # as Ray Data batches
    actor = stages.UpscaleModel(str(tmp_path / "model.pt"), [], "", threads=1, max_pixels=10**6)
    out = actor(batch)
    assert not (tmp_path / "out").exists()                        # the actor wrote nothing
    assert out["status"] == ["", "failed"] and out["reason"] == ["", "corrupt"] and "lr_raw" not in out
    sr = np.frombuffer(out["sr_raw"][0], np.uint8).reshape(out["sr_h"][0], out["sr_w"][0], 3)
    assert np.array_equal(sr, bicubic(data)) and out["sr_raw"][1] == b""
    assert out["t_sr"][0] > 0 and out["t_actor"][0] >= out["t_sr"][0]
    written = [stages.encode_row({k: v[i] for k, v in out.items()}, level=1) for i in range(2)]
    assert [r["status"] for r in written] == ["ok", "failed"] and set(written[0]) == set(stages.RECORD_SCHEMA.names)
    assert np.array_equal(images.decode_image((tmp_path / "out" / "a.png").read_bytes(), scale=1), sr)
    counts = stages.write_records({k: np.array([r[k] for r in written], dtype=object) for k in written[0]},
                                  str(tmp_path / "records"), "run-1", upscale.KNOWN_BAD)
    assert counts == {"ok": [1], "skipped": [0], "failed": [1], "known_bad": [1], "failed_good": [0], "inputs": [2]}
    (part,) = records.part_uris(str(tmp_path / "records"))
    assert records.read_part(part).select(["input", "status", "reason"]).to_pylist() == [
        {"input": str(tmp_path / "a.png"), "status": "ok", "reason": ""},
        {"input": str(tmp_path / "bad.png"), "status": "failed", "reason": "corrupt"}]
    assert [upscale.rows_per_part(n) for n in (1, 2_000, 10**6, 10**7)] == [16, 20, 1000, 1000]


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
    # the driver got counts, never rows; the rows are one run's parts under _manifest/<run>/
    assert set(stats) == {*records.COUNTS, "seconds", "images_per_s", "run", "records"}
    assert all(isinstance(stats[k], int) for k in records.COUNTS) and stats["inputs"] == 6
    folder = f"{bucket}/sr/{upscale.MANIFEST}"
    assert stats["records"] == folder and records.runs(folder) == [stats["run"]]
    first = records.read_parts(folder)
    by_input = {m["input"].split("/lr/", 1)[1]: (m["status"], m["reason"]) for m in first.to_pylist()}
    assert by_input == {"a.png": ("ok", ""), "sub/b.jpg": ("ok", ""), "bad.png": ("failed", "corrupt"),
                        "tiny.png": ("failed", "too_small"), "odd\\name.png": ("failed", "unsafe_key"),
                        "huge.png": ("failed", "too_large")}
    ok = [m for m in first.to_pylist() if m["status"] == "ok"]
    assert all(m["output"] == f"{bucket}/sr/{upscale.output_key(m['input'].split('/lr/', 1)[1])}" for m in ok)
    assert all(m["t_sr"] > 0 and m["t_actor"] >= m["t_sr"] and m["t_encode"] > 0 for m in ok)
    assert sorted(storage.list_files(f"{bucket}/sr", (".png",))) == [f"{bucket}/sr/a.png", f"{bucket}/sr/sub/b.png"]
    assert storage.list_files(f"{bucket}/sr/{upscale.WORK}") == []     # the run's work spool is removed
    parts = {uri: storage.read_bytes(uri) for uri in records.part_uris(folder)}

    # a finished job run again: nothing to write, the bad inputs recorded again, exit 0 (was 1) — here as
    # the `python -m pipelines.upscale` entrypoint that `ray job submit` and the RayJob run. It adds its own
    # run's part; the first run's parts stay as they were
    argv = ["--config", "samsr-teacher-tiny"] + [a for s in sets for a in ("--set", s)]
    assert upscale.main(argv) == 0
    first_run, second_run = records.runs(folder)
    assert first_run == stats["run"] and second_run > first_run
    assert {uri: storage.read_bytes(uri) for uri in records.part_uris(folder, first_run)} == parts
    again = records.read_parts(folder, runs=[second_run]).to_pylist()
    assert sorted((m["status"], m["reason"]) for m in again) == [
        ("failed", "corrupt"), ("failed", "too_large"), ("failed", "too_small"), ("failed", "unsafe_key"),
        ("skipped", "exists"), ("skipped", "exists")]
    latest = records.read_latest(folder, "input")             # each input's newest record: the rerun's
    assert latest.num_rows == 6 and set(latest.column("run").to_pylist()) == {second_run}
    # --overwrite redoes them, here with a pool that may grow to two actors (Ray Data's autoscaling pool)
    forced = upscale.run(config.replace(job, upscale=config.replace(job.upscale, overwrite=True, max_actors=2)))
    assert (forced["ok"], forced["skipped"], forced["known_bad"]) == (2, 0, 4) and len(records.runs(folder)) == 3
    statuses = {m["input"].rsplit("/", 1)[1]: m["status"] for m in records.read_latest(folder, "input").to_pylist()}
    assert statuses["a.png"] == statuses["b.jpg"] == "ok"


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

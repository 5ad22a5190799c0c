"""The shard job on inputs a stranger's bucket holds (issue 11): images SAM finds no mask in, long
non-ASCII paths, damaged shards on resume, exit codes, refusals before any work, the decode memory
that follows the pixel limit. The job's own stages run in this process (the same functions Ray maps),
so no Ray is needed here; test_shard_job.py runs them on Ray."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from pipelines import cli
from pipelines import shard as shard_job
from pipelines import shard_resume as resume
from pipelines import shard_stages as stages
from samsr import config, images, locations, storage
from samsr.shards import format as fmt
from test_images import encode, png_header_only

PHOTO = encode(skimage.data.astronaut()[100:196, 100:228], "PNG")
FLAT = encode(np.full((96, 128, 3), 128, np.uint8), "PNG")
CORRUPT = b"just some text, renamed to .png\n" * 4
# nested, spaces, non-ASCII; each folder within a file system's 255-byte name limit, ~700 bytes in all
LONG_DIR = "photos/2023/summer-vacation/italy/" + "/".join(["Çinque Terre – tramonto sul mare, ä ö ü ß " * 4] * 3)


def cfg_for(inp, out, *sets: str, preset: str = "samdiffsr"):
    return config.load(preset, ["segmenter.kind=superpixel", "segmenter.superpixel_segments=8",
                                f"shard.input={inp}", f"shard.output={out}", "shard.samples_per_shard=1", *sets])


def shard_in_process(cfg) -> dict:
    """`shard_job.run` with its Ray tasks and actors replaced by the same stages called here, one shard at a time."""
    shard_job.check_job(cfg)
    cfg = shard_job._normalized(cfg)
    plan, new = shard_job.load_or_build_plan(cfg)
    totals = resume.Totals()
    why = resume.check_finished(cfg.shard.output, plan, totals, cfg.shard.verify)
    cfg_dict = config.to_dict(cfg)
    actor = stages.SegmentActor(cfg_dict)
    for sid in sorted(why):
        rows = [stages.decode_row({"uri": e.uri, "key": e.key, "shard": sid, "index": i}, cfg_dict)
                for i, e in enumerate(plan.shards[sid])]
        totals.add(sid, stages.write_shard(cfg.shard.output, sid, cfg.shard.preview, actor.segment(*rows))["tally"])
    return shard_job._write_totals(cfg, plan, totals, len(why), sum(len(plan.shards[i]) for i in why), 1.0,
                                   {"shards_rebuilt_this_run": resume.count_reasons(list(why.values())),
                                    "images_not_in_plan": len(new)})


def test_images_without_masks_and_long_paths_become_samples(tmp_path):
    inp = tmp_path / "in"
    (inp / LONG_DIR).mkdir(parents=True)
    (inp / LONG_DIR / "IMG_20230712_123456_HDR_edited_final.png").write_bytes(FLAT)
    (inp / "sky at night.png").write_bytes(PHOTO)
    # the tiny random SAM with SAM's default thresholds keeps no mask on any image: the structure is
    # all background (E ≡ 0, C ≡ 1), not a failure (was: 'no masks and no shape', segment_error)
    cfg = cfg_for(inp, tmp_path / "out", "segmenter.kind=tiny-sam", "segmenter.device=cpu",
                  "segmenter.points_per_side=4", "shard.samples_per_shard=2")
    stats = shard_in_process(cfg)
    assert (stats["ok"], stats["failed"], stats["no_masks"]) == (2, 0, {"hr": 2, "lrup": 2})
    assert resume.exit_code(stats) == 0
    tar = (tmp_path / "out" / "shard-00000.tar").read_bytes()
    samples = fmt.read_tar(tar, where="shard-00000.tar")
    assert len(samples) == 2
    for key, members in samples.items():
        d = fmt.decode_members(members, where=key)
        assert d["hr.masks.json"] == [] and d["lrup.masks.json"] == []
        assert not d["hr.seg.png"].any() and d["hr.spe.npy"].tolist() == [0.0]
        assert (d["lrup.cover.png"] == 1).all() and d["json"]["hr_masks"] == 0
    sources = sorted(fmt.decode_members({"json": m["json"]})["json"]["source"] for m in samples.values())
    assert sources[0].endswith("IMG_20230712_123456_HDR_edited_final.png") and "Çinque Terre" in sources[0]
    manifest = json.loads((tmp_path / "out" / "_manifest" / "shard-00000.json").read_bytes())
    assert [s["hr_masks"] for s in manifest["samples"]] == [0, 0]
    assert shard_in_process(cfg)["shards_written_this_run"] == 0                  # a rerun trusts it
    assert (tmp_path / "out" / "shard-00000.tar").read_bytes() == tar


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished superpixel run over 3 images, one shard each."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "in").mkdir()
    for i, data in enumerate((PHOTO, FLAT, encode(skimage.data.coffee()[:96, :96], "PNG"))):
        (root / "in" / f"img{i}.png").write_bytes(data)
    stats = shard_in_process(cfg_for(root / "in", root / "out"))
    assert (stats["ok"], stats["shards"]) == (3, 3)
    return root / "in", root / "out"


def test_resume_verifies_each_finished_shard_against_its_manifest(finished, tmp_path):
    inp, done = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    cfg = shard_job._normalized(cfg_for(inp, out))
    plan, _ = shard_job.load_or_build_plan(cfg)
    assert resume.check_finished(str(out), plan) == {}
    good = {i: (out / f"shard-0000{i}.tar").read_bytes() for i in range(3)}
    # trusted from the listing (size + mtime recorded at write), no byte read: a flip under a restored
    # mtime passes; --verify hashes every tar and finds it
    tar2, when = out / "shard-00002.tar", (out / "shard-00002.tar").stat().st_mtime_ns
    flipped = bytearray(good[2])
    flipped[700] ^= 1
    tar2.write_bytes(bytes(flipped))
    os.utime(tar2, ns=(when, when))
    assert resume.check_finished(str(out), plan) == {}
    assert resume.check_finished(str(out), plan, verify=True) == {2: "tar differs"}
    tar2.write_bytes(good[2])
    (out / "shard-00000.tar").unlink()
    (out / "shard-00001.tar").write_bytes(good[1][:-512])
    (out / "shard-00002.tar").write_bytes(bytes(flipped))        # a new mtime: not what its manifest recorded
    assert resume.check_finished(str(out), plan) == {0: "tar missing", 1: "tar truncated", 2: "tar differs"}
    stats = shard_in_process(cfg)
    assert stats["shards_rebuilt_this_run"] == {"tar differs": 1, "tar missing": 1, "tar truncated": 1}
    assert {i: (out / f"shard-0000{i}.tar").read_bytes() for i in range(3)} == good      # the same bytes again
    # a manifest that records a retryable failure (a good image the segmenter failed on) is rebuilt;
    # one that cannot be read is not trusted; one from before sha256 was recorded is checked by size
    m0, m1, m2 = (out / "_manifest" / f"shard-0000{i}.json" for i in range(3))
    doc = json.loads(m0.read_bytes())
    doc["samples"][0].update(status="failed", reason="segment_error", message="RuntimeError: CUDA error")
    m0.write_bytes(fmt.dumps(doc))
    m1.write_bytes(b"{not json")
    doc = json.loads(m2.read_bytes())
    del doc["tar_sha256"]
    m2.write_bytes(fmt.dumps(doc))
    assert resume.check_finished(str(out), plan) == {0: "retry segment_error", 1: "manifest unreadable"}


def test_exit_codes_follow_the_shared_policy():
    code = resume.exit_code
    assert code({"ok": 3, "known_bad": 2, "failed_good": 0}) == locations.EXIT_OK      # corrupt ones recorded
    assert code({"ok": 3, "known_bad": 0, "failed_good": 1}) == locations.EXIT_INCOMPLETE   # segment_error
    assert code({"ok": 0, "known_bad": 2, "failed_good": 0}) == locations.EXIT_INCOMPLETE   # nothing done
    assert set(resume.RETRY_REASONS).isdisjoint(resume.KNOWN_BAD) and "too_large" in resume.KNOWN_BAD


def test_entrypoint_exit_codes_and_new_images_on_rerun(finished, tmp_path, capsys):
    inp, out = finished

    def main(inp_, out_, *sets: str) -> int:
        argv = ["--set", "segmenter.kind=superpixel", "--set", "segmenter.superpixel_segments=8",
                "--set", f"shard.input={inp_}", "--set", f"shard.output={out_}", "--set", "shard.samples_per_shard=1"]
        for s in sets:
            argv += ["--set", s]
        return shard_job.main(argv)

    assert main(inp, out) == 0                                   # finished: every shard verified, no work
    # every image unusable: recorded, but nothing was done -> 1 (was 0); an image added since the plan
    # was made is counted and named, not silently left out
    bad_in = tmp_path / "bad"
    bad_in.mkdir()
    (bad_in / "a.png").write_bytes(CORRUPT)
    stats = shard_in_process(cfg_for(bad_in, tmp_path / "bad-out"))
    assert (stats["ok"], stats["known_bad"]) == (0, 1)
    (bad_in / "b.png").write_bytes(PHOTO)
    capsys.readouterr()
    assert main(bad_in, tmp_path / "bad-out") == 1
    said = capsys.readouterr().out
    assert "1 image(s) in the input are not in this output's plan" in said and "new --output" in said
    assert json.loads((tmp_path / "bad-out" / "_stats.json").read_bytes())["images_not_in_plan"] == 1
    # refused before any work: one line, exit 2, nothing written
    for inp_, out_, sets, why in (
            (tmp_path / "missing", tmp_path / "o1", (), "does not exist"),
            (inp, tmp_path / "o2", ("shard.samples_per_shard=0",), "samples_per_shard=0 must be >= 1"),
            (inp, inp / "shards", (), "is inside the input"),
            (inp, inp, (), "is the input"),
            (inp / "img0.png", inp, (), "input"),
            (inp, tmp_path / "o3", ("segmenter.kind=sam",), "needs a SAM checkpoint")):
        assert main(inp_, out_, *sets) == locations.EXIT_USAGE, why
        err = capsys.readouterr().err.strip()
        assert why in err and "\n" not in err and "Traceback" not in err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3")) and not (inp / "shards").exists()
    # an input that exists but holds no image: one line, exit 1, no _plan.json
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert cli.main(["shard", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o4"),
                     "--segmenter", "superpixel"]) == locations.EXIT_INCOMPLETE
    assert "no images under" in capsys.readouterr().err and not (tmp_path / "o4").exists()


def test_s3_locations_are_checked_up_front_in_seconds(s3, monkeypatch, capsys):
    inp = s3.bucket("hostile-in") + "/photos"
    s3.client().put_object(Bucket="hostile-in", Key="photos/a.png", Body=PHOTO)
    out = s3.bucket("hostile-out") + "/run"
    for args, why in ((["--input", "s3://no-such-bucket-x/p", "--output", out], "bucket 'no-such-bucket-x' does not exist"),
                      (["--input", inp, "--output", "s3://no-such-bucket-y/run"], "bucket 'no-such-bucket-y' does not exist"),
                      (["--input", inp, "--output", inp + "/shards/"], "is inside the input"),
                      (["--input", inp, "--output", s3.bucket("hostile-in")], "is inside the output"),
                      (["--input", inp, "--output", out, "--samples-per-shard", "0"], "samples_per_shard=0")):
        t0 = time.perf_counter()
        assert cli.main(["shard", *args, "--segmenter", "superpixel"]) == locations.EXIT_USAGE, why
        err = capsys.readouterr().err.strip()
        assert why in err and "\n" not in err and time.perf_counter() - t0 < 60
    assert not storage.list_files(out) and not storage.list_files(inp + "/shards")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")           # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(locations.LocationError, match="the S3 endpoint cannot be reached"):
        shard_job.run(cfg_for(inp, out))
    assert time.perf_counter() - t0 < 60


def test_decode_reservation_follows_the_pixel_limit_and_oversize_is_recorded(tmp_path):
    default = config.DataConfig().max_pixels
    assert images.decode_memory(default) >= images.DECODE_BYTES_PER_PIXEL * default >= 52 * default
    assert images.decode_memory(4 * default) - images.decode_memory(default) == \
        3 * default * images.DECODE_BYTES_PER_PIXEL
    assert images.decode_memory(1) == images.DECODE_MEMORY_MIN == 768 * 2**20
    assert images.decode_memory(default) < 4 * 2**30          # what a 16 GB worker can run a few of
    # an image over the limit is refused from its header (this one has no pixel data: a decode would
    # call it truncated) and recorded as too_large
    (tmp_path / "huge.png").write_bytes(png_header_only(8000, 7000))          # 56 Mpx
    cfg_dict = config.to_dict(cfg_for(tmp_path, tmp_path / "out"))
    row = stages.decode_row({"uri": str(tmp_path / "huge.png"), "key": "k", "shard": 0, "index": 0}, cfg_dict)
    assert (row["status"], row["reason"]) == ("failed", "too_large") and "56000000 px" in row["message"]
    assert row["reason"] in resume.KNOWN_BAD

"""The shard job (pipelines/shard.py) on real in-process Ray and a real moto S3 server: bad and odd inputs, the output byte for byte the driver-side writer's with only summaries
reaching the driver, read-back with webdataset and Ray Data, resume after a kill, byte-identical reruns,
the tiny random SAM in the actor pool, dry-run and the CLI mapping. (Jobs submitted with `ray job submit`
to a token-auth head: tests/test_train_job.py, tests/test_secrets.py, the README run in test_local_stack.)"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipelines import cli

from pipelines import shard as shard_job
from pipelines import shard_stages as stages
from samsr import config, images, storage
from samsr.data import prepare_sample
from samsr.shards import format as fmt
from samsr.structure.segmenters import SuperpixelSegmenter
from test_images import encode, png_header_only   # the bad-input builders of the decode tests

SEGMENTS = 12
SUPERPIXEL = ["segmenter.kind=superpixel", f"segmenter.superpixel_segments={SEGMENTS}"]


def exif_rotated(rgb: np.ndarray) -> bytes:
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6                        # rotate 90° CW on display
    return encode(img, "JPEG", quality=92, exif=exif.tobytes())


ASTRO, COFFEE, CAT = skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()
ITALY = "2023/summer-vacation/italy/IMG_20230712_123456_HDR_edited_final.png"
LONG_KEY = "2023/Ürlaub in Italien – " + "Çinque Terre, ä ö ü ß; " * 34 + "/IMG 0001 (final).png"
GOOD = {
    "rgb.png": encode(ASTRO[:96, :128], "PNG"),
    "photo.jpg": encode(COFFEE[100:196, 200:328], "JPEG", quality=90),
    "odd_size.png": encode(CAT[:97, :131], "PNG"),
    "cmyk.jpg": encode(Image.fromarray(ASTRO[200:296, 200:328]).convert("CMYK"), "JPEG", quality=92),
    "gray16.png": encode(Image.fromarray((CAT[:96, :112, 0].astype(np.uint16) * 257)), "PNG"),
    "alpha.png": encode(np.dstack([COFFEE[:96, :96], np.full((96, 96), 128, np.uint8)]), "PNG"),
    "palette.png": encode(Image.fromarray(CAT[100:196, 100:228]).convert("P"), "PNG"),
    "exif_rotated.jpg": exif_rotated(ASTRO[300:396, 100:164]),
    "sub/dir/nested.png": encode(COFFEE[200:296, 300:396], "PNG"),
    # keys a real bucket holds: long, nested, spaces and non-ASCII (up to S3's 1024 bytes), a flat image
    ITALY: encode(CAT[50:146, 50:178], "PNG"),
    LONG_KEY: encode(ASTRO[150:246, 150:246], "JPEG", quality=90),
    "flat grey.png": encode(np.full((96, 128, 3), 128, np.uint8), "PNG"),
}
_jpg = encode(ASTRO[:128, :160], "JPEG", quality=90)
BAD = {
    "truncated.jpg": (_jpg[: len(_jpg) // 2], "truncated"),
    "empty.png": (b"", "empty"),
    "text.png": (b"just some text, renamed to .png\n" * 4, "corrupt"),
    "bomb.png": (png_header_only(100_000, 100_000), "too_large"),
    "tiny.png": (encode(ASTRO[:20, :20], "PNG"), "too_small"),
}


def shard_cfg(inp: str, out: str, *extra: str, preset: str = "samdiffsr"):
    return config.load(preset, [*SUPERPIXEL, f"shard.input={inp}", f"shard.output={out}", "shard.samples_per_shard=4",
                                "shard.actors=2", "shard.cpus_per_actor=0.5", "shard.batch_size=2", *extra])


def read_shards(output: str) -> dict[str, bytes]:
    return {Path(u).name: storage.read_bytes(u) for u in storage.list_files(output, [".tar"])}


# The 17-image input (12 good, 5 bad) sharded once for every test that reads the output. Its place is fixed:
# the source URI is part of each sample's json, and the digests below were taken on it.
S3_INPUT = "s3://shard-fixture/photos"
# made by the driver-side writer (commit 22e74be, before shards were written in the workers): tars and
# previews as bytes, manifests without timings
BEFORE_THE_MOVE = {
    "shard-00000.tar": "96f8240f621661197e991421063cbfa25e089d17cfbac317fb97eff9870222a6",
    "shard-00001.tar": "d2949cbd67354ea5060aef4631b4918710498e09400e68e9c28afe96264af9f2",
    "shard-00002.tar": "ea320e2e45d016c49b4865f104b86e1abd30c54a931d52a723fa15fc47b9c358",
    "shard-00003.tar": "5a31fa1e14dcfbfa29ec12d89b5e4bd191371a14d720774b44c041b9ae529ba5",
    "shard-00004.tar": "84ff92691f909a05b224e1c56abb4864f01b4f8e3c854e4bb4c7baf1d3f6d652",
    "shard-00000.json": "94d43a9686b317623cd302795840d0fb310229c08305043b8db2eeb4db7f3195",
    "shard-00001.json": "5fd9338d8d3e2348bed81bcd99f971241df54db9e2cc81335131dcbffdf756a5",
    "shard-00002.json": "5a56e0e794baf46a99229a54d4ad618c1bf1176d81f0a353e637dcf88543853f",
    "shard-00003.json": "f8cad8f38715dbdd63cdaf9864c68856326a42d40aa3dabb8391a606a62eed09",
    "shard-00004.json": "7a13c165da43568f596a859ab99e7d8bd62b5fa6b259c7ce6b1f4e971c57c7b7",
    "shard-00000.jpg": "4ddd20eff33eac3805925eaf2c6cb2fe6823df90695c8d6131f332952479aed1",
    "shard-00001.jpg": "86e630c800d4968939df36b117c028f716695621fa57afabd70a8520acf50e50",
    "shard-00002.jpg": "41104e011994178795a452764454dc6865212607dc934eeac352c7fc7b4b2289",
    "shard-00003.jpg": "38fba13d50e4b512a2f16b7ff882f45aca24bd6e0566dc8e5880556cd2d9f682",
    "failures": "f0d98848705b1fc3f850a20cb44a2553bb7d6113bbba8e5420dee4fe12fc26db",
}


def digests(out: str) -> dict[str, str]:
    """sha256 of the tars, previews, manifests (timings removed) and failures.jsonl under `out`."""
    got = {Path(u).name: hashlib.sha256(storage.read_bytes(u)).hexdigest()
           for u in [*storage.list_files(out, [".tar"]), *storage.list_files(f"{out}/_preview", [".jpg"])]}
    for uri in storage.list_files(f"{out}/_manifest", [".json"]):
        manifest = json.loads(storage.read_bytes(uri))
        manifest.pop("tar_stamp")          # the tar's ETag/mtime: where it was written, not what it holds
        for s in manifest["samples"]:
            for timing in ("t_read", "t_decode", "t_segment"):
                s.pop(timing)
        got[Path(uri).name] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    got["failures"] = hashlib.sha256(storage.read_bytes(f"{out}/failures.jsonl")).hexdigest()
    return got


@pytest.fixture(scope="module")
def s3_input(s3):
    client = s3.client()
    bucket = s3.bucket("shard-fixture")
    for name, data in GOOD.items():
        client.put_object(Bucket="shard-fixture", Key=f"photos/{name}", Body=data)
    for name, (data, _) in BAD.items():
        client.put_object(Bucket="shard-fixture", Key=f"photos/{name}", Body=data)
    client.put_object(Bucket="shard-fixture", Key="photos/README.txt", Body=b"not listed: no image suffix")
    assert f"{bucket}/photos" == S3_INPUT
    return S3_INPUT


@pytest.fixture(scope="module")
def s3_run(s3_input, s3, ray_local):
    """The job on S3_INPUT, with everything the driver takes out of Ray's object store recorded."""
    out = s3.bucket("shard-out") + "/run1"
    received: list = []
    real_get = ray_local.get

    def get(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        received.append(value)
        return value

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_local, "get", get)
        stats = shard_job.run(shard_cfg(s3_input, out))
    return out, stats, received


@pytest.mark.slow
def test_worker_written_shards_equal_the_driver_written_ones_and_only_summaries_reach_the_driver(s3_run, ray_local):
    out, stats, received = s3_run
    assert digests(out) == BEFORE_THE_MOVE
    # one summary per shard: counts and the shard's failure rows (its tally for the totals), a few
    # hundred bytes; no member, array or tar bytes
    assert len(received) == 5 and all(set(r) == set(stages.SUMMARY_KEYS) for r in received)
    assert all(type(v) is int for r in received for k, v in r.items() if k != "tally")
    assert sorted(r["shard"] for r in received) == list(range(5)) and sum(r["images"] for r in received) == 17
    assert sum(r["tally"]["ok"] for r in received) == 12 and sum(len(r["tally"]["failures"]) for r in received) == 5
    assert stats["driver_received_bytes_this_run"] == sum(len(pickle.dumps(r)) for r in received)
    assert stats["driver_received_bytes_this_run"] < 2000 * 5 < stats["bytes"] / 20
    # the segmenter actors are gone when the job returns: the cluster's CPUs are free again
    deadline = time.monotonic() + 60
    while ray_local.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources().get("CPU", 0) == 4


@pytest.mark.slow
def test_s3_prefix_every_valid_image_present_bad_ones_reported(s3_input, s3_run):
    out, stats, _ = s3_run
    assert len(f"photos/{LONG_KEY}".encode()) <= 1024                          # S3's longest key
    assert (stats["ok"], stats["failed"], stats["shards"]) == (12, 5, 5)     # 17 images, 4 per shard
    assert (stats["known_bad"], stats["failed_good"], shard_job.resume.exit_code(stats)) == (5, 0, 0)
    tars = read_shards(out)
    assert sorted(tars) == [f"shard-0000{i}.tar" for i in range(5)]
    samples = {k: v for t in tars.values() for k, v in fmt.read_tar(t).items()}
    assert sorted(samples) == sorted(fmt.sample_key(n) for n in GOOD)
    members = sorted(fmt.MEMBERS_HR + fmt.MEMBERS_LRUP)
    assert all(sorted(m) == members for m in samples.values())
    failures = [json.loads(line) for line in storage.read_text(f"{out}/failures.jsonl").splitlines()]
    assert {f["uri"].rsplit("/", 1)[1]: f["reason"] for f in failures} == {n: r for n, (_, r) in BAD.items()}
    assert all(f["message"] for f in failures)
    manifest = json.loads(storage.read_bytes(f"{out}/_manifest/shard-00000.json"))
    assert manifest["ok"] + manifest["failed"] == 4 and all("t_segment" in s for s in manifest["samples"])
    # the last shard (truncated.jpg) holds no valid image: an empty tar, no contact sheet
    assert fmt.read_tar(tars["shard-00004.tar"]) == {}
    assert [Path(u).name for u in storage.list_files(f"{out}/_preview")] == [f"shard-0000{i}.jpg" for i in range(4)]
    with tarfile.open(fileobj=io.BytesIO(tars["shard-00000.tar"]), mode="r:") as tar:   # the two long keys
        assert max(len(n.encode()) for n in tar.getnames()) <= 100
    assert json.loads(samples[fmt.sample_key(LONG_KEY)]["json"])["source"] == f"{s3_input}/{LONG_KEY}"
    assert manifest["tar_sha256"] == hashlib.sha256(tars["shard-00000.tar"]).hexdigest()
    sheet = Image.open(io.BytesIO(storage.read_bytes(f"{out}/_preview/shard-00000.jpg")))
    assert sheet.format == "JPEG" and sheet.size[0] > 64
    plan = json.loads(storage.read_bytes(f"{out}/_plan.json"))
    assert plan["num_images"] == 17 and plan["fingerprint"]["segmenter"]["kind"] == "superpixel"


@pytest.mark.slow
def test_rerun_of_a_finished_job_reads_no_tar_byte(s3_input, s3_run, s3):
    """A finished job's rerun trusts its shards from one listing of the output (size + ETag recorded at
    write) and the index of tallies: no tar GET, no manifest GET; --verify hashes every tar (Ray tasks)."""
    out, first, _ = s3_run
    since = s3.mark()
    stats = shard_job.run(shard_cfg(s3_input, out))
    asked = s3.requests(since)
    assert (stats["shards_written_this_run"], stats["ok"], stats["failed"]) == (0, first["ok"], first["failed"])
    assert not [p for m, p in asked if p.split("?")[0].endswith(".tar")]
    # the tallies come from the index the first run wrote (each manifest's ETag unchanged in the listing)
    assert sorted({p for m, p in asked if "/_manifest/" in p}) == ["/shard-out/run1/_manifest/_index.parquet"]
    assert len(asked) <= 16, asked     # listings, _plan.json, preflight, the index, the two totals files
    client = s3.client()                 # a manifest rewritten since the index: read again, not trusted blind
    body = client.get_object(Bucket="shard-out", Key="run1/_manifest/shard-00002.json")["Body"].read()
    client.put_object(Bucket="shard-out", Key="run1/_manifest/shard-00002.json", Body=body + b" ")
    since = s3.mark()
    assert shard_job.run(shard_cfg(s3_input, out))["shards_written_this_run"] == 0
    assert sorted({p for m, p in s3.requests(since) if m == "GET" and "/_manifest/s" in p}) == \
        ["/shard-out/run1/_manifest/shard-00002.json"]
    since = s3.mark()
    stats = shard_job.run(shard_cfg(s3_input, out, "shard.verify=true"))
    tars = sorted({p for m, p in s3.requests(since) if m == "GET" and p.endswith(".tar")})
    assert tars == [f"/shard-out/run1/shard-0000{i}.tar" for i in range(5)] and stats["shards_written_this_run"] == 0


@pytest.mark.slow
def test_read_back_with_webdataset_and_ray_data_equals_direct_samsr(s3_input, s3_run, tmp_path, ray_local):
    import webdataset as wds

    out, _, _ = s3_run
    for name, data in read_shards(out).items():
        (tmp_path / name).write_bytes(data)
    rows = list(wds.WebDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), shardshuffle=False))
    by_key = {r["__key__"]: r for r in rows}
    seg = SuperpixelSegmenter(SEGMENTS, 10.0)
    for name, data in GOOD.items():
        got = fmt.decode_members({m: by_key[fmt.sample_key(name)][m] for m in fmt.MEMBERS_HR + fmt.MEMBERS_LRUP})
        ref = prepare_sample("k", images.decode_image(data), 4, seg)       # samsr directly, same image
        assert np.array_equal(got["hr.png"], ref.hr), name
        assert np.array_equal(got["lr.png"], ref.lr), name
        assert np.array_equal(got["hr.seg.png"], ref.spe_labels), name
        assert np.array_equal(got["hr.spe.npy"], ref.spe_values), name
        assert np.array_equal(got["lrup.cover.png"], ref.cover), name
        assert got["json"]["source"] == f"{s3_input}/{name}"
    fs, path = storage.filesystem(out)
    ds = ray_local.data.read_webdataset(path, filesystem=fs, decoder=None, file_extensions=["tar"])
    ray_rows = {r["__key__"]: r for r in ds.iter_rows()}
    assert sorted(ray_rows) == sorted(by_key)
    key = fmt.sample_key("odd_size.png")
    assert bytes(ray_rows[key]["hr.seg.png"]) == by_key[key]["hr.seg.png"]
    assert bytes(ray_rows[key]["hr.spe.npy"]) == by_key[key]["hr.spe.npy"]


@pytest.fixture(scope="module")
def local_input(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shard-local-in")
    for i, name in enumerate(["rgb.png", "photo.jpg", "odd_size.png", "palette.png", "alpha.png", "gray16.png"]):
        (root / f"img{i}_{name}").write_bytes(GOOD[name])
    (root / "text.png").write_bytes(BAD["text.png"][0])
    return root


@pytest.fixture(scope="module")
def reference_run(local_input, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("shard-ref")
    shard_job.run(shard_cfg(str(local_input), str(out)))
    return out


@pytest.mark.slow
def test_kill_midway_then_rerun_gives_the_uninterrupted_bytes(local_input, reference_run, tmp_path, ray_local,
                                                              monkeypatch):
    cfg = shard_cfg(str(local_input), str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="test hook"):
        shard_job.run(cfg, fail_after_shards=1)
    first = list((tmp_path / "out").glob("*.tar"))
    assert len(first) == 1 and len(list((tmp_path / "out" / "_manifest").glob("*.json"))) == 1
    before = first[0].stat().st_mtime_ns
    stats = shard_job.run(cfg)
    assert stats["shards_written_this_run"] == 1 and first[0].stat().st_mtime_ns == before   # only the missing one
    assert read_shards(str(tmp_path / "out")) == read_shards(str(reference_run))
    assert shard_job.run(cfg)["shards_written_this_run"] == 0                                # finished: no-op
    # a tar cut short is not trusted (its manifest records size + sha256): rebuilt, and said so; a
    # relative --input/--output resumes what the absolute ones started
    tar1 = tmp_path / "out" / "shard-00001.tar"
    tar1.write_bytes(tar1.read_bytes()[:1000])
    monkeypatch.chdir(local_input.parent)
    rel = config.replace(cfg, shard=config.replace(cfg.shard, input=os.path.relpath(local_input) + "/",
                                                   output=os.path.relpath(tmp_path / "out")))
    lines: list[str] = []
    stats = shard_job.run(rel, echo=lines.append)
    assert stats["shards_written_this_run"] == 1 and stats["shards_rebuilt_this_run"] == {"tar truncated": 1}
    assert "1 of them rebuilt (1 tar truncated)" in lines[0] and stats["images_not_in_plan"] == 0
    assert read_shards(str(tmp_path / "out")) == read_shards(str(reference_run))
    with pytest.raises(ValueError, match="samples_per_shard"):
        shard_job.run(config.replace(cfg, shard=config.replace(cfg.shard, samples_per_shard=3)))


@pytest.mark.slow
def test_tiny_random_sam_runs_inside_the_actor_pool(local_input, tmp_path, ray_local):
    cfg = config.load("samdiffsr-tiny", [f"shard.input={local_input}", f"shard.output={tmp_path}", "shard.limit=2",
                                         "shard.actors=1", "shard.cpus_per_actor=0.5", "shard.lrup_masks=false"])
    stats = shard_job.run(cfg)
    assert stats["ok"] == 2 and stats["segmenter"]["random_weights"] is True
    samples = fmt.read_tar((tmp_path / "shard-00000.tar").read_bytes())
    for members in samples.values():
        masks = json.loads(members["hr.masks.json"])
        assert len(masks) > 0 and all(m["area"] > 0 and m["predicted_iou"] is not None for m in masks)
        assert json.loads(members["json"])["segmenter"]["segmenter"] == "tiny-sam-random-seed0"


def test_dry_run_prints_the_plan_and_writes_nothing(local_input, tmp_path):
    lines = []
    report = shard_job.run(shard_cfg(str(local_input), str(tmp_path / "never"), "shard.actors=4"),
                           dry_run=True, echo=lines.append)
    assert report["images"] == 7 and report["shards"] == 2 and report["sampled"] == 4
    assert report["images_per_s_per_actor"] > 0 and report["estimated_bytes"] > 0
    assert "images/s per actor" in lines[0] and not (tmp_path / "never").exists()


def test_cli_flags_map_to_config_overrides():
    args = cli.build_parser().parse_args(
        ["shard", "--input", "s3://b/in", "--output", "out", "--segmenter", "tiny-sam", "--scale", "2",
         "--samples-per-shard", "8", "--actors", "3", "--gpus-per-actor", "0.5", "--batch-size", "2",
         "--no-lrup-masks", "--limit", "10"])
    cfg = config.load(args.config, cli.shard_overrides(args))
    assert (cfg.shard.input, cfg.shard.output, cfg.segmenter.kind, cfg.data.scale) == ("s3://b/in", "out", "tiny-sam", 2)
    assert (cfg.shard.samples_per_shard, cfg.shard.actors, cfg.shard.gpus_per_actor) == (8, 3, 0.5)
    assert (cfg.shard.batch_size, cfg.shard.lrup_masks, cfg.shard.limit) == (2, False, 10)
    assert cfg.method == "samdiffsr" and cfg.segmenter.model_type == "vit_h"

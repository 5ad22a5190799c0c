"""The shard job writes its shards in Ray workers (pipelines/shard.py + shard_stages.py): the output is
byte for byte what the driver-side writer made before the move (digests below were taken from that
code, commit 22e74be, on this fixed S3 input), and what reaches the driver is one small summary per shard.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path

import pytest

from pipelines import shard as shard_job
from pipelines import shard_stages as stages
from samsr import config
from samsr.shards import plan as plan_mod
from test_shard_job import BAD, GOOD, shard_cfg

FIXTURE_INPUT = "s3://shard-fixture/photos"      # fixed: the source URI is part of each sample's json
# made by the driver-side writer (before the move): tars and previews as bytes, manifests without timings
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


def digests(out: Path) -> dict[str, str]:
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in [*out.glob("*.tar"), *out.glob("_preview/*.jpg")]}
    for m in (out / "_manifest").glob("*.json"):
        manifest = json.loads(m.read_bytes())
        for s in manifest["samples"]:
            for timing in ("t_read", "t_decode", "t_segment"):
                s.pop(timing)
        got[m.name] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    got["failures"] = hashlib.sha256((out / "failures.jsonl").read_bytes()).hexdigest()
    return got


@pytest.fixture(scope="module")
def fixture_input(s3):
    client = s3.client()
    s3.bucket("shard-fixture")
    for name, data in [*GOOD.items(), *((n, d) for n, (d, _) in BAD.items())]:
        client.put_object(Bucket="shard-fixture", Key=f"photos/{name}", Body=data)
    return FIXTURE_INPUT


@pytest.mark.slow
def test_worker_written_shards_equal_the_driver_written_ones_and_only_summaries_reach_the_driver(
        fixture_input, tmp_path, ray_local, monkeypatch):
    received: list = []
    real_get = ray_local.get

    def get(refs, *args, **kwargs):      # everything the driver takes out of the object store
        value = real_get(refs, *args, **kwargs)
        received.append(value)
        return value

    monkeypatch.setattr(ray_local, "get", get)
    stats = shard_job.run(shard_cfg(fixture_input, str(tmp_path / "out")))
    monkeypatch.undo()
    assert digests(tmp_path / "out") == BEFORE_THE_MOVE
    assert (stats["ok"], stats["known_bad"], stats["failed_good"], stats["shards"]) == (12, 5, 0, 5)
    # one summary per shard, ints only, a few hundred bytes: no member, array or tar bytes
    assert len(received) == 5 and all(set(r) == set(stages.SUMMARY_KEYS) for r in received)
    assert all(type(v) is int for r in received for v in r.values())
    assert sorted(r["shard"] for r in received) == list(range(5)) and sum(r["images"] for r in received) == 17
    assert stats["driver_received_bytes_this_run"] == sum(len(pickle.dumps(r)) for r in received)
    assert stats["driver_received_bytes_this_run"] < 200 * 5 < stats["bytes"] / 100
    # the segmenter actors are gone when the job returns: the cluster's CPUs are free again
    deadline = time.monotonic() + 20
    while ray_local.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources().get("CPU", 0) == 4


def test_the_write_stage_returns_a_summary_and_writes_the_manifest_last(tmp_path):
    rows = [{"uri": "s3://b/x.png", "key": "x_png-0123456789", "shard": 3, "index": 1, "status": "failed",
             "reason": "corrupt", "message": "not an image", "members": {}, "thumb": b"", "meta": {},
             "t_read": 0.1, "t_decode": 0.0, "t_segment": 0.0}]
    summary = stages.write_shard(str(tmp_path), 3, True, rows)
    assert summary == {"shard": 3, "images": 1, "ok": 0, "failed": 1, "tar_bytes": 10240}  # an empty tar: one 10 KiB record
    manifest = json.loads((tmp_path / "_manifest" / "shard-00003.json").read_bytes())
    assert manifest["samples"][0]["reason"] == "corrupt" and manifest["tar_bytes"] == 10240
    assert not (tmp_path / "_preview").exists()                     # no sample: no contact sheet


def test_shards_in_flight_keep_every_actor_busy_and_no_more():
    def plan(per_shard: int) -> plan_mod.Plan:
        return plan_mod.Plan(input="x", samples_per_shard=per_shard, fingerprint={},
                             shards=((None,) * per_shard,) * 100, rejected=())

    cfg = config.load("samdiffsr", ["shard.actors=8", "shard.batch_size=4"])
    assert shard_job.shards_in_flight(cfg, plan(64)) == 4     # 2 shards of 64 images cover 4 × 8 actors × 4
    assert shard_job.shards_in_flight(cfg, plan(4)) == 34     # 32 shards of 4 images, + one written, one filled
    assert shard_job.shards_in_flight(config.load("samdiffsr", ["shard.actors=1", "shard.batch_size=1"]), plan(1)) == 6


def test_gpus_that_never_come_are_refused_before_the_plan_is_written(tmp_path, ray_local):
    from pipelines.rayenv import ResourceUnavailable

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(GOOD["rgb.png"])
    cfg = shard_cfg(str(tmp_path / "in"), str(tmp_path / "out"), "shard.gpus_per_actor=1", "shard.gpu_wait_s=1")
    t0 = time.perf_counter()
    with pytest.raises(ResourceUnavailable, match=r"samsr shard asks for 2 GPU\(s\) \(2 × 1\) but the Ray cluster has 0"):
        shard_job.run(cfg)
    assert time.perf_counter() - t0 < 15
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())     # no _plan.json, nothing

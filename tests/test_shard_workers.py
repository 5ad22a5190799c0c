"""The shard job's parts that write in Ray workers (pipelines/shard.py + shard_stages.py): the write stage,
the in-flight window, the GPU refusal. The whole job's output against the driver-side writer's digests, and
what reaches the driver, are checked on the 17-image run in tests/test_shard_job.py."""
from __future__ import annotations

import json
import time

import pytest

from pipelines import shard as shard_job
from pipelines import shard_stages as stages
from samsr import config
from samsr.shards import plan as plan_mod
from test_shard_job import GOOD, shard_cfg

def test_the_write_stage_returns_a_summary_and_writes_the_manifest_last(tmp_path):
    rows = [{"uri": "s3://b/x.png", "key": "x_png-0123456789", "shard": 3, "index": 1, "status": "failed",
             "reason": "corrupt", "message": "not an image", "members": {}, "thumb": b"", "meta": {},
             "t_read": 0.1, "t_decode": 0.0, "t_segment": 0.0}]
    summary = stages.write_shard(str(tmp_path), 3, True, rows)
    tally = summary.pop("tally")
    assert summary == {"shard": 3, "images": 1, "ok": 0, "failed": 1, "tar_bytes": 10240}  # an empty tar: one 10 KiB record
    manifest = json.loads((tmp_path / "_manifest" / "shard-00003.json").read_bytes())
    assert manifest["samples"][0]["reason"] == "corrupt" and manifest["tar_bytes"] == 10240
    tar, man = tmp_path / "shard-00003.tar", tmp_path / "_manifest" / "shard-00003.json"
    # the shard's tally for the totals and the next rerun's index: its failure row, the listing stamps
    assert manifest["tar_stamp"] == str(tar.stat().st_mtime_ns) == tally["tar_stamp"]
    assert tally["manifest_stamp"] == str(man.stat().st_mtime_ns) and tally["retry"] == []
    assert (tally["ok"], tally["no_hr"], tally["segmenter"]) == (0, 0, None)
    assert tally["failures"] == [{"uri": "s3://b/x.png", "key": "x_png-0123456789", "shard": "shard-00003",
                                  "reason": "corrupt", "message": "not an image"}]
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
    with pytest.raises(ResourceUnavailable, match=r"samsr shard asks for 2 GPU\(s\) \(2 × 1\) but this job started "
                       r"its own local Ray, which has 0 free"):
        shard_job.run(cfg)
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())     # no _plan.json, nothing

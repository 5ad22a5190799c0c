"""Training ingest through Ray Data (pipelines/train_data.py, samsr/shards/crops.py): crops are a function
of (seed, pass, shard), batches have the layout of `samsr.data.make_batch`, the dataset holds the passes
the run needs in a seeded shard order and a bounded number of blocks, the workers' config holds no shard
list, bad samples are tallied across tasks and stop training past the threshold."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pipelines import train_data
from samsr import config, images
from samsr.shards import crops, stream
from test_stream import members, write_shard


def test_crops_depend_on_seed_pass_and_shard_only_and_collate_like_make_batch(tmp_path):
    uri = write_shard(tmp_path, 0, [f"k{i}" for i in range(3)])
    kw = {"hr_crop": 16, "scale": 4, "crops_per_sample": 5}
    first = list(crops.shard_crops(uri, seed=0, pass_index=0, **kw))
    again = list(crops.shard_crops(uri, seed=0, pass_index=0, **kw))
    other = list(crops.shard_crops(uri, seed=0, pass_index=1, **kw))
    assert len(first) == 3 and all(b["hr"].shape == (5, 16, 16, 3) and b["lr"].shape == (5, 4, 4, 3) for b in first)
    assert all(np.array_equal(a["hr"], b["hr"]) for a, b in zip(first, again))
    assert not all(np.array_equal(a["hr"], b["hr"]) for a, b in zip(first, other))
    # every crop is an aligned crop: unflipped, its LR is the HR's 4x4 subsample (how `members` made LR)
    plain = list(crops.shard_crops(uri, seed=0, pass_index=0, flips=False, **kw))
    assert all(np.array_equal(b["lr"], b["hr"][:, ::4, ::4]) for b in plain)
    assert {float(v) for b in first for v in np.unique(b["spe"])} <= {0.0, 0.5}
    batch = crops.collate({k: np.concatenate([b[k] for b in first]) for k in crops.CROP_COLUMNS})
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "hr": (15, 3, 16, 16), "lr": (15, 3, 4, 4), "spe": (15, 1, 16, 16), "cover": (15, 1, 16, 16),
        "cover_max": (15,), "noise_rms": (15,)}
    assert torch.equal(batch["hr"][7], images.to_tensor(first[1]["hr"][2]))
    assert float(batch["cover"].min()) == 1.0 and float(batch["cover_max"][0]) == 1.0


def test_a_bad_sample_is_skipped_into_the_count_and_the_hold_out_is_left_out(tmp_path):
    bad = members(1)
    bad["hr.png"] = b"not a png"
    uri = write_shard(tmp_path, 0, ["a", "b", "c", "d"], **{"b": bad})
    count = stream.SkipCount()
    got = list(crops.shard_crops(uri, seed=0, pass_index=0, hr_crop=16, scale=4, crops_per_sample=2,
                                 exclude=frozenset({"d"}), count=count))
    assert len(got) == 2 and (count.read, count.skipped) == (3, 1) and "sample 'b'" in count.last


def test_passes_cover_the_steps_of_the_run():
    cfg = config.load("samsr-teacher-tiny", ["train.batch_size=8", "job.crops_per_sample=4"])
    data = {"filled": ["a", "b"], "counts": {"a": 10, "b": 6}, "holdout": ["h"]}
    # 15 training samples × 4 crops = 60 crops a pass; 100 steps × 8 = 800 crops -> 14 passes, + 1 spare
    assert train_data.passes_needed(cfg, data, 100) == 15
    assert train_data.passes_needed(cfg, data, 1) == 2


# (pass, shard index) of the plan over 5 shards × 3 passes with seed 7: each pass a permutation of its own
PLAN_SEED_7 = [(0, 2), (0, 0), (0, 4), (0, 1), (0, 3), (1, 3), (1, 0), (1, 2), (1, 1), (1, 4),
               (2, 0), (2, 2), (2, 1), (2, 3), (2, 4)]


def test_the_plan_is_a_seeded_order_per_pass_cut_into_a_bounded_number_of_slices():
    passes, shards = train_data.plan_slice(7, 5, 0, 15)
    assert list(zip(passes.tolist(), shards.tolist())) == PLAN_SEED_7
    cut = [train_data.plan_slice(7, 5, a, b) for a, b in ((0, 4), (4, 11), (11, 15))]    # slices across passes
    assert np.concatenate([s for _, s in cut]).tolist() == shards.tolist()
    assert train_data.plan_slice(8, 5, 0, 5)[1].tolist() != shards[:5].tolist()            # another seed
    # blocks: the rows when there are few; at least PLAN_MIN_BLOCKS; PLAN_BLOCKS_PER_SLOT per decode slot
    assert (train_data.PLAN_MIN_BLOCKS, train_data.PLAN_BLOCKS_PER_SLOT) == (1000, 4)
    assert train_data.plan_blocks(6, 2) == 6
    assert train_data.plan_blocks(20 * 5_000, 2) == 1000            # 5M images in 1000-sample shards, 20 passes
    assert train_data.plan_blocks(20 * 50_000, 2) == 1000
    assert train_data.plan_blocks(20 * 50_000, 600) == 2400


def test_the_plan_dataset_yields_the_seeded_rows_in_the_blocks_asked_for(ray_local, monkeypatch):
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    monkeypatch.setattr(options, "preserve_order", True)       # blocks in plan order, whichever task ends first
    cfg = config.load("samsr-teacher-tiny", ["train.batch_size=4", "job.crops_per_sample=2", "train.seed=7"])
    uris = [f"s3://b/shards/shard-{i:05d}.tar" for i in range(5)]
    data = {"filled": uris, "counts": {u: i + 1 for i, u in enumerate(uris)}, "holdout": []}
    assert train_data.passes_needed(cfg, data, 10) == 3     # 15 samples × 2 crops a pass; 10 × 4 = 40: 2 + 1 spare
    plan = train_data.plan(cfg, data, steps=10, blocks=4).materialize()
    assert plan.num_blocks() == 4                            # the design before: one block per row, 15
    rows = plan.take_all()
    assert [(r["pass"], r["uri"], r["expected"]) for r in rows] == [(p, uris[i], i + 1) for p, i in PLAN_SEED_7]


def test_the_workers_config_holds_no_shard_list():
    from pipelines import train

    cfg = config.load("samsr-teacher-tiny")

    def worker_config(shards: int) -> dict:
        uris = [f"s3://b/shards/shard-{i:05d}.tar" for i in range(shards)]
        data = {"filled": uris, "counts": dict.fromkeys(uris, 64), "holdout": ["k0"]}
        return train.worker_config(cfg, data, "run-1", fail_after_steps=0)

    few, many = worker_config(10), worker_config(10_000)
    assert sorted(many) == ["cfg", "fail_after_steps", "mlflow_run_id", "val_shard"]
    assert many["val_shard"] == "s3://b/shards/shard-09999.tar" and many["mlflow_run_id"] == "run-1"
    assert len(pickle.dumps(many)) == len(pickle.dumps(few)) < 10_000
    assert "shard-00000" not in repr(many)


@pytest.mark.slow
def test_the_dataset_feeds_batches_and_tallies_skips(tmp_path, ray_local):
    bad = members(9)
    bad["hr.spe.npy"] = bad["hr.spe.npy"][:20]
    uris = [write_shard(tmp_path, 0, ["a", "b", "c"]), write_shard(tmp_path, 1, ["d", "e"], **{"e": bad})]
    cfg = config.load("samsr-teacher-tiny", ["train.batch_size=4", "job.crops_per_sample=2", "data.hr_crop=16",
                                             "job.decode_cpus=0.5"])
    data = {"filled": uris, "counts": {uris[0]: 3, uris[1]: 2}, "holdout": []}
    tally = train_data.new_tally()
    ds = train_data.build(cfg, data, steps=3, tally=tally)   # 5 samples × 2 crops = 10 a pass; 12 -> 2 + 1 passes
    rows = ds.take_all()
    assert len(rows) == 3 * 4 * 2                              # 3 passes × 4 good samples × 2 crops
    assert ray_local.get(tally.totals.remote())[:2] == (15, 3)  # 5 read a pass, 1 of them bad
    # a worker's view: batches of the per-worker size, the skip totals since it started, and the threshold
    strict = config.replace(cfg, job=config.replace(cfg.job, max_skipped_fraction=0.1))
    source = train_data.WorkerBatches(strict, 0, tally, shard=train_data.build(cfg, data, 3, tally).iterator())
    with pytest.raises(stream.ShardDataError, match=r"3 of 15 samples read were bad, more than "
                                                    r"job.max_skipped_fraction=0.1; last: shard .* sample 'e'"):
        batches = [b["hr"].shape for b in source]
    lenient = train_data.WorkerBatches(cfg, 0, tally, shard=train_data.build(cfg, data, 3, tally).iterator())
    it = iter(lenient)
    batches = [next(it) for _ in range(6)]
    assert all(tuple(b["hr"].shape) == (4, 3, 16, 16) for b in batches) and lenient.skipped() >= 1

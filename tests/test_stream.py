"""samsr.shards.stream on damaged data (issue 11): empty shards are left out and ranks get shards by
samples, a run without samples is refused before any worker starts, corrupt samples and cut tars are
skipped, counted and logged with shard and key, and too many bad samples stop training with a reason.
Tiny synthetic samples (32x32 HR), no segmenter, no Ray."""
from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest

from samsr import config
from samsr.shards import format as fmt
from samsr.shards import stream


def members(seed: int) -> dict[str, bytes]:
    """One valid training sample: 32x32 HR, its 8x8 LR, two labels with SPE values, coverage 1."""
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    seg = np.zeros((32, 32), np.uint16)
    seg[:16] = 1
    return {"hr.png": fmt.png_bytes(hr, 1), "lr.png": fmt.png_bytes(np.ascontiguousarray(hr[::4, ::4]), 1),
            "hr.seg.png": fmt.png_bytes(seg, 1), "hr.spe.npy": fmt.npy_bytes(np.array([0.0, 0.5], np.float32)),
            "lrup.cover.png": fmt.png_bytes(np.ones((32, 32), np.uint8), 1)}


def write_shard(folder, index: int, keys: list[str], ok: int | None = None, **replace) -> str:
    """shard-NNNNN.tar with samples `keys` (members of one key swapped via `replace={key: members}`);
    with `ok`, a manifest claiming that many samples."""
    samples = [(k, replace.get(k, members(i))) for i, k in enumerate(keys)]
    path = folder / f"shard-{index:05d}.tar"
    path.write_bytes(fmt.tar_bytes(samples))
    if ok is not None:
        (folder / "_manifest").mkdir(exist_ok=True)
        (folder / "_manifest" / f"shard-{index:05d}.json").write_text(json.dumps({"ok": ok, "failed": 0}))
    return str(path)


def test_empty_shards_and_held_out_samples_are_left_out(tmp_path):
    empty = write_shard(tmp_path, 0, [], ok=0)
    big = write_shard(tmp_path, 1, [f"b{i}" for i in range(4)], ok=4)
    small = [write_shard(tmp_path, i, [f"s{i}"]) for i in (2, 3, 4)]          # no manifest: counted from the tar
    uris = stream.list_shards(str(tmp_path))
    counts = stream.shard_counts(uris)
    assert counts == {empty: 0, big: 4, small[0]: 1, small[1]: 1, small[2]: 1}
    assert stream.usable_shards(counts) == {big: 4, small[0]: 1, small[1]: 1, small[2]: 1}
    # the validation hold-out does not count: without its 4 held-out samples `big` feeds nobody
    assert stream.usable_shards(counts, {big: 4}) == {small[0]: 1, small[1]: 1, small[2]: 1}
    assert stream.usable_shards(counts, {big: 2}) == {big: 2, small[0]: 1, small[1]: 1, small[2]: 1}
    # a manifest's count is used without reading the tar; the stream itself reads tars and skips empty ones
    (tmp_path / "_manifest" / "shard-00002.json").write_text(json.dumps({"ok": 5}))
    assert stream.shard_counts([small[0], small[1]]) == {small[0]: 5, small[1]: 1}
    it = stream.iter_samples([empty, small[0]], np.random.default_rng(0), need_cover=True)
    assert [s.key for s in it] == ["s2"]


def test_no_samples_anywhere_is_refused_before_any_worker_starts(tmp_path, capsys):
    from pipelines import train

    for i in range(3):
        write_shard(tmp_path, i, [], ok=0)
    with pytest.raises(stream.ShardDataError, match=r"no training samples for rank 0\.\.1: the 3 shard\(s\)"):
        stream.usable_shards(stream.shard_counts(stream.list_shards(str(tmp_path))), where=str(tmp_path), world=2)
    sets = [f"job.shards={tmp_path}", f"job.storage={tmp_path / 'runs'}", "job.num_workers=2", "train.batch_size=2"]
    args = ["--config", "samsr-teacher-tiny"] + [a for s in sets for a in ("--set", s)]
    assert train.main(args) == 2                                          # no Ray started: refused up front
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard-00000.tar, shard-00001.tar, shard-00002.tar" in err
    assert not (tmp_path / "runs").exists()
    # the one sample of a single shard held out for validation leaves nothing to train on: refused too
    write_shard(tmp_path, 3, ["only"], ok=1)
    with pytest.raises(ValueError, match="would hold out all 1 samples"):
        train.plan_data(config.load("samsr-teacher-tiny", sets + ["job.val_images=1"]))
    plan = train.plan_data(config.load("samsr-teacher-tiny", sets + ["train.eval_every=0"]))
    assert plan["filled"] == [str(tmp_path / "shard-00003.tar")] and plan["holdout"] == []


def test_a_corrupt_member_is_skipped_counted_and_logged(tmp_path, caplog):
    bad = members(7)
    bad["hr.spe.npy"] = bad["hr.spe.npy"][:20]            # cut inside the .npy header: "EOF: reading array header"
    uri = write_shard(tmp_path, 0, [f"k{i}" for i in range(10)], **{"k3": bad})
    count = stream.SkipCount()
    with caplog.at_level(logging.WARNING, logger="samsr.shards.stream"):
        got = [s.key for s in stream.iter_samples([uri], np.random.default_rng(0), False, count=count)]
    assert sorted(got) == [f"k{i}" for i in range(10) if i != 3] and (count.read, count.skipped) == (10, 1)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"shard {uri} sample 'k3'" in warning and "EOF: reading array header" in warning
    # under the threshold training goes on; the pool of 12 needs a second pass over the 9 good samples
    batch = next(stream.batches([uri], batch_size=2, hr_crop=16, scale=4, seed=0, pool=12, max_skipped=0.2))
    assert batch["hr"].shape == (2, 3, 16, 16)
    # the same shard with a threshold below 1 in 10: training stops, naming the count, the key and the setting
    with pytest.raises(stream.ShardDataError, match=r"rank 0: 1 of 10 samples read were bad, more than "
                                                    r"job.max_skipped_fraction=0.05; last: shard .* sample 'k3'"):
        next(stream.batches([uri], batch_size=2, hr_crop=16, scale=4, seed=0, pool=12, max_skipped=0.05))


def test_a_sample_whose_members_disagree_is_skipped(tmp_path):
    bad = members(1)
    bad["hr.spe.npy"] = fmt.npy_bytes(np.array([0.0], np.float32))          # no value for label 1
    wrong_lr = members(2)
    wrong_lr["lr.png"] = fmt.png_bytes(np.zeros((7, 8, 3), np.uint8), 1)
    uri = write_shard(tmp_path, 0, ["a", "b", "c"], b=bad, c=wrong_lr)
    count = stream.SkipCount()
    assert [s.key for s in stream.iter_samples([uri], np.random.default_rng(0), False, count=count)] == ["a"]
    assert (count.read, count.skipped) == (3, 2)


def test_a_cut_tar_gives_the_samples_before_the_cut_and_skips_the_rest(tmp_path, caplog):
    whole = fmt.tar_bytes([(f"k{i}", members(i)) for i in range(4)])
    offsets = {}
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        for info in tar:
            offsets.setdefault(info.name.partition(".")[0], info.offset_data)
    cut = tmp_path / "shard-00000.tar"
    cut.write_bytes(whole[:offsets["k2"] + 100])                           # mid-member of the third sample
    at_boundary = tmp_path / "shard-00001.tar"
    at_boundary.write_bytes(whole[:offsets["k2"] - 512])                    # right before k2's first header
    samples, damage = stream.read_shard(str(cut))
    assert list(samples) == ["k0", "k1"] and "unexpected end of data" in damage
    samples, damage = stream.read_shard(str(at_boundary))       # k1 may have had more members: dropped too
    assert list(samples) == ["k0"] and "without its end-of-archive blocks" in damage
    count = stream.SkipCount()
    with caplog.at_level(logging.WARNING, logger="samsr.shards.stream"):
        got = [s.key for s in stream.iter_samples([str(cut)], np.random.default_rng(0), False, count=count,
                                                  expected={str(cut): 4})]
    assert sorted(got) == ["k0", "k1"] and (count.read, count.skipped) == (4, 2)   # 2 lost, from the manifest count
    assert any(f"shard {cut}" in r.getMessage() and "rest of the shard (2 sample(s))" in r.getMessage()
               for r in caplog.records)
    (tmp_path / "not-a-tar.tar").write_bytes(b"hello")
    assert stream.read_shard(str(tmp_path / "not-a-tar.tar"))[0] == {}
    # a stream whose every sample is bad ends its first pass with the reason, instead of looping
    with pytest.raises(stream.ShardDataError, match=r"no training samples in the 1 shard\(s\) of rank 3 .*"
                                                    r"skipping 1 bad one\(s\) \(last: shard .*not-a-tar.tar"):
        next(stream.batches([str(tmp_path / "not-a-tar.tar")], batch_size=1, hr_crop=16, scale=4, seed=0, rank=3))

"""samsr.listing: streamed, sorted listings of folders and S3 prefixes (the same order and entries for
both), listing files (S3 Inventory CSV/Parquet, plain keys) and the progress line."""
from __future__ import annotations

import gzip
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from samsr import config, listing, storage

# names whose sorted full-path order differs from a walk that lists a folder's files before its subfolders
NAMES = ["a/z.png", "a/b/c.png", "a/b.png", "a/b-x.png", "a/b0.png", "Ä ö/x y.JPG", "top.png", "notes.txt",
         "a/b/deep/er/d.webp"]


def _fill_local(root) -> list[str]:
    for name in NAMES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    (root / "a" / ("half.png" + storage._TMP_SUFFIX)).write_bytes(b"unfinished")
    return sorted(str(root / n) for n in NAMES)


def test_local_listing_is_sorted_full_paths_streamed_with_sizes(tmp_path):
    want = _fill_local(tmp_path)
    got = list(listing.iter_listing(str(tmp_path)))
    assert [g.uri for g in got] == want                                # sorted as strings, temp files left out
    assert [g.size for g in got] == [len(u[len(str(tmp_path)) + 1:].encode()) for u in want]
    assert all(int(g.stamp) > 0 for g in got)
    images = [g.uri for g in listing.iter_listing(str(tmp_path), (".png", ".jpg", ".webp"))]
    assert images == [u for u in want if not u.endswith(".txt")] == storage.list_files(str(tmp_path), (".png", ".jpg", ".webp"))
    assert list(listing.iter_listing(str(tmp_path / "missing"))) == []
    assert listing.stat(want[0]) == got[0]
    with pytest.raises(storage.ObjectNotFound, match="looked|no such"):
        listing.stat(str(tmp_path / "missing.png"))


def test_s3_listing_matches_the_local_one(tmp_path, s3):
    root = tmp_path / "l"
    want = _fill_local(root)
    bucket = s3.bucket("listing-order")
    client = s3.client()
    for name in NAMES:
        client.put_object(Bucket="listing-order", Key=f"in/{name}", Body=name.encode())
    client.put_object(Bucket="listing-order", Key="in/a/", Body=b"")                # a folder marker
    client.put_object(Bucket="listing-order", Key="in-other/x.png", Body=b"x")      # a sibling prefix
    got = list(listing.iter_listing(f"{bucket}/in"))
    assert [g.uri[len(f"{bucket}/in/"):] for g in got] == [u[len(str(root)) + 1:] for u in want]
    assert [g.size for g in got] == [(root / g.uri[len(f"{bucket}/in/"):]).stat().st_size for g in got]
    assert all(len(g.stamp) == 32 for g in got)                                     # an MD5 ETag, no quotes
    assert listing.stat(got[0].uri) == got[0]
    assert [g.uri for g in listing.iter_listing(f"{bucket}/in/top.png")] == [f"{bucket}/in/top.png"]
    assert list(listing.iter_listing("s3://no-such-bucket-here/x")) == []


def test_listing_files_csv_parquet_and_plain(tmp_path):
    base = "s3://photos/train"
    csv = ('"photos","train/a%20b.png","12","2026-01-01T00:00:00.000Z","etag"\n'
           '"photos","train/sub/%C3%A4.JPG","3","2026-01-01T00:00:00.000Z","etag"\n'
           '"photos","other/x.png","3","2026-01-01T00:00:00.000Z","etag"\n'
           '"photos","train/notes.txt","3","2026-01-01T00:00:00.000Z","etag"\n')
    (tmp_path / "inv.csv.gz").write_bytes(gzip.compress(csv.encode()))
    want = [f"{base}/a b.png", f"{base}/sub/ä.JPG"]
    assert list(listing.read_listing_file(str(tmp_path / "inv.csv.gz"), base, (".png", ".jpg"))) == want
    pq.write_table(pa.table({"bucket": ["photos"] * 3, "key": ["train/a b.png", "train/sub/ä.JPG", "zzz/y.png"],
                             "size": [1, 2, 3]}), tmp_path / "inv.parquet")
    assert list(listing.read_listing_file(str(tmp_path / "inv.parquet"), base, (".png", ".jpg"))) == want
    (tmp_path / "keys.txt").write_text(f"train/a b.png\n\n{base}/sub/ä.JPG\ns3://elsewhere/train/c.png\n")
    assert list(listing.read_listing_file(str(tmp_path / "keys.txt"), base, (".png", ".jpg"))) == want
    pq.write_table(pa.table({"name": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="'key' column"):
        list(listing.read_listing_file(str(tmp_path / "bad.parquet"), base))


def test_progress_says_how_many_and_how_fast(caplog):
    progress = listing.Progress("samsr shard: listing s3://b/in", every_s=0.0)
    with caplog.at_level(logging.INFO, logger="samsr.listing"):
        progress.add(1000)
        progress.add(500)
        progress.done()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("samsr shard: listing s3://b/in: 1000 objects listed (") and lines[0].endswith("/s)")
    assert lines[1].startswith("samsr shard: listing s3://b/in: 1500 objects listed (")
    assert lines[2].startswith("samsr shard: listing s3://b/in: 1500 objects listed in ")


def test_the_shard_plan_lists_through_it_or_reads_a_listing_file(tmp_path):
    from samsr.shards import plan as plan_mod

    want = [u for u in _fill_local(tmp_path / "in") if not u.endswith(".txt")]
    assert plan_mod.list_images(str(tmp_path / "in")) == want
    assert plan_mod.list_images(str(tmp_path / "in"), limit=2) == want[:2]
    keys = [u[len(str(tmp_path / "in")) + 1:] for u in reversed(want)] + ["notes.txt", "../escape.png"]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    escape = str(tmp_path / "in" / ".." / "escape.png")
    assert plan_mod.list_images(str(tmp_path / "in"), 0, str(tmp_path / "keys.txt")) == sorted([*want, escape])
    cfg = config.load("samdiffsr", [f"shard.input={tmp_path / 'in'}", f"shard.listing={tmp_path / 'keys.txt'}",
                                    "shard.samples_per_shard=4"])
    plan = plan_mod.build_plan(cfg)                 # a key that climbs out of the input is recorded, not read
    assert [e.uri for s in plan.shards for e in s] == want
    assert [(r["uri"], r["reason"]) for r in plan.rejected] == [(escape, "unsafe_key")]

"""Resume of `samsr shard`: which finished shards can be trusted, the run's totals, and its exit code.

A shard is the unit of resume. Its manifest (`_manifest/shard-NNNNN.json`) is written last and records
the size (`tar_bytes`), the listing stamp (`tar_stamp`: S3 ETag, or local mtime) and the sha256
(`tar_sha256`) of its tar. Each run ends by writing `_manifest/_index.parquet` (`INDEX`): every
shard's tally, keyed by its manifest's listing stamp. A rerun lists the output once and reads the
index; a manifest is read (one GET) only when the index lacks it or the manifest changed since. A shard
counts as done when its manifest is listed, its tar is listed with the recorded size and stamp, and
none of its samples failed for a reason a retry can fix (`RETRY_REASONS`); every other planned shard is
built (again). No tar byte is read: a rerun of a finished job costs its listing and a few requests.
`--verify` (shard.verify) also hashes every trusted tar, in Ray tasks near the data, not in the driver.
Manifests written before the stamp was recorded are checked by size alone (sha256 under --verify).

The totals (`_stats.json`, `failures.jsonl`) come from the tallies read here and the summaries the
write tasks return: the driver keeps a few numbers and the failure rows per shard, never re-reads them.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from samsr import listing, locations, storage
from samsr.images import REASONS as IMAGE_REASONS
from samsr.shards import plan as plan_mod

# a sample that failed for one of these is an input that should have worked: its shard is rebuilt on
# a rerun, and until then the job exits 1
RETRY_REASONS = ("read_error", "segment_error")
# inputs that cannot be used (bad bytes, too large/small, unusable keys): recorded, not job failures
KNOWN_BAD = (*IMAGE_REASONS, "unsafe_key", "duplicate_key")
CHECK_THREADS = 8
READ_CHUNK = 4 << 20
INDEX = "_index.parquet"     # under _manifest/: every shard's tally, checked by its manifest's listing stamp


def manifest_uri(output: str, shard_id: int) -> str:
    return storage.join(output, "_manifest", f"{plan_mod.shard_name(shard_id)}.json")


def tar_uri(output: str, shard_id: int) -> str:
    return storage.join(output, f"{plan_mod.shard_name(shard_id)}.tar")


def file_sha256(uri: str) -> tuple[int, str]:
    """(bytes, hex sha256) of a file or object, read in chunks (a shard need not fit in memory)."""
    digest, n = hashlib.sha256(), 0
    with storage.open_read(uri) as stream:
        while chunk := stream.read(READ_CHUNK):
            digest.update(chunk)
            n += len(chunk)
    return n, digest.hexdigest()


def shard_tally(manifest: dict, manifest_stamp: str = "") -> dict[str, Any]:
    """What resume and the totals need of one shard (from its manifest, or a write task's summary):
    counts, the segmenter, its failure rows (bounded by the shard's size), the tar's size, stamp and
    sha256, the retryable reasons, and the manifest's own listing stamp (what `INDEX` is checked by)."""
    samples = manifest["samples"]
    return {"ok": int(manifest["ok"]), "tar_bytes": int(manifest["tar_bytes"]), "segmenter": manifest.get("segmenter"),
            "tar_stamp": manifest.get("tar_stamp"), "tar_sha256": manifest.get("tar_sha256"),
            "manifest_stamp": manifest_stamp,
            "retry": sorted({s["reason"] for s in samples if s["status"] != "ok" and s["reason"] in RETRY_REASONS}),
            "no_hr": sum(s["status"] == "ok" and s.get("hr_masks") == 0 for s in samples),     # all-background E ≡ 0
            "no_lrup": sum(s["status"] == "ok" and s.get("lrup_masks") == 0 for s in samples),  # coverage C ≡ 1
            "failures": [{"uri": s["uri"], "key": s["key"], "shard": manifest["shard"], "reason": s["reason"],
                          "message": s["message"]} for s in samples if s["status"] != "ok"]}


def index_uri(output: str) -> str:
    return storage.join(output, "_manifest", INDEX)


@dataclass
class Totals:
    """The latest tally of every shard that has a manifest: read on resume (from `INDEX` or the
    manifest), replaced by each write; `save` writes them all to `INDEX` for the next rerun."""
    shards: dict[int, dict] = field(default_factory=dict)

    def add(self, shard_id: int, tally: dict) -> None:
        self.shards[shard_id] = tally

    def stats(self, plan: plan_mod.Plan) -> tuple[dict[str, Any], list[dict]]:
        failures = [{"uri": r["uri"], "key": None, "shard": None, "reason": r["reason"], "message": r["message"]}
                    for r in plan.rejected]
        t = [self.shards[i] for i in sorted(self.shards)]
        for tally in t:
            failures += tally["failures"]
        stats = {"images_planned": plan.num_images + len(plan.rejected), "ok": sum(x["ok"] for x in t),
                 **locations.failure_counts(failures, KNOWN_BAD),
                 "no_masks": {"hr": sum(x["no_hr"] for x in t), "lrup": sum(x["no_lrup"] for x in t)},
                 "shards": len(plan.shards), "shards_missing": len(plan.shards) - len(t),
                 "bytes": sum(x["tar_bytes"] for x in t),
                 "segmenter": next((x["segmenter"] for x in t if x["segmenter"]), None)}
        return stats, failures

    def save(self, output: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = sorted(i for i in self.shards if self.shards[i]["manifest_stamp"])
        table = pa.table({"shard": pa.array(ids, pa.int64()),
                          "manifest_stamp": [self.shards[i]["manifest_stamp"] for i in ids],
                          "tally": [json.dumps(self.shards[i]) for i in ids]})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        storage.write_bytes(index_uri(output), sink.getvalue().to_pybytes())


def read_index(output: str, manifest_stamps: dict[int, str]) -> dict[int, dict]:
    """The tallies `Totals.save` wrote, for the shards whose manifest is still the one they were read
    from (same listing stamp); {} when there is no index or it cannot be read (the manifests are then read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(index_uri(output))))
        rows = zip(table["shard"].to_pylist(), table["manifest_stamp"].to_pylist(), table["tally"].to_pylist())
        return {i: json.loads(t) for i, stamp, t in rows if stamp and manifest_stamps.get(i) == stamp}
    except (storage.StorageError, pa.ArrowException, ValueError, KeyError, TypeError):
        return {}


def _why_not_done(output: str, shard_id: int, manifests: dict[str, str], tars: dict[str, listing.Listed],
                  index: dict[int, dict], totals: Totals) -> tuple[str, tuple | None]:
    """('' when the shard is finished and whole, else why it must be built (again); what --verify
    must hash: (uri, bytes, sha256) or None)."""
    name = plan_mod.shard_name(shard_id)
    if f"{name}.json" not in manifests:
        return "new", None
    tally = index.get(shard_id)
    if tally is None:
        try:
            tally = shard_tally(json.loads(storage.read_bytes(manifest_uri(output, shard_id))), manifests[f"{name}.json"])
        except (storage.StorageError, ValueError, KeyError, TypeError):
            return "manifest unreadable", None
    totals.add(shard_id, tally)
    if tally["retry"]:
        return f"retry {'/'.join(tally['retry'])}", None
    have = tars.get(f"{name}.tar")
    if have is None:
        return "tar missing", None
    if have.size != tally["tar_bytes"]:
        return ("tar truncated" if have.size < tally["tar_bytes"] else "tar size differs"), None
    if tally["tar_stamp"] and have.stamp != tally["tar_stamp"]:
        return "tar differs", None          # rewritten since its manifest: not the bytes it describes
    return "", ((have.uri, tally["tar_bytes"], tally["tar_sha256"]) if tally["tar_sha256"] else None)


def hash_here(todo: Sequence[tuple[int, str]]) -> dict[int, tuple[int, str]]:
    """file_sha256 of each (shard id, tar URI) in this process (`CHECK_THREADS` threads)."""
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        return dict(zip((i for i, _ in todo), pool.map(lambda t: file_sha256(t[1]), todo)))


def check_finished(output: str, plan: plan_mod.Plan, totals: Totals | None = None, verify: bool = False,
                   hasher: Callable[[Sequence[tuple[int, str]]], dict[int, tuple[int, str]]] = hash_here,
                   progress: listing.Progress | None = None) -> dict[int, str]:
    """Shard id -> why it must be built: 'new' (no manifest) or why a finished one is not trusted
    ('tar missing', 'tar truncated', 'tar differs', 'retry segment_error', ...). Finished, whole
    shards are left out. One listing of the output, then `INDEX` (one GET) for the shards whose
    manifest is unchanged, and a manifest GET (`CHECK_THREADS` threads) for the others; with `verify`,
    `hasher` hashes the trusted tars (Ray tasks in the job). Each readable tally goes into `totals`."""
    totals = totals if totals is not None else Totals()
    manifests, tars = {}, {}
    for item in listing.iter_listing(output, (".json", ".tar"), progress):
        parent, _, name = item.uri.rpartition("/")
        if parent.endswith("/_manifest") and name.endswith(".json"):
            manifests[name] = item.stamp
        elif name.endswith(".tar") and parent.rstrip("/") == output.rstrip("/"):
            tars[name] = item
    if progress:
        progress.done()
    ids = range(len(plan.shards))
    stamps = {i: manifests[f"{plan_mod.shard_name(i)}.json"] for i in ids if f"{plan_mod.shard_name(i)}.json" in manifests}
    index = read_index(output, stamps) if stamps else {}
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        found = list(pool.map(lambda i: _why_not_done(output, i, manifests, tars, index, totals), ids))
    why = {i: w for i, (w, _) in zip(ids, found) if w}
    if verify:
        wanted = {i: h for i, (w, h) in zip(ids, found) if not w and h}
        got = hasher([(i, uri) for i, (uri, _, _) in wanted.items()])
        why.update({i: "tar differs" for i, (_, n, sha) in wanted.items() if got.get(i) != (n, sha)})
    return dict(sorted(why.items()))


def count_reasons(reasons: Sequence[str]) -> dict[str, int]:
    """'tar missing', 'tar missing', 'new' -> {'tar missing': 2} (new shards are not rebuilds)."""
    out: dict[str, int] = {}
    for r in reasons:
        if r != "new":
            out[r] = out.get(r, 0) + 1
    return dict(sorted(out.items()))


def exit_code(stats: dict[str, Any]) -> int:
    """The shared policy (samsr.locations): 0 when every good image is in a shard (known-bad ones are
    recorded), 1 when a good image failed (rerun to retry) or no image at all is in a shard."""
    return locations.exit_code(done=int(stats.get("ok", 0)), failed_good=int(stats.get("failed_good", 0)),
                               known_bad=int(stats.get("known_bad", 0)))


__all__ = ["RETRY_REASONS", "KNOWN_BAD", "INDEX", "Totals", "check_finished", "count_reasons", "exit_code",
           "file_sha256", "hash_here", "index_uri", "manifest_uri", "read_index", "shard_tally", "tar_uri"]

"""Resume of `samsr shard`: which finished shards can be trusted, and the job's exit code.

A shard is the unit of resume. Its manifest (`_manifest/shard-NNNNN.json`) is written last and records
the size (`tar_bytes`) and sha256 (`tar_sha256`) of its tar. On a rerun a shard counts as done only
when its manifest reads, its tar is there with that size and sha256, and none of its samples failed
for a reason a retry can fix (`RETRY_REASONS`); every other planned shard is built (again). Manifests
written before sha256 was recorded are checked by size alone.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from samsr import locations, storage
from samsr.images import REASONS as IMAGE_REASONS
from samsr.shards import plan as plan_mod

# a sample that failed for one of these is an input that should have worked: its shard is rebuilt on
# a rerun, and until then the job exits 1
RETRY_REASONS = ("read_error", "segment_error")
# inputs that cannot be used (bad bytes, too large/small, unusable keys): recorded, not job failures
KNOWN_BAD = (*IMAGE_REASONS, "unsafe_key", "duplicate_key")
CHECK_THREADS = 8
READ_CHUNK = 4 << 20


def manifest_uri(output: str, shard_id: int) -> str:
    return storage.join(output, "_manifest", f"{plan_mod.shard_name(shard_id)}.json")


def tar_uri(output: str, shard_id: int) -> str:
    return storage.join(output, f"{plan_mod.shard_name(shard_id)}.tar")


def file_sha256(fs, path: str) -> tuple[int, str]:
    """(bytes, hex sha256) of a file or object on a pyarrow filesystem, read in chunks (a shard need
    not fit in memory)."""
    digest, n = hashlib.sha256(), 0
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(READ_CHUNK):
            digest.update(chunk)
            n += len(chunk)
    return n, digest.hexdigest()


def _why_not_done(output: str, shard_id: int, listed: set[str], fs, root: str) -> str:
    """'' when the shard is finished and whole, else why it must be built (again)."""
    uri = manifest_uri(output, shard_id)
    if f"{plan_mod.shard_name(shard_id)}.json" not in listed:
        return "new"
    try:
        manifest = json.loads(storage.read_bytes(uri))
        want_bytes, want_sha = int(manifest["tar_bytes"]), manifest.get("tar_sha256")
        samples = manifest["samples"]
        retry = sorted({s["reason"] for s in samples if s["status"] != "ok" and s["reason"] in RETRY_REASONS})
    except (storage.StorageError, ValueError, KeyError, TypeError):
        return "manifest unreadable"
    if retry:
        return f"retry {'/'.join(retry)}"
    try:
        have = storage.size(tar_uri(output, shard_id))
    except storage.ObjectNotFound:
        return "tar missing"
    if have != want_bytes:
        return "tar truncated" if have < want_bytes else "tar size differs"
    if want_sha and file_sha256(fs, f"{root}/{plan_mod.shard_name(shard_id)}.tar") != (want_bytes, want_sha):
        return "tar differs"
    return ""


def check_finished(output: str, plan: plan_mod.Plan) -> dict[int, str]:
    """Shard id -> why it must be built: 'new' (no manifest) or why a finished one is not trusted
    ('tar missing', 'tar truncated', 'tar differs', 'retry segment_error', ...). Finished, whole
    shards are left out. Tars are hashed in `CHECK_THREADS` threads."""
    listed = {u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(output, "_manifest"), [".json"])}
    fs, root = storage.filesystem(output)
    ids = range(len(plan.shards))
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        why = list(pool.map(lambda i: _why_not_done(output, i, listed, fs, root), ids))
    return {i: w for i, w in zip(ids, why) if w}


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


__all__ = ["RETRY_REASONS", "KNOWN_BAD", "check_finished", "count_reasons", "exit_code", "file_sha256",
           "manifest_uri", "tar_uri"]

"""Listings that scale: a folder or S3 prefix as a sorted stream, with a progress line, and a listing
file that replaces LIST for buckets of 10⁷ objects.

`iter_listing(uri)` yields `Listed(uri, size, stamp)` in key order without holding the listing: on S3,
pages of 1,000 keys from ListObjectsV2 (boto3; endpoint, region and credentials as `samsr.storage`
takes them, never logged); locally, a walk that yields full paths in sorted string order (the order
S3 lists in). `stamp` is what says that an object has not changed since it was recorded, without
reading it: the ETag on S3, the modification time in ns locally. `stat(uri)` gives the same for one
object (what a writer records). A `Progress` logs objects listed and the rate every few seconds, so
that a listing of millions of keys is never a silent wait.

`read_listing_file(path, base)` streams the URIs of a listing file instead: one key or URI per line
(`.txt`), an S3 Inventory CSV (bucket, URL-encoded key, ...; `.csv` or `.csv.gz`) or an S3 Inventory /
any Parquet file with a `key` column; keys outside `base` are left out. Its order is the file's.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import os
import time
from typing import Iterator, NamedTuple, Sequence
from urllib.parse import unquote_plus

from samsr import storage, timeouts

log = logging.getLogger(__name__)
PAGE = 1000                  # keys per ListObjectsV2 request (the S3 maximum)
PROGRESS_EVERY_S = 5.0


class Listed(NamedTuple):
    uri: str
    size: int
    stamp: str               # S3: the ETag without quotes; local: mtime in ns


class Progress:
    """Counts listed objects; logs `<label>: N objects listed (R/s)` at most every `every_s` seconds,
    and a last line from `done()` when the listing took longer than that."""

    def __init__(self, label: str, every_s: float = PROGRESS_EVERY_S) -> None:
        self.label, self.every_s, self.count = label, every_s, 0
        self.t0 = self.last = time.monotonic()

    def add(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %d objects listed (%.0f/s)", self.label, self.count, self.count / max(now - self.t0, 1e-9))

    def done(self) -> None:
        took = time.monotonic() - self.t0
        if took >= self.every_s:
            log.info("%s: %d objects listed in %.0f s", self.label, self.count, took)


@functools.lru_cache(maxsize=8)
def _client(pid: int, endpoint: str | None, region_name: str, waits: tuple[float, float], attempts: int):
    import boto3
    from botocore.config import Config

    cfg = Config(region_name=region_name, connect_timeout=waits[0], read_timeout=waits[1],
                 retries={"mode": "standard", "total_max_attempts": attempts},
                 s3={"addressing_style": "path"} if endpoint else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


def s3_client(waits: tuple[float, float] | None = None, attempts: int = storage.S3_MAX_ATTEMPTS):
    """A boto3 S3 client for this process, built from the environment the way `samsr.storage` is:
    `waits` (connect, read) default to samsr.timeouts.s3(), `attempts` counts retries included."""
    return _client(os.getpid(), storage.endpoint_url(), storage.region(), waits or timeouts.s3(), attempts)


def _keep(name: str, suffixes: Sequence[str] | None) -> bool:
    return not name.endswith(storage._TMP_SUFFIX) and storage._matches(name, suffixes)


def _walk_sorted(root: str) -> Iterator[os.DirEntry]:
    """Files under `root` in sorted full-path order: a directory `d` sorts as `d/` among its siblings."""
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except FileNotFoundError:
        return
    entries.sort(key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(entry.path)
        elif entry.is_file():
            yield entry


def _s3_pages(uri: str, start_after: str = "") -> Iterator[list[dict]]:
    bucket, key = storage._split(uri)
    prefix = key if not key or key.endswith("/") else key + "/"
    kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE}
    if start_after:
        kwargs["StartAfter"] = start_after
    client = s3_client()
    with storage._mapped("list", uri):
        try:
            for page in client.get_paginator("list_objects_v2").paginate(**kwargs):
                yield page.get("Contents", [])
        except client.exceptions.NoSuchBucket:
            return
        except Exception as exc:          # botocore errors are not OSErrors: name the URI and endpoint
            if type(exc).__module__.startswith("botocore"):
                raise storage.StorageError(f"list failed for {storage._where(uri)}: {exc}") from exc
            raise


def iter_listing(uri: str, suffixes: Sequence[str] | None = None, progress: Progress | None = None
                 ) -> Iterator[Listed]:
    """Files under a folder / s3:// prefix, recursively, in sorted key order, streamed (see module doc).
    A missing folder, prefix or bucket yields nothing; temp files of unfinished writes and S3 `dir/`
    markers are left out; `suffixes` filters case-insensitively."""
    if isinstance(suffixes, str):
        suffixes = [suffixes]
    if not storage.is_s3(uri):
        if os.path.isfile(uri):
            if _keep(uri, suffixes):
                st = os.stat(uri)
                yield Listed(uri, st.st_size, str(st.st_mtime_ns))
            return
        for entry in _walk_sorted(uri):
            if progress:
                progress.add()
            if _keep(entry.name, suffixes):
                st = entry.stat()
                yield Listed(entry.path, st.st_size, str(st.st_mtime_ns))
        return
    bucket, key = storage._split(uri)
    listed = False
    for page in _s3_pages(uri):
        if progress:
            progress.add(len(page))
        for obj in page:
            listed = True
            if obj["Key"].endswith("/") or not _keep(obj["Key"], suffixes):
                continue
            yield Listed(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))
    if not listed and key.strip("/") and not key.endswith("/") and _keep(key, suffixes):
        try:                                 # the URI names one object, not a prefix
            yield stat(uri)
        except storage.ObjectNotFound:
            pass


def stat(uri: str) -> Listed:
    """One object's `Listed` (size and stamp as a listing gives them); ObjectNotFound when missing."""
    if not storage.is_s3(uri):
        try:
            st = os.stat(uri)
        except FileNotFoundError:
            raise storage.ObjectNotFound(f"stat: no such file {os.path.abspath(uri)}") from None
        return Listed(uri, st.st_size, str(st.st_mtime_ns))
    bucket, key = storage._split(uri)
    client = s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise storage.ObjectNotFound(f"stat: no such object {storage._where(uri)}") from None
        raise storage.StorageError(f"stat failed for {storage._where(uri)}: {exc}") from exc
    return Listed(uri, int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))


def uris(uri: str, suffixes: Sequence[str] | None, label: str, limit: int = 0) -> Iterator[str]:
    """`iter_listing`'s URIs, the first `limit` when > 0 (the LIST stops there), with a `Progress` line
    labelled `<label> <uri>` every few seconds and a last one when it took longer."""
    progress = Progress(f"{label} {uri}")
    for n, item in enumerate(iter_listing(uri, suffixes, progress), 1):
        yield item.uri
        if 0 < limit <= n:
            break
    progress.done()


def fingerprint(text: str) -> int:
    """A 128-bit hash of a key: what a driver keeps of each of millions of keys (~80 bytes in a set, vs
    ~200 for the key itself); two keys share one with probability ~n²/2¹²⁹ (nil at 10⁷ keys)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest(), "big")


# ---------------------------------------------------------------- listing files (S3 Inventory)

def _text_lines(data: bytes, name: str) -> Iterator[str]:
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    for line in io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"):
        if line.strip():
            yield line.rstrip("\r\n")


def _inventory_rows(path: str) -> Iterator[tuple[str, str]]:
    """(bucket or '', key) rows of a listing file."""
    import csv

    name = path.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with storage.open_read(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("bucket", "key") if c in pf.schema_arrow.names]
            if "key" not in cols:
                raise ValueError(f"listing file {path}: a Parquet listing needs a 'key' column "
                                 f"(has {pf.schema_arrow.names[:8]})")
            for batch in pf.iter_batches(batch_size=10_000, columns=cols):
                d = batch.to_pydict()
                for i, key in enumerate(d["key"]):
                    yield (d["bucket"][i] if "bucket" in d else ""), key
        return
    data = storage.read_bytes(path)
    if name.endswith((".csv", ".csv.gz")):       # S3 Inventory CSV: "bucket","url-encoded key",size,...
        for row in csv.reader(_text_lines(data, name)):
            if len(row) >= 2:
                yield row[0], unquote_plus(row[1])
        return
    for line in _text_lines(data, name):
        yield "", line


def read_listing_file(path: str, base: str, suffixes: Sequence[str] | None = None,
                      progress: Progress | None = None) -> Iterator[str]:
    """URIs under `base` named by a listing file (see module doc). A line may be a key relative to the
    bucket of `base` (S3 Inventory) or a full URI / absolute path; entries outside `base` are left out."""
    base = base.rstrip("/")
    bucket = storage._split(base)[0] if storage.is_s3(base) else ""
    for row_bucket, key in _inventory_rows(path):
        if progress:
            progress.add()
        if storage.is_s3(key) or key.startswith("/"):
            uri = key
        elif bucket and row_bucket in ("", bucket):
            uri = f"s3://{bucket}/{key}"
        else:
            uri = os.path.join(base, key)
        if (uri.startswith(base + "/") or uri == base) and _keep(uri, suffixes) and not uri.endswith("/"):
            yield uri


__all__ = ["Listed", "Progress", "iter_listing", "uris", "fingerprint", "stat", "s3_client", "read_listing_file", "PAGE"]

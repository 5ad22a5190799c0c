"""Storage memory and speed: write a large object with `storage.open_write` (streamed from a generator of
chunks) and read it back with `storage.open_read` in chunks, against a local S3 endpoint (moto, started
here on 127.0.0.1) and a local file; report MB/s and the peak RSS growth of this process for each.

    .venv/bin/python benchmarks/storage_memory.py [--size-mb 200] [--chunk-mb 1] [--read-chunk-mb 8]

The budget is a peak RSS growth under 64 MB for any object size (issue 8): the writer spools S3
streams to a local temp file and uploads them as a multipart upload, one 10 MB part in memory; reads are
ranged GETs. The S3 object's ETag (`<md5>-<parts>`) shows the upload was multipart. Also timed:
`storage.copy_to_local` of the S3 object (streamed download). Peak RSS is the kernel's VmHWM, reset
before each step (/proc/self/clear_refs), and a 5 ms sampler as a cross-check. Prints one JSON line per
step and a summary; the numbers go to benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipelines.local import services
from samsr import storage

MB = 1 << 20
BUDGET_MB = 64


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakRSS:
    """Peak resident memory growth of this process over a `with` block, in MB."""

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.base = _status_kb("VmRSS")
        self.sampled, self._stop = self.base, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, _status_kb("VmRSS"))

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        peak = max(self.sampled, _status_kb("VmRSS"), _status_kb("VmHWM") if self.hwm_reset else 0)
        self.growth_mb = (peak - self.base) / 1024


def chunks(total: int, size: int):
    """`total` bytes in `size`-byte chunks; distinct content per chunk, cheap to make."""
    block = hashlib.sha256(b"samsr").digest() * (size // 32 + 1)
    for i, start in enumerate(range(0, total, size)):
        n = min(size, total - start)
        yield i.to_bytes(8, "little") + block[8:n] if n > 8 else block[:n]


def measure(target: str, uri: str, size: int, chunk: int, read_chunk: int, extra: dict) -> list[dict]:
    rows = []
    want = hashlib.sha256()
    with PeakRSS() as w:
        with storage.open_write(uri) as f:
            for c in chunks(size, chunk):
                want.update(c)
                f.write(c)
    rows.append({"target": target, "step": "open_write", **extra})
    got, n = hashlib.sha256(), 0
    with PeakRSS() as r:
        with storage.open_read(uri) as f:
            while block := f.read(read_chunk):
                got.update(block)
                n += len(block)
    if n != size or got.hexdigest() != want.hexdigest():
        raise SystemExit(f"{target}: read back {n} bytes, checksum {got.hexdigest()[:12]} != {want.hexdigest()[:12]}")
    rows.append({"target": target, "step": "open_read", "sha256_ok": True})
    for row, m in zip(rows, (w, r)):
        row.update(mb=size // MB, seconds=round(m.seconds, 2), mb_per_s=round(size / MB / m.seconds, 1),
                   rss_growth_mb=round(m.growth_mb, 1))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--chunk-mb", type=float, default=1.0, help="size of the writer's chunks")
    p.add_argument("--read-chunk-mb", type=float, default=8.0, help="size of each read")
    args = p.parse_args()
    size, chunk, read_chunk = args.size_mb * MB, int(args.chunk_mb * MB), int(args.read_chunk_mb * MB)
    work = Path(tempfile.mkdtemp(prefix="samsr-storage-bench-"))
    moto = services.start_moto(work / "moto")
    os.environ.update(AWS_ENDPOINT_URL=moto.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get(var, "")]))
    rows = []
    try:
        parsed = urlparse(moto.url)
        pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme,
                          allow_bucket_creation=True).create_dir("bench")
        rows += measure("local", str(work / "local" / "big.bin"), size, chunk, read_chunk, {})
        uri = "s3://bench/big.bin"
        s3_rows = measure("s3", uri, size, chunk, read_chunk, {})
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            etag = f.metadata().get("ETag", b"").decode().strip('"')
        s3_rows[0].update(etag=etag, multipart_parts=int(etag.rsplit("-", 1)[1]) if "-" in etag else 0)
        rows += s3_rows
        with PeakRSS() as d:
            storage.copy_to_local(uri, work / "download" / "big.bin")
        rows.append({"target": "s3", "step": "copy_to_local", "mb": size // MB, "seconds": round(d.seconds, 2),
                     "mb_per_s": round(size / MB / d.seconds, 1), "rss_growth_mb": round(d.growth_mb, 1)})
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        print(json.dumps(row))
    print(f"\n{args.size_mb} MB object, {args.chunk_mb:g} MB write chunks, {args.read_chunk_mb:g} MB reads "
          f"({platform.machine()}, {os.cpu_count()} CPUs); budget: peak RSS growth < {BUDGET_MB} MB")
    print(f"{'target':6} {'step':14} {'MB/s':>7} {'RSS +MB':>8}  verdict")
    for row in rows:
        verdict = "ok" if row["rss_growth_mb"] < BUDGET_MB else "OVER BUDGET"
        note = f"  (ETag ...-{row['multipart_parts']}: multipart)" if row.get("multipart_parts") else ""
        print(f"{row['target']:6} {row['step']:14} {row['mb_per_s']:7.1f} {row['rss_growth_mb']:8.1f}  {verdict}{note}")


if __name__ == "__main__":
    main()

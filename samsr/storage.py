"""The one place that turns `s3://bucket/key` or local paths into I/O (DESIGN.md "storage.py").

S3 goes through one pyarrow `S3FileSystem` per process, the one `filesystem()` also hands Ray Data:
endpoint from `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL` (MinIO, moto, R2...), region from
`AWS_DEFAULT_REGION`/`AWS_REGION` (else the bucket's own), credentials from the AWS default chain (never
logged), retries by the AWS SDK's standard strategy (throttling, 5xx, dropped connections). Reads stream
(ranged GETs); objects over one part (10 MB) go up as multipart uploads, one part in memory at a time.
Writes are atomic: local ones go to a short hidden temp name, then os.replace; an S3 object appears
only whole. pyarrow cannot abort an upload it has started (its streams complete on close, even from a
destructor: apache/arrow#40502), so `open_write` spools to a local temp file and uploads on a clean exit.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from samsr import timeouts

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".samsr-tmp"   # in-progress local writes and S3 spools; never listed
CHUNK = 8 << 20              # bytes per streamed copy request; in-memory spool limit of open_write
READ_BUFFER = 1 << 20        # open_read's buffer: small reads fetch this much (larger reads go straight)
S3_MAX_ATTEMPTS = 4          # per request, retries included (AwsStandardS3RetryStrategy); AWS_MAX_ATTEMPTS wins
_MISSING_MARKS = ("NO_SUCH_BUCKET", "NO_SUCH_KEY", "RESOURCE_NOT_FOUND")


class StorageError(OSError):
    """A storage operation failed; the message names the URI (and S3 endpoint)."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object or file does not exist. Never retried."""


# ---------------------------------------------------------------- URIs and keys

def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _split(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket; write s3://BUCKET/KEY")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local directory or an s3:// prefix, with `/` separators.

    Leading slashes of parts are dropped so a part never escapes `base` to the root; untrusted keys
    should go through `safe_key` first (it also rejects `..`).
    """
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return base
    if is_s3(base):
        return base.rstrip("/") + "/" + tail
    return str(Path(base, tail)) if base else tail


def safe_key(key: str) -> str:
    """Validate a relative key before mirroring it to a local path or another prefix.

    `./a//b.png` -> `a/b.png`; rejects empty keys, absolute paths, `..`, backslashes, control chars.
    """
    why = None
    if not key:
        why = "is empty"
    elif any(ord(c) < 32 or ord(c) == 127 for c in key):
        why = "contains a NUL or control character"
    elif "\\" in key:
        why = "contains a backslash (use / as the separator)"
    elif key.startswith("/"):
        why = "is absolute (keys must be relative)"
    else:
        parts = [p for p in key.split("/") if p not in ("", ".")]
        if ".." in parts:
            why = "contains a '..' component"
        elif not parts:
            why = "names no file"
    if why:
        raise StorageError(f"unsafe key {key!r}: it {why}; keys must be relative paths like 'dir/img.png'")
    return "/".join(p for p in key.split("/") if p not in ("", "."))


def relative_key(base: str, uri: str) -> str:
    """The key of `uri` under `base` (`s3://b/in`, `s3://b/in/x/y.png` -> `x/y.png`), validated."""
    if is_s3(base) != is_s3(uri):
        raise StorageError(f"{uri!r} is not under {base!r}: one is s3:// and the other is local")
    if is_s3(base):
        prefix, path = base.rstrip("/") + "/", uri
    else:
        prefix, path = os.path.abspath(base).rstrip(os.sep) + os.sep, os.path.abspath(uri)
    if not path.startswith(prefix):
        raise StorageError(f"{uri!r} is not under {base!r}")
    return safe_key(path[len(prefix):])


# ---------------------------------------------------------------- the S3 filesystem and its errors

def endpoint_url() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    try:   # one unauthenticated HEAD to AWS; only when neither the region nor an endpoint is set
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError):
        return "us-east-1"


@functools.lru_cache(maxsize=16)
def _s3_for(pid: int, endpoint: str | None, region_name: str, identity: str, attempts: int,
            waits: tuple[float, float]) -> pafs.S3FileSystem:
    # Keyed by pid (the AWS SDK must not cross a fork) and by the environment it was built from.
    kwargs: dict = dict(region=region_name, connect_timeout=waits[0], request_timeout=waits[1],
                        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                        background_writes=False,   # True queues every part in memory until it is sent
                        allow_delayed_open=True)   # an object under one part is a single PUT
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**kwargs)


def _s3(bucket: str) -> pafs.S3FileSystem:
    pinned = endpoint_url() or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    identity = hashlib.sha256(f"{os.environ.get('AWS_PROFILE', '')}|{os.environ.get('AWS_ACCESS_KEY_ID', '')}"
                              .encode()).hexdigest()
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)
    return _s3_for(os.getpid(), endpoint_url(), region() if pinned else _bucket_region(bucket), identity, attempts,
                   timeouts.s3())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `uri` and the path inside it (`bucket/key` on S3), e.g. for Ray Data."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    bucket, key = _split(uri)
    return _s3(bucket), f"{bucket}/{key}".rstrip("/")


def _object(uri: str, what: str) -> tuple[pafs.FileSystem, str]:
    """`filesystem(uri)` for a URI that must name an object, not a bare bucket."""
    fs, path = filesystem(uri)
    if "/" not in path:
        raise StorageError(f"{what}: {uri!r} names a bucket, not an object")
    return fs, path


def _where(uri: str) -> str:
    return f"{uri} (endpoint {endpoint_url() or 'AWS default'})" if is_s3(uri) else os.path.abspath(uri)


def is_missing(exc: BaseException) -> bool:
    """True for 'no such object/file/bucket' errors (pyarrow's and the OS's)."""
    return isinstance(exc, FileNotFoundError) or any(m in str(exc) for m in _MISSING_MARKS)


@contextlib.contextmanager
def _mapped(what: str, uri: str) -> Iterator[None]:
    """Turn OS/pyarrow errors into ObjectNotFound/StorageError naming the URI and endpoint."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        if is_missing(exc):
            raise ObjectNotFound(f"{what}: no such {'object' if is_s3(uri) else 'file'} {_where(uri)}") from exc
        raise StorageError(f"{what} failed for {_where(uri)}: {exc}") from exc


# ---------------------------------------------------------------- streams

def open_read(uri: str) -> BinaryIO:
    """A readable, seekable binary stream over `uri` (use `with`); a missing object fails here. On S3 each
    read is one ranged GET (small ones fetch `READ_BUFFER` bytes): memory stays bounded at any size."""
    if not is_s3(uri):
        with _mapped("read", uri):
            return open(uri, "rb")
    fs, path = _object(uri, "read")
    with _mapped("read", uri):
        return io.BufferedReader(fs.open_input_file(path), buffer_size=READ_BUFFER)   # HEAD, no GET yet


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    """`with open_write(uri) as f: f.write(chunk)`: the object/file appears, whole, only when the block
    exits cleanly; after an exception nothing was written. Memory stays bounded: a local file is written
    as you go (temp name, then renamed); an S3 stream is spooled to a hidden temp file under TMPDIR and
    uploaded at the end, as one PUT up to `CHUNK` bytes, else as a multipart upload."""
    if not is_s3(uri):
        path = Path(uri)
        with _mapped("write", uri):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_path(path)
            f = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")   # umask applies
        try:
            with f:
                yield f
                with _mapped("write", uri):
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)   # same directory, just written: nothing to map
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = _object(uri, "write")
    with tempfile.NamedTemporaryFile(prefix=".", suffix=_TMP_SUFFIX) as spool:
        yield spool
        spool.flush()
        with _mapped("write", uri):
            if os.fstat(spool.fileno()).st_size <= CHUNK:
                _put(fs, path, Path(spool.name).read_bytes())
            else:   # one C++ call streams the spool into a multipart upload, one part in memory
                pafs.copy_files(spool.name, path, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs, chunk_size=CHUNK)


def _put(fs: pafs.S3FileSystem, path: str, data) -> None:
    # One write call, then close: no code of ours runs between parts, so the object appears whole or not at
    # all (a failed part fails the close). `data` is checked first: an opened stream is published on close.
    view = memoryview(data)
    with fs.open_output_stream(path) as out:
        out.write(view)


def _tmp_path(path: Path) -> Path:
    """A short, hidden, unique temp name next to `path` (same file system, so the rename is atomic). Its
    length does not depend on the target's, so any name the file system accepts can be written."""
    return path.with_name(f".{secrets.token_hex(6)}{_TMP_SUFFIX}")


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:   # on S3: one HEAD and one GET
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: readers see the old object or the whole new one (temp + rename / one upload)."""
    if not is_s3(uri):
        with open_write(uri) as f, _mapped("write", uri):
            f.write(data)
        return
    fs, path = _object(uri, "write")
    with _mapped("write", uri):
        _put(fs, path, data)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def copy_to_local(uri: str, dest: str | os.PathLike) -> Path:
    """Copy the object/file at `uri` to the local path `dest` in `CHUNK`-sized pieces (never the whole
    object in memory); `dest` appears only when complete (temp name, then renamed)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dest)
    try:
        with _mapped("download", uri):
            if is_s3(uri):
                fs, path = _object(uri, "download")
                with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
            else:
                shutil.copyfile(uri, tmp)
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def exists(uri: str) -> bool:
    """True if an object/file exists at `uri` (prefixes are not objects; a bare `s3://bucket` is)."""
    if not is_s3(uri):
        return os.path.isfile(uri)
    fs, path = filesystem(uri)
    with _mapped("exists", uri):
        kind = fs.get_file_info(path).type
    return kind == pafs.FileType.File or (kind == pafs.FileType.Directory and "/" not in path)


def size(uri: str) -> int:
    """Size in bytes of the object/file at `uri`."""
    if not is_s3(uri):
        with _mapped("size", uri):
            return os.path.getsize(uri)
    fs, path = _object(uri, "size")
    with _mapped("size", uri):
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(path)
        return int(info.size)


def delete(uri: str) -> None:
    """Delete one object/file; no error if it is already gone. (On S3 pyarrow then leaves an empty
    `parent/` marker object when the prefix would otherwise vanish; `list_files` never returns those.)"""
    try:
        with _mapped("delete", uri):
            if is_s3(uri):
                fs, path = _object(uri, "delete")
                fs.delete_file(path)
            else:
                os.remove(uri)
    except ObjectNotFound:
        pass


def _matches(name: str, suffixes: Sequence[str] | None) -> bool:
    return suffixes is None or name.lower().endswith(tuple(s.lower() for s in suffixes))


def list_files(uri: str, suffixes: Sequence[str] | None = None) -> list[str]:
    """All files under a directory / s3:// prefix, recursively, as sorted full URIs. `suffixes` filters
    case-insensitively (`[".png", ".jpg"]`); a missing prefix or bucket gives []; a `uri` that is itself a
    file/object gives [uri]. Temp files of unfinished writes and S3 `dir/` markers are never listed."""
    if isinstance(suffixes, str):
        suffixes = [suffixes]
    if not is_s3(uri):
        if os.path.isfile(uri):
            return [uri] if _matches(uri, suffixes) else []
        out = []
        for root, dirs, files in os.walk(uri):
            dirs.sort()
            out.extend(os.path.join(root, f) for f in files
                       if not f.endswith(_TMP_SUFFIX) and _matches(f, suffixes))
        return sorted(out)
    fs, path = filesystem(uri)
    with _mapped("list", uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    out = [f"s3://{i.path}" for i in infos if i.type == pafs.FileType.File
           and not i.path.endswith(_TMP_SUFFIX) and _matches(i.path, suffixes)]
    if not infos and _split(uri)[1].strip("/") and exists(uri):
        out = [uri] if _matches(uri, suffixes) else []
    return sorted(out)


# ---------------------------------------------------------------- local copies (SAM checkpoints)

def default_cache_dir() -> Path:
    return Path(os.environ.get("SAMSR_CACHE_DIR") or Path.home() / ".cache" / "samsr")


def fetch_to_local(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for `uri`: local paths as they are; s3:// objects downloaded once into a cache.

    The cache entry is keyed by a hash of endpoint + URI and keeps the object's file name; a cached
    copy is returned without contacting S3. Downloads stream to a temp name and are renamed when whole.
    """
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise ObjectNotFound(f"no such file: looked at {path.resolve()} (from {uri!r})")
        return path
    _, key = _split(uri)
    digest = hashlib.sha256(f"{endpoint_url() or ''}|{uri}".encode()).hexdigest()[:24]
    target = Path(cache_dir or default_cache_dir()).expanduser() / digest / (Path(key).name or "object")
    if target.is_file():
        return target
    copy_to_local(uri, target)
    log.info("downloaded %s to %s", _where(uri), target)
    return target


__all__ = [
    "StorageError", "ObjectNotFound", "is_s3", "join", "safe_key", "relative_key", "filesystem",
    "read_bytes", "write_bytes", "read_text", "write_text", "open_read", "open_write", "copy_to_local",
    "exists", "size", "delete", "list_files", "fetch_to_local", "default_cache_dir",
    "is_missing", "endpoint_url", "region", "CHUNK",
]

"""The one place that turns `s3://bucket/key` or local paths into I/O (DESIGN.md "storage.py").

S3 goes through boto3 (precise error codes for retries, one PUT per write, multipart download for
large checkpoints); `filesystem()` hands pyarrow a matching filesystem for Ray Data. The endpoint
comes from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (MinIO, moto, R2...), the region from
`AWS_DEFAULT_REGION`/`AWS_REGION` (default us-east-1); credentials come from the usual boto3 chain
and are never logged. Local writes are atomic (a short hidden temp name in the same directory, then
os.replace).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import secrets
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")

_TMP_SUFFIX = ".samsr-tmp"   # in-progress local writes; never listed
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                    "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
                    "InternalError", "ServiceUnavailable", "500", "502", "503", "504"}


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


# ---------------------------------------------------------------- retries

def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = str(err.get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code or status
    return ""


def is_missing(exc: BaseException) -> bool:
    """True for 'no such object/file' errors, which are never retried."""
    return isinstance(exc, FileNotFoundError) or _error_code(exc) in _MISSING_CODES


def is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx and dropped connections: worth another attempt."""
    if is_missing(exc):
        return False
    if _error_code(exc) in _TRANSIENT_CODES:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):   # incl. ConnectionResetError
        return True
    try:
        import botocore.exceptions as bce
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    return isinstance(exc, (bce.ConnectionError, bce.HTTPClientError, bce.ResponseStreamingError))


_JITTER = random.Random()   # backoff jitter only; never feeds results


def with_retries(fn: Callable[[], T], attempts: int = 5, *, base_delay: float = 0.2,
                 max_delay: float = 10.0, what: str = "",
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> T:
    """Call `fn()`; on a transient error retry with exponential backoff and full jitter.

    Waits uniform(0, min(max_delay, base_delay * 2**i)) before retry i+1; at most `attempts` calls.
    Missing objects and other errors propagate at once.
    """
    if attempts < 1:
        raise ValueError(f"attempts={attempts} must be >= 1")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = (rng or _JITTER).uniform(0.0, min(max_delay, base_delay * 2 ** (attempt - 1)))
            log.warning("transient storage error on %s (attempt %d/%d, retry in %.2fs): %s",
                        what or "storage call", attempt, attempts, delay, _error_code(exc) or type(exc).__name__)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------- S3 clients

def endpoint_url() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def _where(uri: str) -> str:
    return f"{uri} (endpoint {endpoint_url() or 'AWS default'})"


@functools.lru_cache(maxsize=8)
def _client_for(pid: int, endpoint: str | None, region_name: str, identity: str):
    # Keyed by pid (clients must not cross a fork) and by the environment they were built from.
    import boto3
    from botocore.config import Config

    cfg = Config(region_name=region_name, connect_timeout=10, read_timeout=60,
                 retries={"total_max_attempts": 1, "mode": "standard"},   # with_retries decides
                 s3={"addressing_style": "path"} if endpoint else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


def _client():
    identity = hashlib.sha256(f"{os.environ.get('AWS_PROFILE', '')}|{os.environ.get('AWS_ACCESS_KEY_ID', '')}"
                              .encode()).hexdigest()
    return _client_for(os.getpid(), endpoint_url(), region(), identity)


def _s3_call(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Run an S3 call with retries, mapping failures to StorageError/ObjectNotFound naming the URI."""
    try:
        return with_retries(fn, what=f"{what} {uri}")
    except Exception as exc:
        if is_missing(exc):
            raise ObjectNotFound(f"{what}: no such object {_where(uri)}") from exc
        raise StorageError(f"{what} failed for {_where(uri)}: {_error_code(exc) or exc}") from exc


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `uri` and the path inside it (`bucket/key` on S3), e.g. for Ray Data."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    bucket, key = _split(uri)
    kwargs: dict = {"region": region(), "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5)}
    endpoint = endpoint_url()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


# ---------------------------------------------------------------- bytes in and out

def _tmp_path(path: Path) -> Path:
    """A short, hidden, unique temp name next to `path` (same file system, so the rename is atomic). Its
    length does not depend on the target's, so any name the file system accepts can be written."""
    return path.with_name(f".{secrets.token_hex(6)}{_TMP_SUFFIX}")


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = _split(uri)
        return _s3_call(uri, "read", lambda: _client().get_object(Bucket=bucket, Key=key)["Body"].read())
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"read: no such file {os.path.abspath(uri)}") from exc
    except OSError as exc:
        raise StorageError(f"read failed for {uri}: {exc}") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: readers see the old object or the whole new one (one PUT / temp + rename)."""
    if is_s3(uri):
        bucket, key = _split(uri)
        if not key:
            raise StorageError(f"write: {uri!r} names a bucket, not an object")
        _s3_call(uri, "write", lambda: _client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    path = Path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # umask applies
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise StorageError(f"write failed for {uri}: {exc}") from exc


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def exists(uri: str) -> bool:
    """True if an object/file exists at `uri` (directories and prefixes are not objects)."""
    if not is_s3(uri):
        return os.path.isfile(uri)
    bucket, key = _split(uri)
    try:
        if key:
            _s3_call(uri, "exists", lambda: _client().head_object(Bucket=bucket, Key=key))
        else:
            _s3_call(uri, "exists", lambda: _client().head_bucket(Bucket=bucket))
        return True
    except ObjectNotFound:
        return False


def size(uri: str) -> int:
    """Size in bytes of the object/file at `uri`."""
    if is_s3(uri):
        bucket, key = _split(uri)
        return int(_s3_call(uri, "size", lambda: _client().head_object(Bucket=bucket, Key=key))["ContentLength"])
    try:
        return os.path.getsize(uri)
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"size: no such file {os.path.abspath(uri)}") from exc


def delete(uri: str) -> None:
    """Delete one object/file; no error if it is already gone."""
    if is_s3(uri):
        bucket, key = _split(uri)
        _s3_call(uri, "delete", lambda: _client().delete_object(Bucket=bucket, Key=key))
        return
    try:
        os.remove(uri)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(f"delete failed for {uri}: {exc}") from exc


def _matches(name: str, suffixes: Sequence[str] | None) -> bool:
    return suffixes is None or name.lower().endswith(tuple(s.lower() for s in suffixes))


def list_files(uri: str, suffixes: Sequence[str] | None = None) -> list[str]:
    """All files under a directory / s3:// prefix, recursively, as sorted full URIs.

    `suffixes` filters case-insensitively (`[".png", ".jpg"]`); a missing prefix gives []. A `uri`
    that is itself a file/object gives [uri].
    """
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
    bucket, key = _split(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""

    def page_all() -> list[str]:
        keys = []
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    try:
        keys = _s3_call(uri, "list", page_all)
    except ObjectNotFound:  # missing bucket
        return []
    out = [f"s3://{bucket}/{k}" for k in keys if not k.endswith("/") and _matches(k, suffixes)]
    if not keys and key and exists(uri):
        out = [uri] if _matches(key, suffixes) else []
    return sorted(out)


# ---------------------------------------------------------------- local copies (SAM checkpoints)

def default_cache_dir() -> Path:
    return Path(os.environ.get("SAMSR_CACHE_DIR") or Path.home() / ".cache" / "samsr")


def fetch_to_local(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for `uri`: local paths as they are; s3:// objects downloaded once into a cache.

    The cache entry is keyed by a hash of endpoint + URI and keeps the object's file name; a cached
    copy is returned without contacting S3. Downloads go to a temp name and are renamed when whole.
    """
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise ObjectNotFound(f"no such file: looked at {path.resolve()} (from {uri!r})")
        return path
    bucket, key = _split(uri)
    digest = hashlib.sha256(f"{endpoint_url() or ''}|{uri}".encode()).hexdigest()[:24]
    target = Path(cache_dir or default_cache_dir()).expanduser() / digest / (Path(key).name or "object")
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(target)
    try:
        _s3_call(uri, "download", lambda: _client().download_file(bucket, key, str(tmp)))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("downloaded %s to %s", _where(uri), target)
    return target


__all__ = [
    "StorageError", "ObjectNotFound", "is_s3", "join", "safe_key", "relative_key", "filesystem",
    "read_bytes", "write_bytes", "read_text", "write_text", "exists", "size", "delete", "list_files",
    "fetch_to_local", "default_cache_dir", "with_retries", "is_transient", "is_missing",
    "endpoint_url", "region",
]

"""Up-front checks of a job's input and output locations (folder or s3:// prefix), and the exit codes
the jobs share: each check fails in seconds with one line naming what was wrong and where it looked.

    refuse_overlap("s3://b/in", "s3://b/in/sr")   # LocationError: the output is inside the input ...
    require_input("s3://missing-bucket/x")          # LocationError: ... bucket does not exist ...
"""
from __future__ import annotations

import os
from typing import Collection, Iterable, Mapping

from samsr import storage, timeouts

EXIT_OK = 0            # every good input is done (now or by an earlier run); bad inputs are recorded
EXIT_INCOMPLETE = 1    # a good input could not be done, or nothing was done (no inputs, all failed)
EXIT_USAGE = 2         # refused before any work: config, location, model or service errors



class LocationError(ValueError):
    """An input or output location is missing, unreachable or unsafe; the message is one line."""


def normalize(uri: str) -> str:
    """A comparable form: absolute, normalised local paths; `s3://bucket/key` without `//` or a trailing `/`."""
    uri = str(uri)
    if storage.is_s3(uri):
        bucket, key = storage._split(uri)
        parts = [p for p in key.split("/") if p not in ("", ".")]
        return "s3://" + "/".join([bucket, *parts])
    return os.path.normpath(os.path.abspath(os.path.expanduser(uri)))


def _inside(child: str, parent: str) -> bool:
    sep = "/" if storage.is_s3(parent) else os.sep
    return child == parent or child.startswith(parent.rstrip(sep) + sep)


def refuse_overlap(input_uri: str, output_uri: str, *, job: str = "samsr") -> None:
    """Refuse an output equal to the input, inside it, or holding it (folders and s3:// prefixes):
    a rerun would read its own outputs, or overwrite its inputs."""
    a, b = normalize(input_uri), normalize(output_uri)
    if storage.is_s3(a) != storage.is_s3(b):
        return
    if a == b:
        raise LocationError(f"{job}: the output {output_uri!r} is the input {input_uri!r}; "
                            "write to a separate folder or prefix")
    if _inside(b, a):
        raise LocationError(f"{job}: the output {output_uri!r} is inside the input {input_uri!r}; a rerun "
                            "would read its own outputs as inputs: write to a folder or prefix outside it")
    if _inside(a, b):
        raise LocationError(f"{job}: the input {input_uri!r} is inside the output {output_uri!r}; "
                            "write to a folder or prefix that does not hold the inputs")


def _head_bucket(uri: str) -> None:
    """Head the bucket of `uri` with a short timeout and no retries; LocationError on any failure."""
    import botocore.exceptions as bce

    from samsr import listing

    bucket, _ = storage._split(uri)
    endpoint = storage.endpoint_url()
    wait = timeouts.preflight()
    client = listing.s3_client((wait, wait), attempts=2)
    where = f"endpoint {endpoint or 'AWS default'}"
    try:
        client.head_bucket(Bucket=bucket)
    except bce.ClientError as exc:
        err, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
        code = str(err.get("Code") or meta.get("HTTPStatusCode") or "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise LocationError(f"bucket {bucket!r} does not exist ({where}; from {uri!r})") from None
        if code in ("403", "AccessDenied"):
            raise LocationError(f"access to bucket {bucket!r} is denied ({where}; from {uri!r}); "
                                "check the credentials the workers get") from None
        raise LocationError(f"bucket {bucket!r} cannot be checked ({where}): {code or exc}") from None
    except (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ReadTimeoutError) as exc:
        raise LocationError(f"the S3 endpoint cannot be reached ({where}; for {uri!r}): "
                            f"{type(exc).__name__}") from None
    except bce.NoCredentialsError:
        raise LocationError(f"no S3 credentials found for {uri!r} ({where}); give the job credentials "
                            "the usual AWS way (instance profile, IRSA, AWS_* variables)") from None


def require_input(uri: str, what: str = "input") -> None:
    """The input folder exists (a file is fine too) / the input bucket exists and answers."""
    if not uri:
        raise LocationError(f"no {what} given; pass a folder or s3://bucket/prefix")
    if storage.is_s3(uri):
        _head_bucket(uri)
    elif not os.path.exists(uri):
        raise LocationError(f"the {what} {uri!r} does not exist (looked at {normalize(uri)})")


def require_output(uri: str, what: str = "output") -> None:
    """The output can be written: its bucket exists and answers / a local folder is not a file."""
    if not uri:
        raise LocationError(f"no {what} given; pass a folder or s3://bucket/prefix")
    if storage.is_s3(uri):
        _head_bucket(uri)
    elif os.path.isfile(uri):
        raise LocationError(f"the {what} {uri!r} is a file, not a folder (looked at {normalize(uri)})")


def exit_code(*, done: int, failed_good: int, known_bad: int = 0) -> int:
    """A job's exit code from its counts: `done` = outputs present (made now or skipped as already
    there), `failed_good` = inputs that should have worked but did not (model, write, segmenter
    errors), `known_bad` = inputs recorded as unusable (corrupt, too large, unsafe key)."""
    if failed_good or not done:
        return EXIT_INCOMPLETE
    return EXIT_OK


def failure_counts(rows: Iterable[Mapping], known_bad: Collection[str]) -> dict[str, int]:
    """Rows with `status` (absent = failed) and `reason` -> `failed`, `known_bad` (inputs recorded as
    unusable: each job names its reasons) and `failed_good` (errors a rerun retries)."""
    reasons = [r.get("reason") for r in rows if r.get("status", "failed") == "failed"]
    bad = sum(reason in known_bad for reason in reasons)
    return {"failed": len(reasons), "known_bad": bad, "failed_good": len(reasons) - bad}


__all__ = ["LocationError", "normalize", "refuse_overlap", "require_input", "require_output", "exit_code",
           "failure_counts",
           "EXIT_OK", "EXIT_INCOMPLETE", "EXIT_USAGE"]

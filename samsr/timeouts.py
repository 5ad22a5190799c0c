"""How long samsr waits for an endpoint before it says so: short by default, so that a dead S3 endpoint or
MLflow server fails a job in seconds instead of minutes of silent retries; raised by environment variables
on a slow or shared machine (a busy head node, CI with a neighbour), where a slow answer is not a dead
server. A refused connection (nothing listening) fails at once whatever the setting.

| variable | default | what waits |
|---|---|---|
| SAMSR_PREFLIGHT_TIMEOUT_S | 5 s | up-front checks before any work: S3 bucket HEAD, MLflow `/health`, `samsr local status` |
| SAMSR_S3_CONNECT_TIMEOUT_S | 3 s | TCP connect of every S3 request (samsr.storage) |
| SAMSR_S3_REQUEST_TIMEOUT_S | 10 s | an S3 request with no bytes moving for this long fails (then the SDK retries) |
"""
from __future__ import annotations

import os

PREFLIGHT_S = 5.0
S3_CONNECT_S = 3.0
S3_REQUEST_S = 10.0


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from environment variable `name`, else `default`."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={raw!r} must be a positive number of seconds")
    return value


def preflight() -> float:
    """Seconds an up-front reachability check waits for an answer."""
    return env_seconds("SAMSR_PREFLIGHT_TIMEOUT_S", PREFLIGHT_S)


def s3() -> tuple[float, float]:
    """(connect, request) timeouts of S3 requests."""
    return (env_seconds("SAMSR_S3_CONNECT_TIMEOUT_S", S3_CONNECT_S),
            env_seconds("SAMSR_S3_REQUEST_TIMEOUT_S", S3_REQUEST_S))


__all__ = ["env_seconds", "preflight", "s3", "PREFLIGHT_S", "S3_CONNECT_S", "S3_REQUEST_S"]

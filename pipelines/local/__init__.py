"""One machine. This package is `samsr local up|env|status|down`: a development stack on this machine — an
S3 endpoint (moto), an MLflow server (sqlite, proxied artifacts) and a Ray head with token authentication
— all on 127.0.0.1 with free ports. Its state (URLs, pids; never the token) is `<dir>/state.json`; the
Ray token is `<dir>/ray-token` and moto's dummy S3 credentials `<dir>/aws-credentials` (profile
`samsr-local`), both readable by the owner only. `client_env` gives a process what it needs to use it,
`shell_exports` a shell (`samsr local env`: the token's and the credentials' *files*, never their
contents), `add_sample_photos` the bucket `s3://samsr-local` with the bundled photos (`samsr local up`
does it).
The head is started with the S3 endpoint and moto's dummy credentials in its own environment
(`node_env`), and this interpreter's bin/ first on its PATH (a `ray job submit` entrypoint's `python`
is the one samsr is installed in), as a cluster node would be: workers inherit them, and no
runtime_env carries them.

Its modules: services.py (start/stop each service), quickstart.py (the jobs on this stack), demo.py
(the plain loop, no Ray) and photos.py (the bundled photos they use).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.local import services
from samsr import timeouts

STATE = "state.json"
TOKEN = "ray-token"
CREDENTIALS = "aws-credentials"
PROFILE = "samsr-local"
BUCKET = "samsr-local"
# moto accepts any credentials; these name the local endpoint only
LOCAL_AWS = {"AWS_ACCESS_KEY_ID": "samsr-local", "AWS_SECRET_ACCESS_KEY": "samsr-local", "AWS_DEFAULT_REGION": "us-east-1"}


def pid_alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)          # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group `pid` leads, wait for it, SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.1)


def read_state(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / STATE
    return json.loads(path.read_text()) if path.exists() else None


def status(folder: str | Path) -> dict[str, bool]:
    """Which services of the stack in `folder` answer (empty when none was started there)."""
    state = read_state(folder)
    if not state:
        return {}
    checks = {"s3": state["s3"], "mlflow": state["mlflow"] + "/health", "ray": state["ray_dashboard"] + "/api/version"}
    wait = timeouts.preflight()
    return {name: pid_alive(state["pids"][name]) and services.http_ready(url, wait)() for name, url in checks.items()}


def up(folder: str | Path, num_cpus: int = 8) -> dict[str, Any]:
    """Start the stack in `folder`, or return the running one. Returns the state."""
    folder = Path(folder).resolve()
    state = read_state(folder)
    if state and all(status(folder).values()):
        return state
    if state:
        down(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started: list[services.Service] = []
    try:
        s3 = services.start_moto(folder / "s3")
        started.append(s3)
        mlflow = services.start_mlflow(folder / "mlflow")
        started.append(mlflow)
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        head = services.start_ray_head(folder / "ray", num_cpus=num_cpus, env={**node_env(s3.url, mlflow.url),
                                                                               "PATH": path})
        started.append(head)
    except BaseException:
        for service in started:
            service.stop()
        raise
    _private_file(folder / TOKEN, head.token)
    _write_credentials(folder)
    state = {"s3": s3.url, "mlflow": mlflow.url, "ray_dashboard": head.url, "ray_address": head.gcs_address,
             "ray_temp_dir": head.temp_dir, "pids": {"s3": s3.process.pid, "mlflow": mlflow.process.pid,
                                                     "ray": head.process.pid}}
    (folder / STATE).write_text(json.dumps(state, indent=2))
    return state


def down(folder: str | Path) -> bool:
    """Stop the stack in `folder` (Ray first). False when none was recorded there."""
    folder = Path(folder)
    state = read_state(folder)
    if not state:
        return False
    stop_group(state["pids"]["ray"], timeout=services.RAY_STOP_GRACE_S)
    for name in ("mlflow", "s3"):
        stop_group(state["pids"][name])
    if state.get("ray_temp_dir"):
        shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    (folder / STATE).unlink()
    (folder / TOKEN).unlink(missing_ok=True)
    (folder / CREDENTIALS).unlink(missing_ok=True)
    return True


def node_env(s3_url: str, mlflow_url: str) -> dict[str, str]:
    """The Ray head's own environment, as a cluster node would have it: workers and submitted jobs inherit
    the endpoint and the (dummy) S3 credentials from the raylet, never through a runtime_env."""
    return {**LOCAL_AWS, "AWS_ENDPOINT_URL": s3_url, "MLFLOW_TRACKING_URI": mlflow_url,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def client_env(folder: str | Path) -> dict[str, str]:
    """Environment for a process that uses the stack: S3 endpoint, MLflow, Ray address + token."""
    folder = Path(folder)
    state = read_state(folder)
    if not state:
        raise RuntimeError(f"no local stack in {str(folder)!r}; start one with `samsr local up --dir {folder}`")
    return {**node_env(state["s3"], state["mlflow"]), "RAY_ADDRESS": state["ray_address"],
            **services.ray_env((folder / TOKEN).read_text().strip())}


def _private_file(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (created 0600 before anything is written)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _write_credentials(folder: Path) -> Path:
    """moto's dummy credentials as an AWS shared-credentials file, profile `samsr-local`."""
    path = folder / CREDENTIALS
    _private_file(path, f"[{PROFILE}]\naws_access_key_id = {LOCAL_AWS['AWS_ACCESS_KEY_ID']}\n"
                        f"aws_secret_access_key = {LOCAL_AWS['AWS_SECRET_ACCESS_KEY']}\n")
    return path


def shell_exports(folder: str | Path) -> str:
    """`export` lines (for `eval "$(samsr local env)"`) that point a shell at the stack in `folder`: S3
    endpoint and the credentials *file*, MLflow, Ray's address for drivers (`RAY_ADDRESS`) and for `ray job
    submit` (`RAY_API_SERVER_ADDRESS`), token auth with the token's *file* (`RAY_AUTH_TOKEN_PATH`; a
    `RAY_AUTH_TOKEN` would win over it, so it is unset, as are AWS key variables that would win over the
    profile). No secret is printed: what reaches shell history and logs are paths."""
    folder = Path(folder).resolve()
    state = read_state(folder)
    if not state:
        raise FileNotFoundError(f"no local stack in {str(folder)!r}; start one with `samsr local up --dir {folder}`")
    if not (folder / CREDENTIALS).exists():
        _write_credentials(folder)
    values = {"AWS_ENDPOINT_URL": state["s3"], "AWS_DEFAULT_REGION": LOCAL_AWS["AWS_DEFAULT_REGION"],
              "AWS_SHARED_CREDENTIALS_FILE": str(folder / CREDENTIALS), "AWS_PROFILE": PROFILE,
              "MLFLOW_TRACKING_URI": state["mlflow"], "RAY_ADDRESS": state["ray_address"],
              "RAY_API_SERVER_ADDRESS": state["ray_dashboard"], "RAY_AUTH_MODE": "token",
              "RAY_AUTH_TOKEN_PATH": str(folder / TOKEN), "RAY_USAGE_STATS_ENABLED": "0",
              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}   # "0": Ray keeps 127.0.0.1 instead of the host's IP
    lines = [f"# samsr local stack in {folder} (samsr local down --dir {shlex.quote(str(folder))} stops it)",
             "unset RAY_AUTH_TOKEN AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_ENDPOINT_URL_S3"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in values.items()]
    lines += [f'export {name}="127.0.0.1,localhost${{{name}:+,${name}}}"' for name in ("NO_PROXY", "no_proxy")]
    return "\n".join(lines)


SAMPLE_PREFIX = "photos"


SAMPLE_LR_CROP = 128     # HR px of the sample LR photos: 32 px LR, about a second each for the tiny SAM-DiffSR


def _central(img, side: int):
    h, w = img.shape[:2]
    side = min(side, h - h % 4, w - w % 4)
    return img[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]


def add_sample_photos(state: dict[str, Any]) -> str:
    """Create the bucket `samsr-local` (once) and put the bundled photos in it: `photos/train/` (the demo's
    training photos), `photos/holdout/` (the held-out HR photos, cropped to a multiple of 4) and
    `photos/holdout-lr/` (the ×4 LR of their central 128 px, made as `samsr shard` makes it: small, so
    that upscaling them with a 100-step sampler on a laptop takes seconds). Returns `s3://samsr-local/photos`."""
    import boto3

    from pipelines.local import photos
    from samsr import images
    from samsr.shards.format import png_bytes

    creds = {"aws_access_key_id": LOCAL_AWS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": LOCAL_AWS["AWS_SECRET_ACCESS_KEY"]}
    s3 = boto3.client("s3", endpoint_url=state["s3"], region_name=LOCAL_AWS["AWS_DEFAULT_REGION"], **creds)
    if BUCKET in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        return f"s3://{BUCKET}/{SAMPLE_PREFIX}"
    s3.create_bucket(Bucket=BUCKET)
    for name in photos.TRAIN:
        s3.put_object(Bucket=BUCKET, Key=f"{SAMPLE_PREFIX}/train/{name}.png", Body=png_bytes(photos.bundled_photo(name), 1))
    for name in photos.HELD_OUT:
        hr = images.crop_to_multiple(photos.bundled_photo(name), 4)
        s3.put_object(Bucket=BUCKET, Key=f"{SAMPLE_PREFIX}/holdout/{name}.png", Body=png_bytes(hr, 1))
        lr = images.make_lr(_central(hr, SAMPLE_LR_CROP), 4)
        s3.put_object(Bucket=BUCKET, Key=f"{SAMPLE_PREFIX}/holdout-lr/{name}.png", Body=png_bytes(lr, 1))
    return f"s3://{BUCKET}/{SAMPLE_PREFIX}"


__all__ = ["up", "down", "status", "client_env", "node_env", "read_state", "stop_group", "shell_exports",
           "add_sample_photos", "STATE", "TOKEN", "CREDENTIALS", "BUCKET"]

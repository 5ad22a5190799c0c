"""`samsr local up|down|status`: a development stack on this machine — an S3 endpoint (moto), an MLflow
server (sqlite, proxied artifacts) and a Ray head with token authentication — all on 127.0.0.1 with
free ports. Its state (URLs, pids; never the token) is `<dir>/state.json`; the Ray token is
`<dir>/ray-token`, readable by the owner only. `client_env` gives a process what it needs to use it.
The head is started with the S3 endpoint and moto's dummy credentials in its own environment
(`node_env`), as a cluster node would be: workers inherit them, and no runtime_env carries them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from pipelines import services

STATE = "state.json"
TOKEN = "ray-token"
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
    return {name: pid_alive(state["pids"][name]) and services.http_ready(url)() for name, url in checks.items()}


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
        head = services.start_ray_head(folder / "ray", num_cpus=num_cpus, env=node_env(s3.url, mlflow.url))
        started.append(head)
    except BaseException:
        for service in started:
            service.stop()
        raise
    token_path = folder / TOKEN
    token_path.touch(mode=0o600)
    token_path.write_text(head.token)
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
    for name in ("ray", "mlflow", "s3"):
        stop_group(state["pids"][name])
    if state.get("ray_temp_dir"):
        shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    (folder / STATE).unlink()
    (folder / TOKEN).unlink(missing_ok=True)
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


__all__ = ["up", "down", "status", "client_env", "node_env", "read_state", "stop_group", "STATE"]

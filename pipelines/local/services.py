"""Real local services for tests and `samsr local up`: an S3 endpoint (moto) and a Ray head.

Each service is a subprocess in its own session with its log in a work directory, bound to
127.0.0.1 only, started by `start_process` and considered up when its `ready_check` passes.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

HOST = "127.0.0.1"


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the service's process group, wait, then SIGKILL what is left."""
        if self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)   # its own session: pgid == pid
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                continue


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def venv_script(name: str) -> str:
    """Path of a console script installed beside the running interpreter (the venv's bin/)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"console script {name!r} is neither in {candidate.parent} nor on PATH; "
                                f"install the package that provides it into this environment")
    return found


def http_ready(url: str, timeout: float = 1.0) -> Callable[[], bool]:
    """A ready_check: true once `url` answers HTTP at all (any status), bypassing proxies."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def check() -> bool:
        try:
            opener.open(url, timeout=timeout).close()
            return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    return check


def _log_tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def start_process(name: str, argv: Sequence[str], ready_check: Callable[[], bool], workdir: Path,
                  env: Mapping[str, str] | None = None, url: str = "", timeout: float = 60.0) -> Service:
    """Start `argv` in its own session (log: workdir/<name>.log), wait until `ready_check()` is true.

    `env` entries are added to the current environment. Raises RuntimeError with the log's tail if
    the process exits or is not ready within `timeout` seconds (it is stopped first).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir, env={**os.environ, **(env or {})}, start_new_session=True)
    service = Service(name=name, url=url, process=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)          # what it started before it failed
            raise RuntimeError(f"{name} exited with code {proc.returncode} before it was ready; "
                               f"argv={list(argv)}; log {log_path}:\n{_log_tail(log_path)}")
        if ready_check() and proc.poll() is None:   # not someone else answering on our port
            return service
        time.sleep(0.1)
    service.stop()
    raise RuntimeError(f"{name} was not ready after {timeout:.0f}s; argv={list(argv)}; "
                       f"log {log_path}:\n{_log_tail(log_path)}")


def _start_http_service(name: str, argv_for: Callable[[int], list[str]], ready_path: str, workdir: Path,
                        port: int | None, timeout: float, env: Mapping[str, str] | None = None) -> Service:
    """`start_process` for an HTTP server on 127.0.0.1:port (a free port unless given), retried on
    another free port if the first was taken between `free_port()` and bind."""
    tries = 1 if port else 3
    for attempt in range(tries):
        p = port or free_port()
        url = f"http://{HOST}:{p}"
        try:
            return start_process(name, argv_for(p), http_ready(url + ready_path), workdir, env=env, url=url,
                                 timeout=timeout)
        except RuntimeError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def start_moto(workdir: Path, port: int | None = None, timeout: float = 60.0) -> Service:
    """An S3-compatible endpoint (moto_server) on 127.0.0.1; point AWS_ENDPOINT_URL at `.url`."""
    script = venv_script("moto_server")
    return _start_http_service("moto", lambda p: [script, "-H", HOST, "-p", str(p)], "", workdir, port, timeout)


def s3_requests(log_path: Path, since: int = 0) -> list[tuple[str, str]]:
    """(method, path) of each request a `start_moto` server logged after byte `since` of its log
    (`log_path.stat().st_size` taken before the work): how tests and benchmarks count S3 requests."""
    with open(log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return re.findall(r'"(?:\x1b\[[0-9;]*m)*(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP', text)


def start_mlflow(workdir: Path, port: int | None = None, timeout: float = 120.0) -> Service:
    """An MLflow tracking server on 127.0.0.1: sqlite backend and proxied artifacts under `workdir`,
    one worker, job execution off (starts in ~5 s with ~0.5 GB). Point MLFLOW_TRACKING_URI at `.url`."""
    workdir = Path(workdir).resolve()
    script = venv_script("mlflow")

    def argv(p: int) -> list[str]:
        return [script, "server", "--host", HOST, "--port", str(p), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                "--artifacts-destination", str(workdir / "artifacts")]

    return _start_http_service("mlflow", argv, "/health", workdir, port, timeout,
                               env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


RAY_SOCKET_DIR_MAX = 40   # Ray's session dirs hold unix sockets (path limit ~107 chars): keep the root short
# SIGTERM to a `ray start --block` head's group ends the raylet and its workers within a second, but the
# leader and the GCS server never exit on it (measured: still there after 20 s), so waiting longer only
# delays the SIGKILL; a local head keeps nothing that needs a graceful end.
RAY_STOP_GRACE_S = 3.0


@dataclass
class RayHead(Service):
    """A `ray start --head --block` node on 127.0.0.1 with token authentication on.

    `url` is the dashboard (job submission) address; `token` is never put on a command line.
    """
    gcs_address: str = ""
    token: str = ""
    temp_dir: str = ""

    def stop(self, timeout: float = RAY_STOP_GRACE_S) -> None:
        """Stop the head's process group (SIGTERM, then SIGKILL after `timeout` s), remove its temp dir."""
        super().stop(timeout)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def client_env(self) -> dict[str, str]:
        """Environment for `ray job submit` / `ray.init(address=...)` against this head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.url,
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def submit(self, entrypoint: Sequence[str], timeout: float = 600.0,
               agent_wait: float = 90.0) -> subprocess.CompletedProcess:
        """`ray job submit --address <head> -- <entrypoint>` with the token in the environment; waits
        for the job and returns the finished CLI process. Retried only while the head's job agent is
        not ready yet (it answers some seconds after the dashboard): never once a job was submitted."""
        argv = [venv_script("ray"), "job", "submit", "--address", self.url, "--", *entrypoint]
        env = {**os.environ, **self.client_env()}
        deadline = time.monotonic() + agent_wait
        while True:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode == 0 or time.monotonic() > deadline or not agent_not_ready(proc.stdout + proc.stderr):
                return proc
            time.sleep(3)


def agent_not_ready(output: str) -> bool:
    """Whether `ray job submit` printed `output` because the head's job agent is not up yet, so that no
    job was submitted (a submitted job prints "submitted successfully" first, whatever its end)."""
    if "submitted successfully" in output:
        return False
    return "No available agent" in output or "Failed to connect to Ray" in output or "Connection refused" in output


def ray_env(token: str) -> dict[str, str]:
    """Loopback-only, no usage stats, token auth with `token` (Ray 2.5x+: RAY_AUTH_MODE / RAY_AUTH_TOKEN)."""
    return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def start_ray_head(workdir: Path, num_cpus: int = 4, timeout: float = 120.0,
                   env: Mapping[str, str] | None = None) -> RayHead:
    """A local Ray head (GCS, raylet, dashboard + job API) on 127.0.0.1 with free ports and a fresh token.

    Its temp dir is `workdir/rt` when that path is short enough for Ray's unix sockets, else a short
    directory under /tmp. `env` is added to the head's own environment, which every worker and
    submitted job inherits from the raylet (how a cluster node hands out credentials: never through
    a runtime_env, which Ray logs). Stop it with `.stop()` (its whole process group).
    """
    workdir = Path(workdir)
    temp = workdir / "rt"
    if len(str(temp)) > RAY_SOCKET_DIR_MAX:
        temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    temp.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    tries = 3
    for attempt in range(tries):       # a port taken between free_port() and Ray's bind: other free ports
        port, dash, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
        # every port explicit: a second Ray on the machine (e.g. an in-process test session) holds the defaults
        argv = [venv_script("ray"), "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={port}",
                "--dashboard-host", HOST, "--dashboard-port", str(dash), "--include-dashboard", "true",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                "--temp-dir", str(temp), f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats"]
        url = f"http://{HOST}:{dash}"
        try:
            proc = start_process("ray-head", argv, http_ready(f"{url}/api/version"), workdir,
                                 env={**(env or {}), **ray_env(token)}, url=url, timeout=timeout)
        except RuntimeError:
            if attempt == tries - 1:
                raise
            continue
        return RayHead(name=proc.name, url=url, process=proc.process, log_path=proc.log_path,
                       gcs_address=f"{HOST}:{port}", token=token, temp_dir=str(temp))
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["Service", "RayHead", "start_ray_head", "s3_requests", "agent_not_ready", "RAY_STOP_GRACE_S", "ray_env", "free_port", "venv_script", "http_ready", "start_process", "start_moto", "HOST"]

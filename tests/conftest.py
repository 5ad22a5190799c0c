"""Shared fixtures: real local services (DESIGN.md "Tests") and torch thread counts.

Kept light at import time: torch is imported inside the fixtures that need it.

The suite must hold up on a 2-core box with another CPU-bound process beside it, so before anything
imports torch this module sets, for this process and every process it starts (Ray workers, servers,
CLI subprocesses):
- OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep at barriers instead of spinning (a 2-thread torch loop
  spinning against a neighbour stalled for ~35 minutes once); tests also use one torch thread;
- SAMSR_PREFLIGHT_TIMEOUT_S / SAMSR_S3_*_TIMEOUT_S: the product's reachability timeouts (seconds in
  production) raised, so a busy server is not taken for a dead one; a closed port is still refused at
  once, so the refusal tests stay fast.

Markers (pyproject.toml): `slow` (end-to-end, minutes in all), `services` (added here to every test that
uses a real server: moto, MLflow or Ray), `quality` (opt-in: `pytest -m quality`, not in `make test`).
`make test-fast` runs what is neither slow nor services nor quality.
"""
from __future__ import annotations

import os
import time

TEST_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "SAMSR_PREFLIGHT_TIMEOUT_S": "60", "SAMSR_S3_CONNECT_TIMEOUT_S": "30",
            "SAMSR_S3_REQUEST_TIMEOUT_S": "120"}
os.environ.update(TEST_ENV)
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.local import services


@dataclass
class S3Endpoint:
    """A running moto S3 server; the AWS_* environment already points at it. `log` is the server's
    request log (one line per request): `mark()` then `requests(since)` counts what a job asked."""
    url: str
    log: Path | None = None
    _buckets: set = field(default_factory=set)

    def mark(self) -> int:
        return self.log.stat().st_size

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        """(method, path) of each request the server logged after `mark()` returned `since`."""
        return services.s3_requests(self.log, since)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, name: str) -> str:
        """Create bucket `name` (once) and return `s3://name`."""
        if name not in self._buckets:
            self.client().create_bucket(Bucket=name)
            self._buckets.add(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    service = services.start_moto(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", service.url)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # keep local traffic off any configured HTTP proxy
        for var in ("NO_PROXY", "no_proxy"):
            mp.setenv(var, ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get(var, "")])))
        try:
            yield S3Endpoint(url=service.url, log=service.log_path)
        finally:
            service.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1 for the session; its URL."""
    service = services.start_mlflow(tmp_path_factory.mktemp("mlflow"))
    try:
        yield service.url
    finally:
        service.stop()


SERVICE_FIXTURES = {"s3", "mlflow_server", "ray_local", "ray_head", "ray_cluster"}


# CI gives the whole run 90 minutes (install included); past this many seconds no further test starts, so a
# run that has gone wrong ends with its summary (which tests failed, the slowest ones) instead of a kill
SUITE_BUDGET_S = float(os.environ.get("SAMSR_SUITE_BUDGET_S", "4500"))
SUITE_START = time.monotonic()


def pytest_runtest_setup(item):
    spent = time.monotonic() - SUITE_START
    if spent > SUITE_BUDGET_S:
        pytest.exit(f"the suite has run {spent / 60:.0f} min, past its budget of {SUITE_BUDGET_S / 60:.0f} min "
                    f"(SAMSR_SUITE_BUDGET_S): not starting {item.nodeid} or anything after it", returncode=1)


def pytest_collection_modifyitems(config, items):
    """Mark every test that (directly or through its fixtures) starts or uses a real server `services`."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One torch thread in the test process: tiny tensors gain nothing from more, and a second thread
    on a shared 2-core box only waits (tests/conftest.py doc)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local(s3):
    """One in-process Ray (4 logical CPUs on 127.0.0.1, token auth, temp dir under /tmp) for the session.

    Depends on `s3` so that workers start with the moto endpoint and credentials in their environment.
    """
    import shutil
    import tempfile

    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # short: Ray's unix socket paths are limited
    env = services.ray_env(secrets.token_hex(32))
    from ray._raylet import Config as RayConfig   # Ray caches RAY_AUTH_MODE: re-read after setting it

    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        RayConfig.initialize("")
        # no runtime_env: the workers inherit the moto endpoint and credentials from this process through
        # the raylet, as on a cluster node (Ray logs a runtime_env in plain text)
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp, _node_ip_address=services.HOST,
                 log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    RayConfig.initialize("")


def files_holding(folder: Path, needle: bytes) -> list[str]:
    """Regular files under `folder` whose bytes contain `needle`."""
    hits = []
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:
            continue
    return hits


@dataclass
class RayHeadNode:
    """The session's `ray start --head` node. `secret` is the node's AWS_SECRET_ACCESS_KEY: it lives only
    in the head's own environment (what every job's driver and workers inherit from the raylet)."""
    head: services.RayHead
    workdir: Path          # the head's log (ray-head.log); Ray's own files are under head.temp_dir
    secret: str

    def leaks(self) -> list[str]:
        """Files of this head (its log folder and Ray's whole temp/session dir) that hold the secret."""
        return files_holding(self.workdir, self.secret.encode()) + files_holding(Path(self.head.temp_dir),
                                                                                 self.secret.encode())


@pytest.fixture(scope="session")
def ray_head(s3, tmp_path_factory):
    """One local Ray head (services.start_ray_head: 127.0.0.1, free ports, token auth, 4 logical CPUs) for
    the tests that submit jobs with `ray job submit`, stopped at the end of the session.

    Like a cluster node, its environment holds S3 credentials for the moto server with a fresh random
    secret key (tests/test_secrets.py checks that no file Ray writes holds it). At the end of the session,
    after every job submitted to it, the secret is searched for once more in all of the head's files.
    """
    secret = f"samsr-test-secret-{secrets.token_hex(8)}"
    node = {"AWS_ACCESS_KEY_ID": "samsr-test-key", "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": s3.url,
            "AWS_DEFAULT_REGION": "us-east-1"}
    workdir = tmp_path_factory.mktemp("ray-head")
    shared = RayHeadNode(head=services.start_ray_head(workdir, num_cpus=4, env=node), workdir=workdir, secret=secret)
    try:
        yield shared
        leaked = shared.leaks()
        assert leaked == [], f"the Ray head's secret key is in files Ray wrote during the session: {leaked}"
    finally:
        shared.head.stop()


@pytest.fixture(scope="session")
def ray_cluster(ray_local, mlflow_server):
    """One multi-node cluster per session (DESIGN.md "Tests"; pipelines/local/multinode.py): a 0-CPU head and
    two worker nodes of 4 logical CPUs. It shares the session's Ray token (set by `ray_local`) and inherits
    the moto S3 credentials as a node would; MLFLOW_TRACKING_URI points drivers at the session's MLflow."""
    from pipelines.local.multinode import start_cluster

    cluster = start_cluster(workers=2, cpus_per_node=4, env={"MLFLOW_TRACKING_URI": mlflow_server})
    try:
        yield cluster
    finally:
        cluster.shutdown()

"""Shared fixtures: real local services (DESIGN.md "Tests") and torch thread counts.

Kept light at import time: torch is imported inside the fixtures that need it."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from pipelines import services


@dataclass
class S3Endpoint:
    """A running moto S3 server; the AWS_* environment already points at it."""
    url: str
    _buckets: set = field(default_factory=set)

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
            yield S3Endpoint(url=service.url)
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


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Unit tests use tiny tensors: one thread is as fast and avoids OpenMP stalls on shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_torch_threads():
    """For the few tests that train a model for real: use both cores of a CI machine."""
    import torch

    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local(s3):
    """One in-process Ray (4 logical CPUs on 127.0.0.1, token auth, temp dir under /tmp) for the session.

    Depends on `s3` so that workers start with the moto endpoint and credentials in their environment.
    """
    import secrets
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

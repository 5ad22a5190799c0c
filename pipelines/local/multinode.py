"""A multi-node Ray cluster on one machine, for the tests and benchmarks that run jobs across nodes and
kill nodes mid-job: Ray's own harness (`ray.cluster_utils.Cluster`), a head with 0 CPUs (so every task,
actor and Ray Train worker lands on a worker node, as on a real cluster whose head only coordinates) and
worker nodes on 127.0.0.1, each its own raylet and object store.

Jobs run against it as a user's driver does: a subprocess with RAY_ADDRESS set (`LocalCluster.start`).
`kill_worker` removes a worker node without a graceful shutdown (raylet, object store and its workers
SIGKILLed: a spot reclaim); `ensure_workers` adds fresh ones, as an autoscaler would. The cluster
inherits this process's environment (S3 endpoint and credentials, the Ray token when
RAY_AUTH_MODE=token), as nodes inherit the pod's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipelines.local.services import HOST

NODE_START_S = 180      # a raylet joining on a loaded 2-core box (the harness's own wait is 30 s)
# A killed node is declared dead in ~3 s instead of Ray's default ~30 s (health checks every 1 s, 3 misses)
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                          "health_check_failure_threshold": 3}


@dataclass
class LocalCluster:
    """A running harness cluster; stop it with `shutdown()`."""
    cluster: Any
    env: dict
    node_args: dict
    temp_dir: str

    @property
    def address(self) -> str:
        return self.cluster.address

    def workers(self) -> list:
        return sorted(self.cluster.worker_nodes, key=lambda n: n.unique_id)

    def add_worker(self):
        # the node's processes (raylet, workers) find this cluster by RAY_ADDRESS: Ray's state API, which
        # Ray Train calls inside them, refuses to guess when other Ray instances run on the same machine
        before = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = self.address
        try:
            node = self.cluster.add_node(wait=False, **self.node_args)
        finally:
            if before is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = before
        self.cluster._wait_for_node(node, timeout=NODE_START_S)
        return node

    def ensure_workers(self, count: int) -> None:
        """Bring the cluster to `count` worker nodes (after one was killed)."""
        while len(self.cluster.worker_nodes) < count:
            self.add_worker()
        self.cluster.wait_for_nodes(timeout=NODE_START_S)

    def kill_worker(self, node=None) -> None:
        """Remove a worker node at once, no graceful shutdown (the first by id unless `node` is given)."""
        node = node or self.workers()[0]
        self.cluster.remove_node(node, allow_graceful=False)

    def start(self, argv: Sequence[str], cwd: str | None = None) -> subprocess.Popen:
        """A driver process on this cluster; stdout and stderr in one text pipe."""
        return subprocess.Popen(list(argv), env=self.env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(workers: int = 2, cpus_per_node: int = 4, object_store_mb: int = 200,
                  env: Mapping[str, str] | None = None) -> LocalCluster:
    """Head (0 CPUs, no dashboard) plus `workers` worker nodes of `cpus_per_node` logical CPUs. `env` is
    added to the drivers' environment (`LocalCluster.start`), beside RAY_ADDRESS."""
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")          # short: Ray's unix socket paths
    address_file = get_ray_address_file(None)
    had_address_file = os.path.exists(address_file)
    os.makedirs(os.path.dirname(address_file), exist_ok=True)       # the harness records itself there
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
        "num_cpus": 0, "node_ip_address": HOST, "temp_dir": temp, "include_dashboard": False,
        "_system_config": FAST_FAILURE_DETECTION})
    if not had_address_file and os.path.exists(address_file):
        os.remove(address_file)          # a plain `ray.init()` elsewhere must not join this cluster
    node_args = {"num_cpus": cpus_per_node, "node_ip_address": HOST, "object_store_memory": object_store_mb << 20}
    local = LocalCluster(cluster=cluster, node_args=node_args, temp_dir=temp, env={
        **os.environ, **(env or {}), "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"})
    try:
        local.ensure_workers(workers)
    except BaseException:
        local.shutdown()
        raise
    return local


__all__ = ["LocalCluster", "start_cluster", "NODE_START_S", "FAST_FAILURE_DETECTION"]

"""Local paths on a multi-node Ray cluster (DESIGN.md "On a cluster").

A task, actor or Ray Train worker runs on whichever node has room, and a local path there is that node's
own disk: a shard written to `./shards` by a write task on node B is not where the driver on node A
looks, an upscaled PNG lands on the actor's node while the manifest says `ok`, a checkpoint that a remote
worker writes is lost. So on a cluster of more than one node every job refuses a local path before any
work — input, output, shards, storage, model, SAM checkpoint, LPIPS weights, a `file:`/`sqlite:` tracking
URI — in one line that names s3:// (exit 2, nothing written), unless the user says the path is on a
filesystem every node mounts (`--shared-fs`, the sections' `shared_fs` key). Then it is checked: the
driver writes a marker file next to each path, one task pinned to each alive node
(NodeAffinitySchedulingStrategy, 0 CPUs, so a busy or CPU-less head answers too) looks for the markers and
for the paths the driver sees, and a node that cannot see one is named in the refusal. A one-node Ray
(the local default, `samsr local`) is unchanged: nothing is checked there.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Mapping

from samsr.locations import LocationError

MARKER = ".samsr-node-check-"          # + a random token: the file each node must see
NODE_ANSWER_S = 120.0                  # how long a node's check task may take (it waits for a worker process)
REMOTE_SCHEMES = ("s3://", "http://", "https://", "runs:/", "models:/", "databricks")


def local_path(value: str) -> str:
    """The local filesystem path `value` names ('' when it is remote or empty): `file:`/`sqlite:` URIs
    (MLflow tracking stores) give their path, s3://, http(s)://, runs:/ and models:/ are not local."""
    if not value or value.startswith(REMOTE_SCHEMES):
        return ""
    for scheme in ("sqlite:///", "file://"):
        if value.startswith(scheme):
            return value[len(scheme):]        # sqlite:////abs/m.db -> /abs/m.db, sqlite:///m.db -> m.db
    return value


def alive_nodes() -> list[dict]:
    """The Ray cluster's alive nodes (the driver must be connected)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_paths(job: str, paths: Mapping[str, str], shared_fs: bool) -> int:
    """Refuse (LocationError, one line) local paths among `paths` ({what: path or URI}) on a Ray cluster of
    more than one node, unless `shared_fs`; with it, check that every alive node sees them. Returns the
    number of alive nodes. Call before any work: it connects to the cluster $RAY_ADDRESS names; without
    one (and not connected yet) the job will start its own one-node Ray, and nothing is checked."""
    import ray

    from pipelines.rayenv import ensure_ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        return 1
    ensure_ray()
    nodes = alive_nodes()
    local = {what: p for what, value in paths.items() if (p := local_path(value))}
    if len(nodes) <= 1 or not local:
        return len(nodes)
    if not shared_fs:
        what, path = next(iter(local.items()))
        more = f" (and {len(local) - 1} more local path(s))" if len(local) > 1 else ""
        raise LocationError(
            f"{job}: the Ray cluster has {len(nodes)} nodes and {what} {path!r} is a local path{more}: each node "
            "would read and write its own disk; use s3://bucket/prefix, or pass --shared-fs (shared_fs: true) "
            "if every node mounts it at that path")
    _check_every_node_sees(job, local, nodes)
    return len(nodes)


def _probe_dir(path: str) -> Path:
    """Where the marker for `path` goes: the folder itself, or the folder of a file (created if missing:
    an output folder is made by the job anyway)."""
    p = Path(path).expanduser().resolve()
    folder = p if p.is_dir() or not p.suffix else p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _look(markers: list[str], must_exist: list[str]) -> dict[str, list[str]]:
    """On one node: which markers and which paths it cannot see."""
    return {"markers": [m for m in markers if not os.path.isfile(m)],
            "paths": [p for p in must_exist if not os.path.exists(p)]}


def _check_every_node_sees(job: str, local: Mapping[str, str], nodes: list[dict]) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    markers = {}
    for what, path in local.items():
        marker = _probe_dir(path) / f"{MARKER}{token}"
        marker.write_text(token)
        markers[str(marker)] = what
    existing = [str(Path(p).expanduser().resolve()) for p in local.values() if os.path.exists(p)]
    look = ray.remote(num_cpus=0, max_retries=0)(_look)
    try:
        refs = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(list(markers), existing): n for n in nodes}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=NODE_ANSWER_S)
        blind = []
        for ref in ready:
            try:
                missing = ray.get(ref)
            except Exception as exc:        # the node died meanwhile: it cannot be relied on either
                missing = {"markers": [], "paths": [f"(the check failed: {type(exc).__name__})"]}
            seen = [markers[m] for m in missing["markers"]] + missing["paths"]
            if seen:
                blind.append(f"{_name(refs[ref])} cannot see {', '.join(sorted(set(seen)))}")
        blind += [f"{_name(refs[ref])} did not answer in {NODE_ANSWER_S:.0f} s" for ref in late]
    finally:
        for marker in markers:
            Path(marker).unlink(missing_ok=True)
    if blind:
        raise LocationError(f"{job}: --shared-fs, but {'; '.join(blind)}: mount the same filesystem at the same "
                            "path on every node, or use s3://bucket/prefix")


def _name(node: dict) -> str:
    return f"node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:12]})"


def job_paths(*pairs: tuple[str, str]) -> dict[str, str]:
    """{what: value} of the non-empty values, for `check_paths`."""
    return {what: value for what, value in pairs if value}


__all__ = ["check_paths", "local_path", "alive_nodes", "job_paths", "MARKER"]

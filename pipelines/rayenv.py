"""Connecting a job to Ray: the cluster `RAY_ADDRESS` names (or a local one), handing its workers the
non-secret settings of this process — S3 endpoint and region, MLflow server (without userinfo), samsr's
cache — and never a credential.

Ray writes a job's `runtime_env` in plain text to its logs (`runtime_env_agent.log`, readable by every
user of the node) and shows it in the dashboard, so what goes there is an allowlist of names known to
hold no secret (`WORKER_ENV`), not "everything but the secrets". Workers get their credentials the way
the cluster gives them to every process on a node: an instance profile / IRSA / a Kubernetes secret as
env on the pods (AWS_*, MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), or env on the node where `ray start`
ran — Ray workers inherit the raylet's environment (`samsr local up` starts its head that way).

Also the command-line plumbing every job shares: `--log-level` and `configure_logging` (the `samsr` CLI
and the `python -m pipelines.<job>` entrypoints), the entrypoints' parser and their exit codes.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable

from samsr.redact import strip_userinfo

# Names whose values are settings, never secrets. Credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD/TOKEN, …) and names that only mean something with a local
# file (AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE) are left out on purpose, as is every name not listed.
WORKER_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "SAMSR_CACHE_DIR", "SAMSR_PREFLIGHT_TIMEOUT_S", "SAMSR_S3_CONNECT_TIMEOUT_S", "SAMSR_S3_REQUEST_TIMEOUT_S",
    "NO_PROXY", "no_proxy",
)
# URI-valued ones among them: passed without userinfo (`https://user:pw@h` -> `https://h`)
URI_ENV = frozenset({"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"})


# Workers have no terminal: what they print reaches the driver's log line by line, so no bar redraws there;
# and Ray Train's patched print (which tees each line to its logger too) would show every line twice.
WORKER_QUIET = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The non-secret settings of `environ` (default: this process) that Ray workers should see: the
    `WORKER_ENV` names that are set, URIs stripped of userinfo. Never a credential."""
    environ = os.environ if environ is None else environ
    return {name: strip_userinfo(environ[name]) if name in URI_ENV else environ[name]
            for name in WORKER_ENV if environ.get(name)}


def ensure_ray() -> None:
    """Connect to $RAY_ADDRESS (a running cluster) or start a local Ray, unless already connected. A
    local Ray's workers inherit this process's environment (credentials included) from its raylet;
    a cluster's get theirs from the nodes; both get `worker_env()` through the job's runtime_env."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None,
                 runtime_env={"env_vars": {**worker_env(), **WORKER_QUIET}})


def data_progress_bars(stream=None) -> bool:
    """Ray Data's progress bars on the driver when `stream` (default stderr) is a terminal; off otherwise,
    where their redraws would fill a log file and `RowProgress` prints one line per interval instead."""
    import sys

    from ray.data import DataContext

    on = bool(getattr(stream or sys.stderr, "isatty", lambda: False)())
    DataContext.get_current().enable_progress_bars = on
    if not on:                   # MLflow's artifact download bars (model loading) are redraws too
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return on


class RowProgress:
    """A driver's count of finished rows (images) of a job: logged as one INFO line at most every
    `every_s` seconds — `<job>: 120/1000 images, 3 failed, 2.41 images/s` — unless Ray Data's bars show."""

    def __init__(self, log: logging.Logger, job: str, total: int, every_s: float = 30.0, quiet: bool = False) -> None:
        self.log, self.job, self.total, self.every_s, self.quiet = log, job, total, every_s, quiet
        self.done = self.failed = 0
        self.t0 = self.last = time.perf_counter()

    def add(self, failed: int = 0, done: int = 1) -> None:
        """`done` more rows finished, `failed` of them failed (a bool counts as 0 or 1)."""
        self.done += done
        self.failed += int(failed)
        now = time.perf_counter()
        if not self.quiet and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            self.log.info("%s: %d/%d images, %d failed, %.2f images/s", self.job, self.done, self.total,
                          self.failed, self.done / max(now - self.t0, 1e-9))


class ResourceUnavailable(RuntimeError):
    """The job asked for GPUs that the cluster did not free within the wait, or that its own local Ray lacks."""


def started_own_ray() -> bool:
    """Whether this process started the Ray it is connected to (`ray.init()` with no cluster to join), so
    no autoscaler exists that could add nodes. Ray marks the driver's node object as the head only then
    (`ray._private.worker`: `Node(head=True)` when it starts one; `head=False, connect_only=True` when it
    joins a cluster, as under `ray job submit`); Ray Client drivers have no node object."""
    import ray

    node = ray._private.worker.global_worker.node
    return node is not None and node.is_head()


def _to_stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _gpus() -> tuple[float, float]:
    """(free, total) GPUs of the connected Ray cluster."""
    import ray

    return ray.available_resources().get("GPU", 0.0), ray.cluster_resources().get("GPU", 0.0)


def require_gpus(job: str, per_unit: float, units: int, zero: str, wait_s: float, poll_s: float = 2.0,
                 line_every_s: float = 30.0, echo: Callable[[str], None] = _to_stderr) -> None:
    """With `per_unit` > 0 the job needs `units` × `per_unit` FREE GPUs before it starts work; `per_unit` = 0
    returns at once (CPU), asking nothing. Enough free: returns at once. A Ray this job started itself
    (`started_own_ray`) has no autoscaler to add any: ResourceUnavailable at once. On a cluster the GPUs are
    asked of its autoscaler (`request_resources`, so a GPU group at zero replicas scales up; the request is
    withdrawn on return) and waited for up to `wait_s`, with a line to `echo` (stderr) at the start and
    every `line_every_s` naming what is needed, free and in the cluster; still short: ResourceUnavailable.
    Errors name what was asked, what is there and how to run on CPU (`zero`, e.g. "--gpus-per-actor 0").
    Nothing is probed and nothing falls back to CPU on its own."""
    if per_unit <= 0:
        return
    need = per_unit * units
    wanted = f"{need:g} GPU(s) ({units} × {per_unit:g})"
    free, total = _gpus()
    if free >= need:
        return
    if started_own_ray():
        raise ResourceUnavailable(
            f"{job} asks for {wanted} but this job started its own local Ray, which has {free:g} free "
            f"({total:g} in all) and no autoscaler to add them: point RAY_ADDRESS at a cluster with GPU workers, "
            f"or pass {zero} to run on CPU")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": per_unit}] * units)
    start = time.monotonic()
    deadline, next_line = start + wait_s, start + line_every_s
    echo(f"{job}: waiting up to {wait_s:g} s for {wanted}: {free:g} free, {total:g} in the cluster; "
         f"asked the autoscaler for {units} bundle(s) of {{GPU: {per_unit:g}}}")
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise ResourceUnavailable(
                    f"{job} asks for {wanted} but the Ray cluster has {free:g} free ({total:g} in all) after "
                    f"{wait_s:g} s of waiting (its autoscaler, if any, was asked for them): add a GPU worker group, "
                    f"raise the wait (gpu_wait_s), or pass {zero} to run on CPU")
            if now >= next_line:
                next_line += line_every_s
                echo(f"{job}: still waiting ({now - start:.0f} s of {wait_s:g} s) for {wanted}: {free:g} free, "
                     f"{total:g} in the cluster")
            time.sleep(max(0.0, min(poll_s, deadline - now, next_line - now)))
            free, total = _gpus()
            if free >= need:
                return
    finally:
        request_resources(bundles=[])          # the actors themselves hold the GPUs from here on




def read_work(work, most_blocks: int = 10_000):
    """A Ray dataset over a `samsr.records.WorkSpool`'s parts (read by the workers, not the driver), cut
    into one block per item up to `most_blocks` (so that decode tasks run in parallel from the first
    item on: a part holds thousands)."""
    import ray

    from samsr import storage

    fs, _ = storage.filesystem(work.uris[0])
    paths = [storage.filesystem(uri)[1] for uri in work.uris]
    return ray.data.read_parquet(paths, filesystem=fs).repartition(max(1, min(work.total, most_blocks)))


def pool_gpus(job: str, section) -> tuple[int, int]:
    """Ray up and the GPUs of the model pool's least size there (`require_gpus`); returns the pool's
    (least, most) actors (samsr.config_jobs.actor_pool). `section`: the upscale or eval config."""
    from samsr.config import actor_pool

    least, most = actor_pool(section)
    ensure_ray()
    require_gpus(job, section.gpus_per_actor, least, "--gpus-per-actor 0", section.gpu_wait_s)
    return least, most


def model_pool(job: str, section):
    """The model actor pool of `samsr upscale`/`samsr eval` (`section`: their config section): `pool_gpus`,
    then a fixed pool of `actors`, or one that grows from `min_actors` to `max_actors` while work waits."""
    import ray

    least, most = pool_gpus(job, section)
    if least == most:
        return ray.data.ActorPoolStrategy(size=least)
    return ray.data.ActorPoolStrategy(min_size=least, max_size=most)

def add_model_set(p) -> None:
    """`--model-set KEY=VALUE` (repeatable): overrides of a model's own infer.* / segmenter.* settings."""
    p.add_argument("--model-set", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the model's own infer.* or segmenter.* settings, e.g. infer.tile=128 or "
                        "segmenter.checkpoint=s3://…")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LOG_LEVEL = "INFO"
OWN_LOGGERS = ("samsr", "pipelines")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_configured_level: str | None = None


def log_level(value: str) -> str:
    """argparse type of `--log-level`: a level name in any case -> its upper-case name; anything else is
    refused with the names to choose from."""
    name = str(value).strip().upper()
    if name not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a log level; choose one of {', '.join(LOG_LEVELS)}")
    return name


def default_log_level() -> str:
    """$SAMSR_LOG_LEVEL, else INFO: samsr's own INFO lines are the progress a person waits for (the shard
    job's summary per interval, downloads), and there are few of them."""
    return os.environ.get("SAMSR_LOG_LEVEL") or DEFAULT_LOG_LEVEL


def configure_logging(level: str | None = None) -> str:
    """`logging.basicConfig` for a command-line process: one stderr handler on the root logger, which stays
    at WARNING for other libraries (botocore at DEBUG would print signed request headers and key ids), and
    `level` (default `default_log_level()`) for samsr's own loggers, `samsr.*` and `pipelines.*`. Where the
    root logger already has handlers (pytest, an embedding program) only the levels are set. Returns the level."""
    global _configured_level
    level = log_level(level or default_log_level())
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    _configured_level = level
    return level


class LogLevelAction(argparse.Action):
    """`--log-level LEVEL` that configures logging as soon as it is parsed (the entrypoints' mains hand
    `run_entrypoint` a closure, not their arguments)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        configure_logging(values)


def add_log_level(p, default=None, action: type[argparse.Action] | str = "store") -> None:
    """`--log-level LEVEL` (DEBUG, INFO, WARNING, ERROR, CRITICAL; default $SAMSR_LOG_LEVEL or INFO)."""
    p.add_argument("--log-level", type=log_level, metavar="LEVEL", default=default, action=action,
                   help=f"level of samsr's own loggers: {', '.join(LOG_LEVELS)} (default $SAMSR_LOG_LEVEL or "
                        f"{DEFAULT_LOG_LEVEL}); other libraries log at WARNING")


def run_entrypoint(module: str, fn) -> int:
    """Run a `python -m pipelines.<job>` entrypoint's work, `fn() -> exit code`. A refusal before any work
    (a bad setting, a missing or overlapping location, a missing model, GPUs the cluster does not
    provide in time) is one line on stderr and exit 2,
    as in the `samsr` CLI (samsr.locations: exit codes)."""
    import sys

    from samsr.config import ConfigError
    from samsr.locations import EXIT_USAGE, LocationError

    if _configured_level is None:
        configure_logging()
    try:
        return fn()
    except (ConfigError, LocationError, FileNotFoundError, ResourceUnavailable) as exc:
        print(f"python -m {module}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def entrypoint_parser(module: str, description: str, example: str, model_set: bool = False):
    """The argparse parser of a `python -m pipelines.<job>` entrypoint (what `ray job submit` runs):
    `--config` preset or YAML, repeatable `--set key=value` overrides (and `--model-set` for the jobs
    that load a trained model)."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                epilog=f"example:\n  ray job submit -- python -m {module} --config samdiffsr-tiny "
                                       f"--set {example} ...", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="samdiffsr", help="preset name or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"config override, e.g. {example} (repeatable)")
    if model_set:
        add_model_set(p)
    add_log_level(p, action=LogLevelAction)
    return p

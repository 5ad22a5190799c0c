"""MLflow client helpers shared by the train/eval logging (runs.py) and the model wrapper (model.py):
which server (job.tracking_uri or $MLFLOW_TRACKING_URI), whether it answers, experiments, registered
model references, and credentials kept out of what MLflow prints. URIs with user:password are
redacted wherever they are shown; MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD are read by its client.
"""
from __future__ import annotations

import contextlib
import os

from samsr import redact
from samsr.config import Config


def redact_uri(uri: str) -> str:
    """scheme://user:p@ss@host -> scheme://***@host, presigned signatures -> *** (samsr.redact: where
    userinfo ends, `@ : /` in passwords); anything else unchanged."""
    return redact.redact_uri(uri)


def tracking_uri(cfg: Config) -> str:
    return cfg.job.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def check_tracking_reachable(uri: str, timeout: float | None = None) -> None:
    """Fail in seconds, before any work, when the MLflow server at `uri` does not answer: one GET of its
    `/health` (one try, `timeout` s to connect and to read, by default samsr.timeouts.preflight(): 5 s or
    $SAMSR_PREFLIGHT_TIMEOUT_S; proxies and CA settings as MLflow's own client
    uses them), where MLflow's client would retry silently for minutes. Any HTTP answer below 500 (401
    and 404 included: a server is there) counts as reachable; no URI, or a non-HTTP one (file:, sqlite:,
    databricks), is not checked. Raises samsr.locations.LocationError, one line, the URI redacted."""
    import requests

    from samsr import timeouts
    from samsr.locations import LocationError

    if not uri.lower().startswith(("http://", "https://")):
        return
    timeout = timeouts.preflight() if timeout is None else timeout
    clean = redact.strip_userinfo(uri)                      # userinfo never goes on the wire here
    health = clean.split("?", 1)[0].split("#", 1)[0].rstrip("/") + "/health"
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true", "yes")
    verify = False if insecure else (os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True)
    try:
        with requests.get(health, timeout=(timeout, timeout), verify=verify, allow_redirects=False, stream=True) as r:
            if r.status_code < 500:
                return
            reason = f"HTTP {r.status_code}"         # a proxy or load balancer with nothing behind it
    except requests.RequestException as exc:
        reason = type(exc).__name__
    raise LocationError(f"the MLflow server {redact_uri(uri)} does not answer (GET {health}, {timeout:.0f} s): "
                        f"{reason}; check job.tracking_uri / eval.tracking_uri / $MLFLOW_TRACKING_URI")


def experiment_id_for(client, name: str) -> str:
    """The id of MLflow experiment `name`, created if missing (tolerates a concurrent creation)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:                   # created meanwhile by a concurrent run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def registered_model_ref(uri: str) -> tuple[str, str, str]:
    """models:/<name>@<alias> -> (name, alias, ""); models:/<name>/<version> -> (name, "", version);
    models:/<name> -> (name, "", "")."""
    name, _, version = uri[len("models:/"):].partition("/")
    name, _, alias = name.partition("@")
    return name, alias, version


def model_run_id(client, model: str) -> str | None:
    """The MLflow run that logged `model`: runs:/<id>/…, or a registered version models:/<name>@<alias> |
    models:/<name>/<version>; None for anything else (a checkpoint path, s3://)."""
    if model.startswith("runs:/"):
        return model[len("runs:/"):].split("/", 1)[0]
    if not model.startswith("models:/"):
        return None
    name, alias, version = registered_model_ref(model)
    if alias:
        return client.get_model_version_by_alias(name, alias).run_id or None
    return (client.get_model_version(name, version).run_id or None) if version.isdigit() else None


@contextlib.contextmanager
def no_secret_links(uri: str):
    """Within the block, MLflow does not print its "View run … at: <URL>" lines when `uri` carries
    userinfo: MLflow builds them from the tracking URI, password included, and Ray keeps a worker's
    stdout in world-readable log files."""
    flag = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    if redact_uri(uri) == uri:
        yield
        return
    before = os.environ.get(flag)
    os.environ[flag] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(flag, None)
        else:
            os.environ[flag] = before


def terminate(client, run_id: str, status: str) -> None:
    """End a run; for a tracking URI with userinfo, the run's link is printed redacted instead of by MLflow."""
    uri = client.tracking_uri
    with no_secret_links(uri):
        client.set_terminated(run_id, status=status)
    if redact_uri(uri) != uri:
        print(f"samsr: MLflow run {run_id} {status.lower()}: {redact_uri(uri).rstrip('/')}/#/experiments/"
              f"{client.get_run(run_id).info.experiment_id}/runs/{run_id}", flush=True)


__all__ = ["redact_uri", "tracking_uri", "check_tracking_reachable", "experiment_id_for", "registered_model_ref",
           "model_run_id", "no_secret_links", "terminate"]

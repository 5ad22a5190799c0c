"""MLflow logging for the train job, from rank 0 only (DESIGN.md "Training").

A run gets the flattened config as params, metrics by step, sample grids LR↑|SR|HR, and the latest
checkpoint as an artifact. Its id travels in our checkpoints, so a resumed Ray Train run reopens the
same MLflow run. Without a tracking URI (`job.tracking_uri` or $MLFLOW_TRACKING_URI) nothing is
logged and the job says so once. Credentials never reach params or logs: user:password in a URI is
redacted, and MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD variables are read by its client.
"""
from __future__ import annotations

import logging
import os
import re
import time
from typing import Mapping

import numpy as np

from samsr import config as config_mod
from samsr.config import Config

log = logging.getLogger(__name__)

PARAM_BATCH = 100            # MLflow accepts at most 100 params per log_batch call
PARAM_VALUE_MAX = 6000


def redact_uri(uri: str) -> str:
    """scheme://user:secret@host -> scheme://***@host (anything else unchanged)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]+@", r"\1***@", uri)


def tracking_uri(cfg: Config) -> str:
    return cfg.job.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def run_params(cfg: Config) -> dict[str, str]:
    """The flattened config as MLflow params, URIs redacted, values cut to MLflow's limit."""
    out = {}
    for key, value in config_mod.flatten(cfg).items():
        text = redact_uri(value) if isinstance(value, str) else str(value)
        out[key] = text[:PARAM_VALUE_MAX]
    return out


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


class Tracker:
    """One MLflow run; every method is a no-op when there is no tracking URI."""

    def __init__(self, cfg: Config, run_name: str, run_id: str | None = None) -> None:
        self.run_id: str | None = None
        self.uri = uri = tracking_uri(cfg)
        if not uri:
            log.warning("no MLflow tracking URI (job.tracking_uri or MLFLOW_TRACKING_URI): metrics are not logged")
            self.client = None
            return
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id:                          # resumed from a checkpoint: the same MLflow run goes on
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        experiment_id = experiment_id_for(self.client, cfg.job.experiment)
        run = self.client.create_run(experiment_id, run_name=run_name,
                                     tags={"samsr.method": cfg.method, "samsr.config": cfg.name,
                                           "samsr.ray_train_name": run_name})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in run_params(cfg).items()]
        for i in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + PARAM_BATCH])

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, image: np.ndarray, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def artifact(self, local_path: str, artifact_path: str) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, local_path, artifact_path)

    def model(self, checkpoint_path: str) -> None:
        """Log the checkpoint as the run's MLflow model (pipelines/mlflow_model.py): runs:/<id>/model."""
        if self.client is not None:
            from pipelines.mlflow_model import log_model

            log_model(self.uri, self.run_id, checkpoint_path)

    def finish(self, ok: bool) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def log_evaluation(cfg: Config, set_name: str, summary: Mapping[str, Mapping[str, float]],
                   rows: list[dict]) -> str | None:
    """Log a `samsr eval` result: metrics `eval/<set>/<key>` (means over images) and the per-image table
    `eval/<set>/scores.json`, into the model's own run for `runs:/<id>/…`, else into a new run of
    `eval.experiment` tagged with the model. Returns the run id (None without a tracking URI)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from samsr.evaluation import flat_means

    ec = cfg.eval
    uri = ec.tracking_uri or tracking_uri(cfg)
    if not uri:
        log.warning("no MLflow tracking URI (eval.tracking_uri or MLFLOW_TRACKING_URI): results are not logged")
        return None
    client = MlflowClient(tracking_uri=uri)
    if ec.model.startswith("runs:/"):
        run_id, new = ec.model[len("runs:/"):].split("/", 1)[0], False
    else:
        run = client.create_run(experiment_id_for(client, ec.experiment), run_name=f"eval-{set_name}",
                                tags={"samsr.evaluated_model": redact_uri(ec.model)})
        run_id, new = run.info.run_id, True
    now = int(time.time() * 1000)
    values = flat_means(summary, f"eval/{set_name}/")
    values[f"eval/{set_name}/images"] = float(sum(r["status"] == "ok" for r in rows))
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    for key, value in {"hr": ec.hr, "lr": ec.lr or "(made from hr)", "samples": ec.samples, "seed": ec.seed,
                       "crop": ec.crop}.items():
        client.set_tag(run_id, f"samsr.eval.{set_name}.{key}", redact_uri(str(value)))
    import pandas as pd

    table = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, bytes)} for r in rows])
    client.log_table(run_id, data=table, artifact_file=f"eval/{set_name}/scores.json")
    if new:
        client.set_terminated(run_id, status="FINISHED")
    return run_id


__all__ = ["Tracker", "redact_uri", "run_params", "tracking_uri", "experiment_id_for", "log_evaluation"]

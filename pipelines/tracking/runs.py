"""MLflow logging for the train job, from rank 0 only (DESIGN.md "Training").

A run gets the flattened config as params, metrics by step, sample grids LR↑|SR|HR as step images
(`log_image(key="samples", step=…)`: the UI's step slider), system metrics of rank 0's node
(`system/…`, every `job.system_metrics_s`), the latest checkpoint as an artifact, and at the end the
MLflow model (model.py), registered as a new version of `job.register` with alias `job.register_alias`
when set. Its id travels in our checkpoints, so a resumed Ray Train run reopens the same MLflow run.
Without a tracking URI (`job.tracking_uri` or $MLFLOW_TRACKING_URI) nothing is
logged and the job says so once. Credentials never reach params or logs: user:password in a URI is
redacted, and MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD variables are read by its client.
"""
from __future__ import annotations

import logging
import time
from typing import Mapping

import numpy as np

from pipelines.tracking.client import (experiment_id_for, model_run_id, redact_uri, terminate,
                                       tracking_uri)
from pipelines.eval_records import TABLE_ROWS
from pipelines.tracking.model import log_model
from samsr import config as config_mod
from samsr import locations
from samsr.config import Config

log = logging.getLogger(__name__)

PARAM_VALUE_MAX = 6000


def run_params(cfg: Config) -> dict[str, str]:
    """The flattened config as MLflow params, URIs redacted, values cut to MLflow's limit."""
    out = {}
    for key, value in config_mod.flatten(cfg).items():
        text = redact_uri(value) if isinstance(value, str) else str(value)
        out[key] = text[:PARAM_VALUE_MAX]
    return out


class Tracker:
    """One MLflow run; every method is a no-op when there is no tracking URI. A resumed run does not log
    a metric again at a step it already holds (the steps after the checkpoint run again on resume)."""

    def __init__(self, cfg: Config, run_name: str, run_id: str | None = None, *, owner: bool = True,
                 system_metrics: bool = True) -> None:
        self.run_id: str | None = None
        self.cfg = cfg
        self.owner = owner                           # ends the run in finish(); rank 0 works in the driver's run
        self.system = system_metrics
        self.monitor = None                          # mlflow's SystemMetricsMonitor thread
        self.logged_to: dict[str, int] = {}          # metric -> the last step the run held when resumed
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
            # a run's latest value of a metric is the one at its highest step (MLflow keeps it so)
            self.logged_to = {m.key: m.step for m in self.client.get_run(run_id).data.to_proto().metrics}
            self._watch_system(resumed=True)
            return
        experiment_id = experiment_id_for(self.client, cfg.job.experiment)
        run = self.client.create_run(experiment_id, run_name=run_name,
                                     tags={"samsr.method": cfg.method, "samsr.config": cfg.name,
                                           "samsr.ray_train_name": run_name, STORAGE_TAG: storage_tag(cfg)})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        # the client splits them into MLflow's 100-per-request batches itself
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in run_params(cfg).items()])
        self._watch_system(resumed=False)

    def _watch_system(self, resumed: bool) -> None:
        """Start MLflow's system metrics thread for this run (a resumed run continues its steps)."""
        if self.cfg.job.system_metrics_s <= 0 or not self.system:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.job.system_metrics_s,
                                            resume_logging=resumed, tracking_uri=self.uri)
        self.monitor.start()

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, step) for k, v in values.items() if step > self.logged_to.get(k, -1)]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def image(self, image: np.ndarray, key: str, step: int) -> None:
        """A step image: the run's Artifacts/Images view shows `key` with a slider over steps."""
        if self.client is not None:
            self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def artifact(self, local_path: str, artifact_path: str) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, local_path, artifact_path)

    def model(self, checkpoint_path: str) -> None:
        """Log the checkpoint as the run's MLflow model (pipelines/tracking/model.py): runs:/<id>/model, and
        with `job.register` as models:/<register>@<register_alias>."""
        if self.client is not None:
            job = self.cfg.job
            version = log_model(self.uri, self.run_id, checkpoint_path, self.cfg, job.register, job.register_alias)
            if version is not None:
                print(f"samsr train: registered {job.register!r} version {version}: "
                      f"models:/{job.register}@{job.register_alias}", flush=True)

    def finish(self, ok: bool) -> None:
        if self.client is not None:
            if self.monitor is not None:
                self.monitor.finish()
            if self.owner:
                terminate(self.client, self.run_id, "FINISHED" if ok else "FAILED")

    @classmethod
    def for_job(cls, cfg: Config, run_name: str) -> "Tracker":
        """The driver's handle on the training job's run: the run this job (name + storage) logged to before
        — a rerun after a killed driver or a failure, whether or not a checkpoint was written — else a new
        one. Workers log into it (`Tracker(cfg, name, run_id, owner=False)`); the driver ends it."""
        uri = tracking_uri(cfg)
        if not uri:
            return cls(cfg, run_name)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.search_runs(
            [experiment_id_for(client, cfg.job.experiment)], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`samsr.ray_train_name` = {_quoted(run_name)} and "
                          f"tags.`{STORAGE_TAG}` = {_quoted(storage_tag(cfg))}")
        return cls(cfg, run_name, found[0].info.run_id if found else None, system_metrics=False)


STORAGE_TAG = "samsr.storage"


def storage_tag(cfg: Config) -> str:
    """The job's Ray Train storage as a tag (userinfo redacted): with the run name, what identifies the job."""
    return redact_uri(locations.normalize(cfg.job.storage))


def _quoted(value: str) -> str:
    """An MLflow filter-string literal (its parser has no escapes: the quote the value lacks)."""
    for quote in ("'", '"'):
        if quote not in value:
            return quote + value + quote
    raise config_mod.ConfigError(f"{value!r}: a job name or storage URI with both ' and \" cannot be found again "
                                 "in MLflow; rename it")


def evaluation_run(cfg: Config, set_name: str) -> tuple[str, str, bool] | None:
    """(tracking URI, run id, made here) of the MLflow run a `samsr eval` result goes to: the run that logged
    the model (runs:/<id>/…, models:/<name>@<alias>, models:/<name>/<version>), else a new run of
    `eval.experiment` tagged with the model. None without a tracking URI."""
    from mlflow import MlflowClient

    ec = cfg.eval
    uri = ec.tracking_uri or tracking_uri(cfg)
    if not uri:
        log.warning("no MLflow tracking URI (eval.tracking_uri or MLFLOW_TRACKING_URI): results are not logged")
        return None
    client = MlflowClient(tracking_uri=uri)
    run_id = model_run_id(client, ec.model)
    if run_id:
        return uri, run_id, False
    run = client.create_run(experiment_id_for(client, ec.experiment), run_name=f"eval-{set_name}",
                            tags={"samsr.evaluated_model": redact_uri(ec.model)})
    return uri, run.info.run_id, True


def log_evaluation(cfg: Config, set_name: str, summary: Mapping[str, Mapping[str, float]],
                   rows: list[dict], run: tuple[str, str, bool] | None = None, images: int | None = None,
                   table_note: str = "") -> str | None:
    """Log a `samsr eval` result into `run` (`evaluation_run`; found or made here when None, and then ended
    here): metrics `eval/<set>/<key>` (means over images) and `eval/<set>/images` (`images`, else the ok
    rows), tags with the set's settings, and `rows` — at most TABLE_ROWS of them — as the MLflow table
    `eval/<set>/scores.json` (`table_note`, e.g. "first 1000 of 52000 rows", as a tag). Returns the run id
    (None without a tracking URI)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from samsr.evaluation import flat_means

    ec = cfg.eval
    ours = run is None
    run = evaluation_run(cfg, set_name) if ours else run
    if run is None:
        return None
    uri, run_id, new = run
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    values = flat_means(summary, f"eval/{set_name}/")
    values[f"eval/{set_name}/images"] = float(sum(r["status"] == "ok" for r in rows) if images is None else images)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    for key, value in {"hr": ec.hr, "lr": ec.lr or "(made from hr)", "samples": ec.samples, "seed": ec.seed,
                       "crop": ec.crop, "table": table_note}.items():
        if value != "":
            client.set_tag(run_id, f"samsr.eval.{set_name}.{key}", redact_uri(str(value)))
    import pandas as pd

    table = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, bytes)} for r in rows[:TABLE_ROWS]])
    client.log_table(run_id, data=table, artifact_file=f"eval/{set_name}/scores.json")
    if ours and new:
        terminate(client, run_id, "FINISHED")
    return run_id


__all__ = ["Tracker", "run_params", "evaluation_run", "log_evaluation"]

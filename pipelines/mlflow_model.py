"""A trained samsr model as an MLflow model (DESIGN.md "Training"): the samsr checkpoint (state_dicts +
config) plus our own loader, logged as an MLflow pyfunc *from code* — nothing is pickled, and the
checkpoint is read with `weights_only=True`.

    method, cfg = load_method("runs:/<run_id>/model")      # or models:/…, a path, an s3:// checkpoint
    sr = mlflow.pyfunc.load_model("runs:/<run_id>/model").predict([lr_uint8])   # list of SR uint8 arrays
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import mlflow.pyfunc
import numpy as np

from samsr import config as config_mod
from samsr.checkpoint import load_checkpoint
from samsr.config import Config

MODEL_NAME = "model"             # the logged model's name: runs:/<run_id>/model
CHECKPOINT_KEY = "checkpoint"    # the pyfunc artifact holding the samsr checkpoint
ENTRY = Path(__file__).with_name("mlflow_entry.py")
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


@contextlib.contextmanager
def _tracking(uri: str | None):
    """Use tracking server `uri` for the block (MLflow's global setting, restored after)."""
    if not uri:
        yield
        return
    import mlflow
    import mlflow.tracking

    was_set, before = mlflow.tracking.is_tracking_uri_set(), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before if was_set else None)


def _local_checkpoint(uri: str, tracking_uri: str | None = None) -> str:
    """A samsr checkpoint file for `uri`: MLflow URIs are downloaded (from `tracking_uri`, default
    MLflow's: $MLFLOW_TRACKING_URI), paths and s3:// pass through."""
    if not uri.startswith(MLFLOW_SCHEMES):
        return uri
    import mlflow.artifacts

    with _tracking(tracking_uri):       # runs:/ names a logged model, found through the global URI
        local = Path(mlflow.artifacts.download_artifacts(uri))
    if local.is_file():
        return str(local)
    found = sorted(local.rglob("*.pt"))
    if len(found) != 1:
        raise FileNotFoundError(f"{uri!r} holds {len(found)} .pt files under {local}; expected the one samsr "
                                "checkpoint of a model logged by `samsr train`")
    return str(found[0])


def load_method(uri: str, device: str = "cpu", tracking_uri: str | None = None) -> tuple[Any, Config]:
    """The trained model and its config from a samsr checkpoint or an MLflow model URI, in eval mode."""
    from samsr.method import build_method

    payload = load_checkpoint(_local_checkpoint(uri, tracking_uri))
    cfg = payload["config"]
    if cfg.method == "samsr-student":        # the teacher's weights are in the student's own state
        cfg = config_mod.replace(cfg, resshift=config_mod.replace(cfg.resshift, teacher=""))
    method = build_method(cfg)
    method.load_state_dict(payload["state"]["model"])
    return method.to(device).eval(), payload["config"]


def load_for_inference(uri: str, overrides: Sequence[str] = (), tracking_uri: str | None = None,
                       threads: int = 1) -> tuple[Any, Config, Any, str]:
    """(model, its config with `overrides`, its segmenter when it needs SAM at inference, device) for a
    batch job's actor: on the actor's GPU when it has one, else `threads` CPU threads."""
    import torch

    from samsr.structure.segmenters import build_segmenter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, threads))      # as many as the CPUs the actor reserved
    method, cfg = load_method(uri, device, tracking_uri or None)
    cfg = config_mod.with_overrides(cfg, overrides)
    segmenter = build_segmenter(cfg.segmenter) if getattr(method, "needs_sam", False) else None
    return method, cfg, segmenter, device


def check_model(uri: str, tracking_uri: str | None = None) -> None:
    """Fail in seconds, before any work, when `uri` names no model: a missing file or s3:// object (or its
    bucket, or an endpoint that does not answer), an MLflow server that does not answer, an MLflow run
    without a logged model, or an unknown registered model/alias. Raises FileNotFoundError or
    LocationError, one line naming where it looked."""
    from samsr import locations, storage

    if not uri:
        raise FileNotFoundError("no model given; pass a samsr checkpoint (path | s3://) or an MLflow model "
                                "(runs:/<id>/model | models:/<name>@<alias>)")
    if not uri.startswith(MLFLOW_SCHEMES):
        if storage.is_s3(uri):
            locations.require_input(uri, "model")      # bucket + endpoint, short timeout, no long retries
        if not storage.exists(uri):
            where = uri if storage.is_s3(uri) else str(Path(uri).expanduser().resolve())
            raise FileNotFoundError(f"no model at {uri!r} (looked at {where}); pass a samsr checkpoint "
                                    "(path | s3://) or an MLflow model (runs:/<id>/model | models:/<name>@<alias>)")
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import check_tracking_reachable
    from samsr.redact import redact_uri

    client = MlflowClient(tracking_uri or None)
    check_tracking_reachable(client.tracking_uri)     # in seconds, where MLflow would retry for minutes
    try:
        with _tracking(tracking_uri):   # MLflow 3 resolves runs:/…/model through the global tracking URI
            _check_mlflow_model(client, uri)
    except MlflowException as exc:
        raise FileNotFoundError(f"no MLflow model {uri!r} on {redact_uri(client.tracking_uri)}: "
                                f"{str(exc).splitlines()[0][:300]}") from exc


def _check_mlflow_model(client, uri: str) -> None:
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        client.get_run(run_id)
        if not client.list_artifacts(run_id, path or MODEL_NAME):
            raise FileNotFoundError(f"MLflow run {run_id} has no artifacts under {path or MODEL_NAME!r} ({uri!r}); "
                                    f"`samsr train` logs its model as runs:/<run_id>/{MODEL_NAME}")
    elif uri.startswith("models:/"):
        name, _, ref = uri[len("models:/"):].partition("/")
        name, _, alias = name.partition("@")
        if alias:
            client.get_model_version_by_alias(name, alias)
        elif ref and ref.isdigit():
            client.get_model_version(name, ref)
        else:
            client.get_registered_model(name)


class SamsrPyfunc(mlflow.pyfunc.PythonModel):
    """predict(list of LR (h,w,3) uint8 arrays, or one) -> list of SR (h*s,w*s,3) uint8 arrays."""

    def load_context(self, context) -> None:
        self.method, self.cfg, self.segmenter, self.device = load_for_inference(context.artifacts[CHECKPOINT_KEY])

    def predict(self, context, model_input, params: dict | None = None) -> list[np.ndarray]:
        from samsr.infer import upscale_array

        batch = [model_input] if isinstance(model_input, np.ndarray) and model_input.ndim == 3 else list(model_input)
        seed = int((params or {}).get("seed", self.cfg.infer.seed))
        return [upscale_array(self.method, np.asarray(img, dtype=np.uint8), self.cfg.infer, segmenter=self.segmenter,
                              soft=self.cfg.resshift.soft_masks, seed=seed, device=self.device) for img in batch]


def log_model(tracking_uri: str, run_id: str, checkpoint_path: str) -> None:
    """Log the checkpoint as the run's MLflow model `model` (pyfunc from code, no pickle)."""
    import mlflow
    import torch

    from pipelines.tracking import no_secret_links

    client = mlflow.MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    with _tracking(tracking_uri), no_secret_links(tracking_uri), mlflow.start_run(run_id=run_id):
        mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=str(ENTRY),
                                artifacts={CHECKPOINT_KEY: checkpoint_path},
                                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "samsr"])
    client.update_run(run_id, status=status)   # start_run/end_run marked it FINISHED; the job decides


__all__ = ["MODEL_NAME", "load_method", "load_for_inference", "check_model", "SamsrPyfunc", "log_model"]

"""A trained samsr model as an MLflow model (DESIGN.md "Training"): the samsr checkpoint (state_dicts +
config) plus our own loader, logged as an MLflow pyfunc *from code* — nothing is pickled, and the
checkpoint is read with `weights_only=True`.

The model carries its code: `samsr/` and `pipelines/` go in as MLflow `code_paths`, so no `samsr`
package is asked of pip (none is published, and whoever published one would get their code installed).
Its requirements are the libraries that code imports, pinned to the versions it was trained with. It
has a signature (uint8 batch (n,h,w,3) in, (n,h·s,w·s,3) out, a `seed` param) and an input example.

    method, cfg = load_method("models:/<name>@<alias>")     # or runs:/<id>/model, a path, an s3:// checkpoint
    sr = mlflow.pyfunc.load_model("models:/<name>@<alias>").predict(lr_batch, params={"seed": 0})
"""
from __future__ import annotations

import contextlib
import importlib.metadata
from pathlib import Path
from typing import Any, Sequence

import mlflow.pyfunc
import numpy as np

from pipelines.tracking.client import check_tracking_reachable, no_secret_links, registered_model_ref
from samsr import config as config_mod
from samsr.checkpoint import load_checkpoint
from samsr.config import Config

MODEL_NAME = "model"             # the logged model's name: runs:/<run_id>/model
CHECKPOINT_KEY = "checkpoint"    # the pyfunc artifact holding the samsr checkpoint
ENTRY = Path(__file__).with_name("entry.py")
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
# what the model's code (samsr/ and this module) imports at inference, as pip distributions; MLflow adds
# mlflow itself. tests/test_mlflow_model.py checks this against the imports of the modules a prediction loads.
INFERENCE_REQUIREMENTS = ("torch", "torchvision", "segment-anything", "pycocotools", "numpy", "pillow", "pyyaml",
                          "scikit-image", "pyarrow", "requests")


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
        name, alias, ref = registered_model_ref(uri)
        if alias:
            client.get_model_version_by_alias(name, alias)
        elif ref and ref.isdigit():
            client.get_model_version(name, ref)
        else:
            client.get_registered_model(name)


class SamsrPyfunc(mlflow.pyfunc.PythonModel):
    """predict(LR uint8 batch (n,h,w,3): one image is lr[None]) -> SR uint8 batch (n,h·s,w·s,3);
    params {"seed": int}. MLflow checks the input against the logged signature before predict is called
    (the np.ndarray hint tells it there is no type-hint schema to infer)."""

    def load_context(self, context) -> None:
        self.method, self.cfg, self.segmenter, self.device = load_for_inference(context.artifacts[CHECKPOINT_KEY])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        from samsr.infer import upscale_array

        batch = np.asarray(model_input, dtype=np.uint8)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected a batch of LR images shaped (n,h,w,3), uint8 RGB; got {batch.shape}")
        seed = int((params or {}).get("seed", self.cfg.infer.seed))
        return np.stack([upscale_array(self.method, img, self.cfg.infer, segmenter=self.segmenter,
                                       soft=self.cfg.resshift.soft_masks, seed=seed, device=self.device)
                         for img in batch])


def model_requirements() -> list[str]:
    """INFERENCE_REQUIREMENTS pinned to the installed versions (local tags such as +cu130 dropped)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in INFERENCE_REQUIREMENTS]


def code_paths() -> list[str]:
    """The packages the model carries: samsr (the networks and sampler) and pipelines (this wrapper)."""
    import pipelines
    import samsr

    return [str(Path(samsr.__file__).parent), str(Path(pipelines.__file__).parent)]


def model_signature(cfg: Config):
    """uint8 (n,h,w,3) -> uint8 (n,H,W,3), and the sampling seed as a param (default: the config's)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    images = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    return ModelSignature(inputs=images, outputs=images,
                          params=ParamSchema([ParamSpec("seed", "long", int(cfg.infer.seed))]))


def input_example() -> np.ndarray:
    """One 8x8 LR image (a colour ramp): small enough that MLflow's serving check at logging is quick."""
    ramp = np.linspace(0, 255, 8, dtype=np.float64)
    return np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), -1)[None].astype(np.uint8)


def log_model(tracking_uri: str, run_id: str, checkpoint_path: str, cfg: Config, register: str = "",
              alias: str = "") -> int | None:
    """Log the checkpoint (whose config is `cfg`: the signature's default seed) as the run's MLflow model
    `model` (pyfunc from code, no pickle); with `register`, also as a new version of registered model
    `register`, `alias` pointing at it. Returns that version."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    with _tracking(tracking_uri), no_secret_links(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=str(ENTRY),
                                       artifacts={CHECKPOINT_KEY: checkpoint_path}, code_paths=code_paths(),
                                       pip_requirements=model_requirements(), signature=model_signature(cfg),
                                       input_example=input_example(), registered_model_name=register or None)
    client.update_run(run_id, status=status)   # start_run/end_run marked it FINISHED; the job decides
    if not register:
        return None
    version = int(info.registered_model_version)
    if alias:
        client.set_registered_model_alias(register, alias, str(version))
    return version


__all__ = ["MODEL_NAME", "load_method", "load_for_inference", "check_model", "SamsrPyfunc", "log_model",
           "model_requirements", "code_paths", "model_signature"]

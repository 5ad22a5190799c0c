"""Connecting a job to Ray: the cluster `RAY_ADDRESS` names (or a local one), with the environment its
workers need — S3 endpoint and credentials, MLflow server — passed along, never logged."""
from __future__ import annotations

import os

ENV_PREFIXES = ("AWS_", "SAMSR_", "MLFLOW_")
ENV_NAMES = ("NO_PROXY", "no_proxy")


def worker_env() -> dict[str, str]:
    """The variables Ray workers need (S3 endpoint + credentials, MLflow); passed, never logged."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def ensure_ray() -> None:
    """Connect to $RAY_ADDRESS (a running cluster) or start a local Ray, unless already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, runtime_env={"env_vars": worker_env()})


def add_model_set(p) -> None:
    """`--model-set KEY=VALUE` (repeatable): overrides of a model's own infer.* / segmenter.* settings."""
    p.add_argument("--model-set", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the model's own infer.* or segmenter.* settings, e.g. infer.tile=128 or "
                        "segmenter.checkpoint=s3://…")


def entrypoint_parser(module: str, description: str, example: str, model_set: bool = False):
    """The argparse parser of a `python -m pipelines.<job>` entrypoint (what `ray job submit` runs):
    `--config` preset or YAML, repeatable `--set key=value` overrides (and `--model-set` for the jobs
    that load a trained model)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    p.add_argument("--config", default="samdiffsr", help="preset name or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"config override, e.g. {example} (repeatable)")
    if model_set:
        add_model_set(p)
    return p

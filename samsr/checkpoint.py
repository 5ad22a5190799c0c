"""Checkpoints: a plain dict of state_dicts + the resolved config, never a pickled module.

Loaded with `torch.load(..., weights_only=True)`, from a local path or an `s3://` URI. The stored config
holds no credentials: the userinfo of every URI in it (e.g. `job.tracking_uri=https://user:pw@host`) and
presigned signatures are replaced by `***` (samsr.redact) before it is written.
"""
from __future__ import annotations

import io
from typing import Any, Mapping

import torch

from samsr import config as config_mod
from samsr import redact, storage

FORMAT = "samsr-checkpoint/1"


def save_checkpoint(uri: str, modules: Mapping[str, torch.nn.Module], cfg: config_mod.Config,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Write `{name: state_dict}` + config (+ JSON-able extras, e.g. step, MLflow run id) atomically;
    URIs in the config and extras are written without userinfo or signatures."""
    payload = {
        "format": FORMAT,
        "config": redact.redact_config(cfg),
        "state": {name: {k: v.detach().cpu() for k, v in m.state_dict().items()} for name, m in modules.items()},
        "extra": redact.redact_value(dict(extra or {})),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_checkpoint(uri: str) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; returns its dict with `config` as a Config."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no checkpoint at {uri!r} (looked there; pass a local path or s3:// URI "
                                f"of a file written by samsr)") from exc
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{uri!r} is not a samsr checkpoint (expected format {FORMAT!r})")
    payload["config"] = config_mod.from_dict(payload["config"])
    return payload

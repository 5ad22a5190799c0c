"""The logged MLflow model as a user deploys it: registered under an alias, loaded in a fresh process
where samsr is not installed (its code comes from the model's code_paths), pinned requirements that
pip resolves, a signature and an input example (issue 9, item 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.tracking.model import INFERENCE_REQUIREMENTS, log_model, model_requirements
from pipelines.local.photos import bundled_photo
from samsr import config
from samsr.checkpoint import save_checkpoint
from samsr.diffusion.samsr import ResShiftTeacher

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: samsr/pipelines from this checkout (the editable install, the cwd) are
# made unimportable first, so everything below comes from the downloaded model.
FRESH = r"""
import ast, importlib.metadata, importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path = [p for p in sys.path if p and p.rstrip("/") != sys.argv[1]]
assert importlib.util.find_spec("samsr") is None and importlib.util.find_spec("pipelines") is None
import mlflow.pyfunc
import numpy as np

model = mlflow.pyfunc.load_model(sys.argv[2])
np.save(sys.argv[4], model.predict(np.load(sys.argv[3]), params={"seed": 7}))
ours = [m for m in list(sys.modules.values())
        if getattr(m, "__file__", None) and m.__name__.split(".")[0] in ("samsr", "pipelines")]
imported = set()
for module in ours:
    for node in ast.walk(ast.parse(open(module.__file__).read())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
third = imported - set(sys.stdlib_module_names) - {"samsr", "pipelines", "mlflow"}   # mlflow: MLflow pins it
dists = importlib.metadata.packages_distributions()
print(json.dumps({"samsr": sys.modules["samsr"].__file__, "modules": len(ours),
                  "needs": sorted({d.lower() for name in third for d in dists.get(name, [name])})}))
"""


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.mark.slow
def test_registered_model_loads_by_alias_in_a_fresh_process(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    torch.manual_seed(0)
    cfg = config.load("samsr-teacher-tiny")
    save_checkpoint(str(tmp_path / "teacher.pt"), {"model": ResShiftTeacher.from_config(cfg)}, cfg)
    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("mlflow-model-test"))
    assert log_model(mlflow_server, run.info.run_id, str(tmp_path / "teacher.pt"), cfg, "tiny-teacher", "candidate") == 1
    assert log_model(mlflow_server, run.info.run_id, str(tmp_path / "teacher.pt"), cfg, "tiny-teacher", "next") == 2
    assert client.get_run(run.info.run_id).info.status == "RUNNING"          # the job decides, not log_model
    assert client.get_model_version_by_alias("tiny-teacher", "candidate").version == "1"
    uri = "models:/tiny-teacher@candidate"

    # signature, input example, requirements: what a serving environment is built from
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    info = mlflow.models.get_model_info(uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    sig = info.signature.to_dict()
    assert json.loads(sig["inputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": [-1, -1, -1, 3]}}]
    assert json.loads(sig["outputs"]) == json.loads(sig["inputs"])
    assert json.loads(sig["params"]) == [{"name": "seed", "type": "long", "default": 0, "shape": None}]
    example = json.loads((model_dir / "serving_input_example.json").read_text())
    assert np.asarray(example["inputs"]).shape == (1, 8, 8, 3)
    requirements = (model_dir / "requirements.txt").read_text().split()
    names = [_normal(r.split("==")[0]) for r in requirements]
    assert "samsr" not in names and all("==" in r for r in requirements), requirements     # all pinned
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and "mlflow" in names
    assert sorted(model_requirements()) == sorted(r for r in requirements if not r.startswith("mlflow"))
    assert {p.name for p in (model_dir / "code").iterdir()} == {"samsr", "pipelines"}
    assert not list(model_dir.rglob("*.pkl")) and not list(model_dir.rglob("__pycache__"))
    # every name resolves on the package indexes (pip's configured ones): nothing unpublished
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                          "-r", str(model_dir / "requirements.txt")], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert "Would install" in pip.stdout

    # a fresh process without samsr installed loads the model by alias and predicts
    lr = np.stack([bundled_photo("coffee")[:12, :16], bundled_photo("chelsea")[:12, :16]])
    np.save(tmp_path / "lr.npy", lr)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", FRESH, str(REPO), uri, str(tmp_path / "lr.npy"),
                           str(tmp_path / "sr.npy")], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["samsr"].startswith(str(REPO)) and "/code/samsr/" in report["samsr"]
    # the libraries our loaded modules import are all in the model's requirements
    missing = set(report["needs"]) - set(names)
    assert not missing, f"the model's code imports {sorted(missing)}, not in INFERENCE_REQUIREMENTS {INFERENCE_REQUIREMENTS}"
    sr = np.load(tmp_path / "sr.npy")
    assert sr.shape == (2, 48, 64, 3) and sr.dtype == np.uint8
    # the same numbers as our own loader and sampler with that seed
    from pipelines.tracking.model import load_method
    from samsr.infer import upscale_array

    method, mcfg = load_method(uri, tracking_uri=mlflow_server)
    expected = upscale_array(method, lr[1], mcfg.infer, seed=7)
    assert np.array_equal(sr[1], expected)

    # `samsr eval --model models:/…@alias` logs into the run that trained (logged) that version
    from pipelines.tracking.client import model_run_id
    from pipelines.tracking.runs import log_evaluation

    assert model_run_id(client, "models:/tiny-teacher/2") == run.info.run_id
    assert model_run_id(client, "./teacher.pt") is None
    ecfg = config.load("samsr-teacher-tiny", [f"eval.model={uri}", f"eval.tracking_uri={mlflow_server}"])
    logged = log_evaluation(ecfg, "set5", {"psnr_y": {"mean": 25.5}}, [{"status": "ok", "key": "a.png"}])
    assert logged == run.info.run_id
    assert client.get_run(run.info.run_id).data.metrics["eval/set5/psnr_y"] == 25.5

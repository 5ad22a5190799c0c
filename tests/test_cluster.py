"""cluster/: the manifests parse, and every entrypoint they name is a valid samsr CLI invocation whose
config resolves (unknown keys fail here, not on a cluster)."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from samsr import config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
JOBS = sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml"))


def check_entrypoint(command: str) -> str:
    """`python -m pipelines.<job> ...` -> the job name, after its own parser and the config accept it."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("pipelines."), command
    module = importlib.import_module(argv[2])
    args = module.parser().parse_args(argv[3:])
    config.load(args.config, args.overrides)                  # unknown keys and bad values raise here
    for text in getattr(args, "model_overrides", []):
        key, _ = config.parse_override(text)
        assert key.startswith(("infer.", "segmenter.")), text
    return argv[2].split(".")[1]


def test_rayjobs_name_valid_entrypoints_on_the_samsr_cluster():
    assert [p.name for p in JOBS] == ["rayjob-eval.yaml", "rayjob-shard.yaml", "rayjob-train.yaml", "rayjob-upscale.yaml"]
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == ray.__version__
    for path in JOBS:
        job = yaml.safe_load(path.read_text())
        assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        assert check_entrypoint(job["spec"]["entrypoint"]) == path.stem.split("-")[1]
        assert isinstance(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"], dict)


def test_every_cluster_container_has_token_auth_and_the_samsr_image():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())["spec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = set()
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        images.add(container["image"])
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
        assert container["envFrom"] == [{"secretRef": {"name": "samsr-ray-token"}}]
    assert len(images) == 1 and "gpu" in {g["groupName"] for g in cluster["workerGroupSpecs"]}
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_dockerfile_builds_on_the_ray_gpu_image_of_our_ray_version():
    text = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    root = CLUSTER.parent
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for src in sources.split():
            assert (root / src).exists(), src
    assert "-c constraints.txt" in text


def test_launcher_and_runtime_env():
    launcher = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any("ray start --head" in c for c in launcher["head_start_ray_commands"])
    assert "-e RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert "-e RAY_AUTH_TOKEN" in launcher["docker"]["run_options"]      # forwarded, never written here
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) == {"env_vars"} and not any("SECRET" in k or "TOKEN" in k for k in env["env_vars"])
    cluster_text = "".join(p.read_text() for p in CLUSTER.rglob("*.yaml"))
    assert not re.search(r"(?i)(aws_secret_access_key|password)\s*[:=]\s*\S", cluster_text)


@pytest.mark.parametrize("command", ["python -m pipelines.train --set job.nope=1",
                                     "python -m pipelines.shard --sett shard.input=x"])
def test_a_bad_entrypoint_is_caught(command):
    with pytest.raises((config.ConfigError, SystemExit)):
        check_entrypoint(command)

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
        assert container["envFrom"] == [{"secretRef": {"name": "samsr-ray-token"}},
                                        {"secretRef": {"name": "samsr-credentials", "optional": True}}]
        assert group["template"]["spec"]["serviceAccountName"] == "samsr"      # IRSA: S3 without keys
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


CREDENTIALS = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|SESSION|CREDENTIAL|PROFILE", re.I)


def runtime_envs() -> dict[str, dict]:
    """Every runtime_env the manifests define: the RayJobs' runtimeEnvYAML and cluster/runtime_env.yaml."""
    envs = {p.name: yaml.safe_load(yaml.safe_load(p.read_text())["spec"]["runtimeEnvYAML"]) for p in JOBS}
    envs["runtime_env.yaml"] = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    return envs


def test_no_manifest_puts_a_credential_into_a_runtime_env():
    from pipelines.rayenv import WORKER_ENV
    from samsr.redact import redact_uri

    envs = runtime_envs()
    assert len(envs) == len(JOBS) + 1
    for name, env in envs.items():
        env_vars = env["env_vars"]
        assert "AWS_SECRET_ACCESS_KEY" not in env_vars and "AWS_ACCESS_KEY_ID" not in env_vars, name
        assert not [k for k in env_vars if CREDENTIALS.search(k)], name
        assert set(env_vars) <= set(WORKER_ENV) | {"OMP_NUM_THREADS"}, name       # the jobs' own allowlist
        assert all(redact_uri(str(v)) == str(v) for v in env_vars.values()), name  # no user:password@


def test_credentials_come_from_the_nodes():
    """KubeRay: a service account (IRSA) and an optional secret as env; launcher: instance profiles.
    No container env holds a credential value written in a manifest."""
    account = yaml.safe_load((CLUSTER / "kuberay" / "serviceaccount.yaml").read_text())
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "samsr"
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())["spec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for entry in group["template"]["spec"]["containers"][0]["env"]:
            assert not (CREDENTIALS.search(entry["name"]) and "value" in entry), entry
    launcher = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    for name, node in launcher["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    options = " ".join(launcher["docker"]["run_options"])
    assert "AWS_SECRET_ACCESS_KEY" not in options and "AWS_ACCESS_KEY_ID" not in options
    assert not re.search(r"-e \w*(TOKEN|PASSWORD)=", options)                     # forwarded by name only


@pytest.mark.parametrize("command", ["python -m pipelines.train --set job.nope=1",
                                     "python -m pipelines.shard --sett shard.input=x"])
def test_a_bad_entrypoint_is_caught(command):
    with pytest.raises((config.ConfigError, SystemExit)):
        check_entrypoint(command)

"""The README's "Your own runs on the local stack" runs as written: its bash lines in order in one bash
(`set -euo pipefail`, the repo's .venv/bin on PATH, a fresh folder, no RAY_/AWS_/MLFLOW_ variables
inherited), up to `samsr local down`; then the stack is checked (shards, MLflow run, upscaled images,
no token printed) and the rest of the section — `samsr local down` — runs and must close every port."""
from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import local
from pipelines.local.photos import HELD_OUT, TRAIN

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Your own runs on the local stack"


def section_commands(readme: str = (ROOT / "README.md").read_text()) -> str:
    """The bash code blocks of the README's local-stack section, in order."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    body = readme[start:end if end > 0 else None]
    return "\n".join(re.findall(r"```bash\n(.*?)```", body, flags=re.S))


def split_at_down(script: str) -> tuple[str, str]:
    lines = script.splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("samsr local down"))
    return "\n".join(lines[:cut]) + "\n", "\n".join(lines[cut:]) + "\n"


def bash(script: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "SAMSR_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(["bash", "-c", "PS4='+ [${SECONDS}s] '\nset -euo pipefail -x\n" + script], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def port_open(url_or_address: str) -> bool:
    host, port = re.sub(r"^\w+://", "", url_or_address).rstrip("/").rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) == 0


def test_section_is_the_whole_loop_in_order():
    steps = ["samsr local up", 'eval "$(samsr local env)"', "samsr shard", "samsr train", "samsr eval",
             "samsr upscale", "$MLFLOW_TRACKING_URI", "samsr local down"]
    script = section_commands()
    positions = [script.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), dict(zip(steps, positions))
    assert "ray job submit" in script and "RAY_AUTH_TOKEN" not in script     # the token stays in its file


def test_env_prints_paths_and_urls_never_the_token(tmp_path):
    """`samsr local env` from a stack's state file (no services needed to print it): eval'd in a shell that
    held another cluster's token, real AWS keys and a proxy list, it points the shell at the stack."""
    stack = tmp_path / "my stack"
    stack.mkdir()
    state = {"s3": "http://127.0.0.1:9001", "mlflow": "http://127.0.0.1:9002", "ray_dashboard": "http://127.0.0.1:9003",
             "ray_address": "127.0.0.1:9004", "ray_temp_dir": "", "pids": {}}
    (stack / local.STATE).write_text(json.dumps(state))
    (stack / local.TOKEN).write_text("the-token-itself-0123456789abcdef")
    printed = bash('export RAY_AUTH_TOKEN=stale AWS_ACCESS_KEY_ID=real-key NO_PROXY=corp.example\n'
                   'eval "$(samsr local env --dir "my stack")"\nenv', tmp_path, timeout=60)
    assert printed.returncode == 0, printed.stderr
    env = dict(line.split("=", 1) for line in printed.stdout.splitlines() if "=" in line)
    assert {k: env.get(k) for k in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
                                    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "AWS_PROFILE", "NO_PROXY")} == {
        "AWS_ENDPOINT_URL": state["s3"], "MLFLOW_TRACKING_URI": state["mlflow"], "RAY_ADDRESS": state["ray_address"],
        "RAY_API_SERVER_ADDRESS": state["ray_dashboard"], "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(stack / local.TOKEN), "AWS_PROFILE": local.PROFILE,
        "NO_PROXY": "127.0.0.1,localhost,corp.example"}
    assert "RAY_AUTH_TOKEN" not in env and "AWS_ACCESS_KEY_ID" not in env       # they would win over the files
    creds = Path(env["AWS_SHARED_CREDENTIALS_FILE"])
    assert creds == stack / local.CREDENTIALS and oct(creds.stat().st_mode & 0o777) == "0o600"
    assert f"[{local.PROFILE}]" in creds.read_text()
    assert "the-token-itself" not in printed.stdout + printed.stderr           # `set -x` traced the eval too
    missing = bash("samsr local env --dir nowhere", tmp_path, timeout=60)
    assert missing.returncode == 2 and "no local stack in" in missing.stderr and "samsr local up" in missing.stderr


@pytest.mark.slow
def test_readme_local_stack_section_runs_as_written(tmp_path):
    import boto3
    from mlflow import MlflowClient
    from PIL import Image

    before_down, down = split_at_down(section_commands())
    stack = tmp_path / ".samsr-local"
    try:
        proc = bash(before_down, tmp_path, timeout=1500)
        state = local.read_state(stack)
        out = proc.stdout + proc.stderr
        print("\n".join(line for line in proc.stderr.splitlines() if line.startswith("+ [")))   # when each line ran
        assert proc.returncode == 0, out[-5000:]
        token = (stack / local.TOKEN).read_text().strip()
        assert len(token) >= 32 and token not in out                 # `set -x` traced every line, env included
        assert oct((stack / local.TOKEN).stat().st_mode & 0o777) == oct((stack / local.CREDENTIALS).stat().st_mode
                                                                           & 0o777) == "0o600"
        assert f"export RAY_AUTH_TOKEN_PATH={stack.resolve() / local.TOKEN}" in out

        s3 = boto3.client("s3", endpoint_url=state["s3"], region_name="us-east-1",
                          aws_access_key_id="samsr-local", aws_secret_access_key="samsr-local")

        def get(key: str) -> bytes:
            return s3.get_object(Bucket=local.BUCKET, Key=key)["Body"].read()

        stats = json.loads(get("shards/photos/_stats.json"))
        assert (stats["images_planned"], stats["ok"], stats["shards"]) == (len(TRAIN), len(TRAIN), 3)
        assert stats["segmenter"]["segmenter"].startswith("tiny-sam") and stats["segmenter"]["random_weights"]

        client = MlflowClient(state["mlflow"])
        (run,) = client.search_runs([client.get_experiment_by_name("samsr").experiment_id])
        assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
        assert f"samsr train: model runs:/{run.info.run_id}/model" in proc.stdout
        assert [m.step for m in client.get_metric_history(run.info.run_id, "rrdb/rrdb_l1")][-1] == 20
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/psnr_y")] == [20]
        metrics = run.data.metrics
        assert 10.0 < metrics["eval/holdout/psnr_y"] < 50.0 and 10.0 < metrics["eval/holdout/bicubic_psnr_y"] < 60.0
        assert metrics["eval/holdout/delta_psnr_y"] == pytest.approx(
            metrics["eval/holdout/psnr_y"] - metrics["eval/holdout/bicubic_psnr_y"])

        for name in HELD_OUT:                                          # ×4 of the 64 px sample LR photos
            with Image.open(io.BytesIO(get(f"photos/holdout-lr/{name}.png"))) as lr:
                assert lr.size == (64, 64)
            with Image.open(io.BytesIO(get(f"sr/{name}.png"))) as sr:
                assert sr.size == (256, 256) and sr.mode == "RGB"
        manifest = [json.loads(line) for line in get("sr/_manifest.jsonl").decode().splitlines()]
        assert sorted(r["status"] for r in manifest) == ["ok"] * len(HELD_OUT)
        assert all(port_open(state[k]) for k in ("s3", "mlflow", "ray_dashboard", "ray_address"))
    finally:
        stopped = bash(down, tmp_path, timeout=180)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert local.status(stack) == {} and not any(local.pid_alive(pid) for pid in state["pids"].values())
    assert not any(port_open(state[k]) for k in ("s3", "mlflow", "ray_dashboard", "ray_address"))
    assert not (stack / local.TOKEN).exists() and not (stack / local.CREDENTIALS).exists()

"""Secrets (issue 11, items 9, 10 and 14 in part): credentials never reach Ray's runtime_env, its logs,
checkpoints, `_stats.json` or MLflow params; an MLflow server that does not answer fails in seconds."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import files_holding
from pipelines.local import services
from pipelines.rayenv import worker_env
from pipelines.tracking.client import check_tracking_reachable
from pipelines.tracking.runs import run_params
from samsr import config
from samsr.locations import LocationError
from samsr.redact import redact_config, redact_uri, strip_userinfo

# (uri, redacted, fragments of the secret that must not survive)
CASES = [
    ("https://bob:p@ss@h/", "https://***@h/", ["bob", "p@ss", "ss@"]),
    ("https://bob:p@s:s/w@host:5000/path", "https://***@host:5000/path", ["bob", "p@s", "s:s", "s/w", "/w@"]),
    ("http://u:pw@h:5000", "http://***@h:5000", ["u:pw", "pw@"]),
    ("https://ghp_tok3n@mlflow.example/", "https://***@mlflow.example/", ["ghp_tok3n"]),
    ("https://bob:p w'q@h/x", "https://***@h/x", ["bob", "p w", "w'q"]),
    ("s3://AKIDEXAMPLE:wJal/K7M@bucket/key.png", "s3://***@bucket/key.png", ["AKIDEXAMPLE", "wJal", "K7M"]),
    ("s3://AKID:se@cret@bucket/k", "s3://***@bucket/k", ["AKID", "se@", "cret"]),
    ("https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20260101%2Fus-east-1"
     "&X-Amz-Date=20260101T000000Z&X-Amz-Signature=deadbeef01&X-Amz-Security-Token=FwoGZX",
     "https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     "&X-Amz-Date=20260101T000000Z&X-Amz-Signature=***&X-Amz-Security-Token=***", ["AKID", "deadbeef01", "FwoGZX"]),
    ("abfss://box@acct.dfs.core.windows.net/p?sv=2024&sig=SASsecret",
     "abfss://box@acct.dfs.core.windows.net/p?sv=2024&sig=***", ["SASsecret"]),
    ("MLflow at 'https://bob:p@ss@h:5000' does not answer", "MLflow at 'https://***@h:5000' does not answer", ["p@ss"]),
]
UNCHANGED = ["s3://bucket/photos/img@2x.png", "runs:/0123abcd/model", "models:/samsr@champion", "/data/a@b:c/x.png",
             "http://mlflow:5000", "samdiffsr-tiny", ""]


@pytest.mark.parametrize("uri,redacted,fragments", CASES)
def test_redact_uri_hides_the_whole_userinfo_and_signatures(uri, redacted, fragments):
    assert redact_uri(uri) == redacted
    assert not [f for f in fragments if f in redact_uri(uri)]


@pytest.mark.parametrize("text", UNCHANGED)
def test_redact_uri_leaves_uris_without_credentials_alone(text):
    assert redact_uri(text) == text and strip_userinfo(text) == text


def test_strip_userinfo_gives_a_usable_uri():
    assert strip_userinfo("https://bob:p@s:s/w@host:5000/path") == "https://host:5000/path"
    assert strip_userinfo("http://u:pw@127.0.0.1:5000") == "http://127.0.0.1:5000"


SECRET_URI = "https://bob:p@s:s/w@mlflow.example:5000/"


def secret_config() -> config.Config:
    cfg = config.load("samdiffsr-tiny")
    return config.replace(cfg, job=config.replace(cfg.job, tracking_uri=SECRET_URI),
                          eval=config.replace(cfg.eval, tracking_uri="http://u:pw@h"))


def test_mlflow_params_carry_no_part_of_a_password_with_at_and_colon():
    params = run_params(secret_config())
    assert params["job.tracking_uri"] == "https://***@mlflow.example:5000/"
    assert params["eval.tracking_uri"] == "http://***@h"
    assert not [k for k, v in params.items() if "p@s" in v or "bob" in v or "u:pw" in v]


def test_redact_config_walks_every_section():
    tree = redact_config(secret_config())
    assert tree["job"]["tracking_uri"] == "https://***@mlflow.example:5000/"
    assert tree["eval"]["tracking_uri"] == "http://***@h"
    assert "p@s" not in json.dumps(tree) and tree["data"] == config.to_dict(secret_config())["data"]


def test_a_checkpoint_stores_no_userinfo(tmp_path):
    import torch

    from samsr.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "model.pt"
    save_checkpoint(str(path), {"m": torch.nn.Linear(2, 2)}, secret_config(), extra={"note": "s3://K:S/x@bucket/y"})
    raw = path.read_bytes()
    assert b"p@s:s" not in raw and b"bob" not in raw and b"u:pw" not in raw and b"K:S" not in raw
    payload = load_checkpoint(str(path))
    assert payload["config"].job.tracking_uri == "https://***@mlflow.example:5000/"
    assert payload["extra"]["note"] == "s3://***@bucket/y"


def test_shard_stats_store_no_userinfo(tmp_path):
    from pipelines import shard, shard_resume
    from samsr.shards import plan as plan_mod

    cfg = secret_config()
    cfg = config.replace(cfg, shard=config.replace(cfg.shard, input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    plan = plan_mod.Plan(input=cfg.shard.input, samples_per_shard=1, fingerprint={}, shards=(), rejected=())
    shard._write_totals(cfg, plan, shard_resume.Totals(), 0, 0, 0.0)
    text = (tmp_path / "out" / "_stats.json").read_text()
    assert "p@s" not in text and "bob" not in text and "u:pw" not in text
    assert json.loads(text)["config"]["job"]["tracking_uri"] == "https://***@mlflow.example:5000/"


def test_worker_env_is_an_allowlist_of_settings():
    environ = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "tok",
               "AWS_PROFILE": "dev", "AWS_SOMETHING_NEW": "x", "MLFLOW_TRACKING_PASSWORD": "pw",
               "MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_USERNAME": "bob", "HTTPS_PROXY": "http://u:p@proxy:3128",
               "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
               "MLFLOW_TRACKING_URI": "https://bob:p@ss@mlflow:5000", "MLFLOW_EXPERIMENT_NAME": "e",
               "SAMSR_CACHE_DIR": "/c", "NO_PROXY": "localhost", "AWS_REGION": ""}
    assert worker_env(environ) == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                                   "MLFLOW_TRACKING_URI": "https://mlflow:5000", "MLFLOW_EXPERIMENT_NAME": "e",
                                   "SAMSR_CACHE_DIR": "/c", "NO_PROXY": "localhost"}


def test_local_stack_hands_credentials_to_the_ray_head_not_to_jobs():
    from pipelines import local

    env = local.node_env("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert env["AWS_SECRET_ACCESS_KEY"] and env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"
    assert "AWS_SECRET_ACCESS_KEY" not in worker_env(env) and worker_env(env)["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"


# ---------------------------------------------------------------- an MLflow server that does not answer

def test_unreachable_mlflow_fails_in_seconds_with_the_uri_redacted():
    port = services.free_port()
    uri = f"http://bob:p@s:s@127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(LocationError) as info:
        check_tracking_reachable(uri)
    assert time.monotonic() - t0 < 60
    message = str(info.value)
    assert f"http://***@127.0.0.1:{port}" in message and "p@s" not in message and "bob" not in message
    assert "\n" not in message


def test_reachable_mlflow_and_non_http_uris_pass(mlflow_server, tmp_path):
    check_tracking_reachable(mlflow_server)
    check_tracking_reachable(mlflow_server.replace("http://", "http://nobody:pw@"))   # userinfo not sent
    for uri in ("", f"file://{tmp_path}", f"sqlite:///{tmp_path}/m.db", "databricks"):
        check_tracking_reachable(uri)


def test_train_and_eval_refuse_an_unreachable_mlflow_up_front(tmp_path):
    from pipelines import eval as eval_job
    from pipelines import train

    uri = f"http://bob:p@ss@127.0.0.1:{services.free_port()}"
    t0 = time.monotonic()
    with pytest.raises(LocationError, match=r"MLflow server http://\*\*\*@127\.0\.0\.1"):
        train.run(config.load("samdiffsr-tiny", [f"job.shards={tmp_path}/shards", f"job.storage={tmp_path}/runs",
                                                  f"job.tracking_uri={uri}"]), echo=lambda _: None)
    with pytest.raises(LocationError, match=r"MLflow server http://\*\*\*@127\.0\.0\.1"):
        eval_job.run(config.load("samdiffsr-tiny", [f"eval.model={tmp_path}/m.pt", f"eval.hr={tmp_path}/hr",
                                                     f"eval.tracking_uri={uri}"]), echo=lambda _: None)
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------- Ray: runtime_env and logs

DRIVER = '''
import hashlib, json, ray
from pipelines.rayenv import ensure_ray

ensure_ray()

@ray.remote(num_cpus=0.5)
def read(uri):
    import os
    from samsr import storage
    key = hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest()   # never the key itself
    return (storage.read_bytes(uri).decode(), ray.get_runtime_context().runtime_env.get("env_vars", {{}}),
            os.getpid(), key)

text, worker_vars, pid, key = ray.get(read.remote({uri!r}))
driver_vars = ray.get_runtime_context().runtime_env.get("env_vars", {{}})
print("RESULT " + json.dumps({{"text": text, "worker_vars": worker_vars, "driver_vars": driver_vars, "pid": pid,
                              "key_sha256": key}}))
'''




@pytest.mark.slow
def test_a_submitted_job_reads_s3_while_its_secret_stays_out_of_ray(s3, ray_head, tmp_path):
    """The cluster way: the head (tests/conftest.py `ray_head`, shared by the session's `ray job submit`
    tests) holds the credentials in its own environment; a job submitted with `ray job submit` connects
    through `ensure_ray` (what every samsr job does), its worker reads from the moto S3 with the node's
    secret key in its environment, and the secret is in no runtime_env and no file Ray writes."""
    head, secret = ray_head.head, ray_head.secret
    bucket = s3.bucket("secrets-test")
    s3.client().put_object(Bucket="secrets-test", Key="hello.txt", Body=b"hello from moto")
    assert secret not in json.dumps(dict(os.environ))         # this test's own process never had it
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(uri=f"{bucket}/hello.txt"))
    proc = head.submit([sys.executable, str(driver)], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert result["text"] == "hello from moto"                       # the worker reached S3 with the node's keys
    assert result["key_sha256"] == hashlib.sha256(secret.encode()).hexdigest()   # inherited from the raylet
    assert result["worker_vars"]["AWS_ENDPOINT_URL"] == s3.url       # settings still travel
    for env_vars in (result["worker_vars"], result["driver_vars"]):
        assert "AWS_SECRET_ACCESS_KEY" not in env_vars and secret not in json.dumps(env_vars)
    assert secret not in out
    # after this job, in the whole of Ray's temp dir (every session file and log of the head) and its log
    logs = Path(head.temp_dir) / "session_latest" / "logs"
    (job_id,) = set(re.findall(r"raysubmit_[A-Za-z0-9]+", out))
    assert "RESULT " in (logs / f"job-driver-{job_id}.log").read_text()       # this job's own log is searched
    assert any(logs.glob("runtime_env_agent*.log"))
    assert files_holding(Path(head.temp_dir), secret.encode()) == []
    assert files_holding(ray_head.workdir, secret.encode()) == [] and (ray_head.workdir / "ray-head.log").is_file()


def test_in_process_ray_workers_inherit_the_credentials_without_a_runtime_env(s3, ray_local):
    """tests/conftest.py's in-process Ray: workers get the moto credentials from the driver's environment."""
    bucket = s3.bucket("secrets-inproc")
    s3.client().put_object(Bucket="secrets-inproc", Key="a.txt", Body=b"inherited")

    @ray_local.remote(num_cpus=0.5)
    def read(uri):
        from samsr import storage

        return storage.read_bytes(uri).decode(), os.environ.get("AWS_SECRET_ACCESS_KEY")

    assert ray_local.get(read.remote(f"{bucket}/a.txt")) == ("inherited", os.environ["AWS_SECRET_ACCESS_KEY"])
    assert "AWS_SECRET_ACCESS_KEY" not in ray_local.get_runtime_context().runtime_env.get("env_vars", {})

"""`samsr train`: distributed training on the shards with Ray Train, rank 0 logging to MLflow.

A `TorchTrainer` runs `train_loop` on `job.num_workers` workers (DDP; gloo on CPU, NCCL on GPU). Ray Data
tasks read, decode and crop the shards on any node's CPUs (`pipelines.train_data`, with its seed story);
each worker takes batches from its split of that stream, calls the same
`samsr.train_step` as the plain loop, and every `train.checkpoint_every` steps rank 0 writes a samsr
checkpoint (model + config, loadable weights-only) with the optimizer state and the MLflow run id.
Ray Train keeps checkpoints under `job.storage`/`job.name`; running again with the same name and
storage resumes from the latest one and continues the same MLflow run, without logging again a step
the run already holds; after a completed run, checkpoint folders Ray Train does not list (written by a
worker that outlived a killed driver) are removed. SAM-DiffSR first pretrains its RRDB
(`train.rrdb_iterations`), then trains the diffusion (`train.iterations`).

The driver lists the shards and their sample counts (`plan_data`: empty shards left out, validation
samples held out) and refuses to start when no training sample is left; the shard list reaches the decode
tasks through the dataset's plan, never the workers' config (`worker_config`). Bad samples are skipped and
counted by the decode tasks (`data/skipped_samples`, over all workers); training stops past
`job.max_skipped_fraction` of the samples read.

On a cluster. The MLflow run belongs to the job (name + storage), not to a rank: the driver finds it again
(tags samsr.ray_train_name, samsr.storage) or creates it before any worker starts, hands its id to the
workers and ends it; rank 0 logs into it, skipping steps the run already holds. A lost worker node (or
any worker failure) restarts the worker group from the latest checkpoint, up to `job.max_failures` (3)
times; decode tasks are retried by Ray Data, and the skip tally lives on the driver's node (restartable).
A killed driver: run the same command again. Local paths are refused on a multi-node cluster unless
`job.shared_fs` (pipelines/nodes.py).

    samsr train --config samsr-teacher --set job.shards=s3://bucket/shards --set job.storage=s3://bucket/runs
    python -m pipelines.train --config ... --set ...        # the same, as a `ray job submit` entrypoint
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipelines import nodes, train_data, validation
from pipelines.train_storage import remove_orphan_checkpoints, storage_target  # noqa: F401 (re-exported)
from pipelines.rayenv import data_progress_bars, ensure_ray, entrypoint_parser, require_gpus, run_entrypoint
from pipelines.tracking.client import check_tracking_reachable, tracking_uri
from pipelines.tracking.runs import Tracker
from samsr import config as config_mod
from samsr import images, storage
from samsr.checkpoint import load_checkpoint, save_checkpoint
from samsr.config import Config
from samsr.ema import EMA, make_ema
from samsr.locations import EXIT_OK, LocationError
from samsr.method import build_method
from samsr.redact import redact_config
from samsr.shards import stream
from samsr.train_step import batch_to, make_lr_schedule, make_optimizer, rrdb_pretrain_step, train_step

MODEL_FILE = "model.pt"          # samsr checkpoint (samsr.checkpoint): what `upscale` and users load
RESUME_FILE = "resume.pt"        # optimizer + lr schedule state, weights-only loadable
PROGRESS_S = 30.0                # rank 0's progress line: one per interval (a log file gets no bar redraws)


class LossModule(torch.nn.Module):
    """Wraps a method so DDP sees one forward per step: forward(batch, generator) = method.loss(...)."""

    def __init__(self, method: torch.nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: dict, generator: torch.Generator):
        return self.method.loss(batch, generator)


class _ViaModule:
    """The `loss` interface of samsr.train_step over a (possibly DDP-wrapped) LossModule."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def loss(self, batch: dict, generator: torch.Generator):
        return self.module(batch, generator)


def run_name(cfg: Config) -> str:
    return cfg.job.name or cfg.name


def stages(cfg: Config) -> list[tuple[str, int]]:
    """(stage, steps) in order: SAM-DiffSR pretrains the RRDB first."""
    rrdb = [("rrdb", cfg.train.rrdb_iterations)] if cfg.method == "samdiffsr" and cfg.train.rrdb_iterations else []
    return rrdb + [("diffusion", cfg.train.iterations)]


def sample_grid(method, batch: dict, seed: int) -> np.ndarray:
    """LR↑ | SR | HR of the first crop of `batch` (+ the structure map for SAM-DiffSR), RGB8."""
    one = {k: v[:1] for k, v in batch.items()}
    extra = {}
    if "cover" in one and hasattr(method, "prior"):        # the SAMSR student's SAM-Noise prior
        extra = {"cover": one["cover"], "cover_max": one["cover_max"], "noise_rms": one["noise_rms"]}
    was_training = method.training
    method.eval()
    with torch.no_grad():
        sr = method.super_resolve(one["lr"], generator=torch.Generator(one["lr"].device).manual_seed(seed), **extra)
    method.train(was_training)
    panels = [images.upscale(one["lr"], method.scale), sr, one["hr"]]
    if "spe" in one and method.__class__.__name__ == "SamDiffSR":
        spe = one["spe"] / one["spe"].abs().amax().clamp_min(1e-6)
        panels.append(spe.expand(-1, 3, -1, -1))
    return np.concatenate([images.to_uint8(p.float().cpu())[0] for p in panels], axis=1)


def _replica_spread(params: list[torch.Tensor], world: int) -> float:
    """max − min over workers of the parameter sum: 0 when DDP keeps the replicas identical."""
    if world == 1:
        return 0.0
    import torch.distributed as dist

    total = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)   # on the params' device
    hi, lo = total.clone(), -total.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    return float((hi + lo).cpu())


def plan_data(cfg: Config, uris: list[str] | None = None) -> dict[str, Any]:
    """What the training dataset reads, decided once by the driver: `filled` (the shards holding samples;
    validation holds out from the last), `holdout` (the validation keys) and `counts` (samples per shard).
    LocationError when no training sample is left."""
    uris = uris if uris is not None else stream.list_shards(cfg.job.shards)
    try:
        counts = stream.shard_counts(uris)
        filled = [u for u in uris if counts[u] > 0]
        held = validation.holdout_keys(cfg, filled)[0] if filled else frozenset()
        stream.usable_shards(counts, {filled[-1]: len(held)} if held else {}, cfg.job.shards, cfg.job.num_workers)
    except ValueError as exc:               # no samples (ShardDataError), or validation would take them all
        raise LocationError(str(exc)) from None
    return {"filled": filled, "holdout": sorted(held), "counts": counts}


def worker_config(cfg: Config, data: dict[str, Any], run_id: str | None, fail_after_steps: int = 0) -> dict[str, Any]:
    """Every worker's `train_loop_config`, of a size that does not grow with the shards: the redacted config,
    the MLflow run and rank 0's validation shard (the decode tasks get the shard list through the dataset)."""
    return {"cfg": redact_config(cfg), "fail_after_steps": fail_after_steps, "mlflow_run_id": run_id,
            "val_shard": data["filled"][-1]}


def _save(method, ema: EMA | None, cfg: Config, extra: dict, opt, sched, folder: Path) -> None:
    """`model` holds the weights to use (the EMA when there is one); `live` the trained ones, for resume."""
    modules = {"model": ema.module, "live": method} if ema is not None else {"model": method}
    extra = {**extra, "ema_updates": ema.updates if ema is not None else 0}
    save_checkpoint(str(folder / MODEL_FILE), modules, cfg, extra=extra)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None},
               folder / RESUME_FILE)


def train_loop(loop_config: dict[str, Any], tracking: str = "", tally=None) -> None:
    """The per-worker function. `loop_config` holds the redacted config (Ray Train exports it to its dashboard);
    `tracking`, the MLflow URI with any userinfo, and `tally` (the skip counter actor) reach the workers
    only inside the pickled function. Batches come from this worker's split of the "train" dataset."""
    import ray.train
    import ray.train.torch

    cfg = config_mod.from_dict(loop_config["cfg"])
    if tracking:
        cfg = config_mod.replace(cfg, job=config_mod.replace(cfg.job, tracking_uri=tracking))
    fail_after = int(loop_config.get("fail_after_steps", 0))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)                      # identical init on every worker
    method = build_method(cfg)

    resume = {"stage": "", "step": 0, "mlflow_run_id": None, "ema_updates": 0, "skipped_samples": 0}
    optim_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            payload = load_checkpoint(str(Path(folder) / MODEL_FILE))
            state = payload["state"]
            method.load_state_dict(state.get("live", state["model"]))
            resume.update(payload["extra"])
            optim_state = torch.load(Path(folder) / RESUME_FILE, map_location="cpu", weights_only=True)
            if "live" in state:
                optim_state["ema"] = (state["model"], int(resume["ema_updates"]))
    method.to(device)
    # rank 0 logs into the job's run, which the driver opened (and ends): a restarted group continues it
    run_id = loop_config.get("mlflow_run_id") or resume["mlflow_run_id"]
    tracker = Tracker(cfg, run_name(cfg), run_id, owner=False) if rank == 0 else None
    valset = validation.build(cfg, loop_config["val_shard"]) if rank == 0 else None
    validator = validation.Validator(cfg, valset, device) if valset is not None else None
    if valset is not None:
        print(f"samsr train: validating on {len(valset.names)} image(s) from {valset.source}", flush=True)
    source = train_data.WorkerBatches(cfg, rank, tally)
    batches = iter(source)
    ok = False
    try:
        order = [s for s, _ in stages(cfg)]
        start_stage = order.index(resume["stage"]) if resume["stage"] in order else 0
        for index, (stage, steps) in enumerate(stages(cfg)):
            if index < start_stage:
                continue
            first = resume["step"] + 1 if index == start_stage and resume["stage"] == stage else 1
            if first > steps:           # finished before the restart (its checkpoint holds the result)
                continue
            final = index == len(order) - 1
            feed = {"batches": batches, "source": source,
                    "skipped": int(resume["skipped_samples"]) if first > 1 else 0}
            _run_stage(stage, steps, first, method, cfg, feed, rank, world, device, tracker,
                       optim_state if first > 1 else None, fail_after, final,
                       validator if stage != "rrdb" else None)
            optim_state = None
        ok = True
    finally:
        if tracker is not None:
            tracker.finish(ok)


def _run_stage(stage: str, steps: int, first: int, method, cfg: Config, feed: dict, rank: int, world: int,
               device: torch.device, tracker: Tracker | None, optim_state: dict | None, fail_after: int,
               final: bool, validator: validation.Validator | None = None) -> None:
    """Steps `first`..`steps` of one stage. `feed`: this worker's batches and their `source`
    (train_data.WorkerBatches, for the skip totals) and the skipped samples counted before a resume
    (`skipped`). Metrics of the RRDB stage are named rrdb/…, so no (metric, step) pair repeats across stages."""
    import ray.train
    import ray.train.torch

    tc = cfg.train
    if stage == "rrdb":
        module = method.rrdb
        module.requires_grad_(True)
        module.train()
        opt, sched = make_optimizer(module.parameters(), tc.rrdb_lr), None
    else:
        if cfg.method == "samdiffsr":
            method.rrdb.requires_grad_(False)
        method.train()
        module = LossModule(method)
        opt = make_optimizer(method.trainable_parameters(), tc.lr)
        sched = make_lr_schedule(opt, tc)
    # the weights' EMA (rank 0: it alone validates and saves) for the method's own stage, not RRDB pretraining
    ema = make_ema(method, tc.ema_decay) if rank == 0 and stage != "rrdb" else None
    sampled = ema.module if ema is not None else method        # what validation and the sample grids use
    if optim_state is not None:
        if ema is not None and "ema" in optim_state:
            ema.load_state_dict(*optim_state["ema"])
        opt.load_state_dict(optim_state["optimizer"])
        if sched is not None and optim_state["scheduler"] is not None:
            sched.load_state_dict(optim_state["scheduler"])
    wrapped = ray.train.torch.prepare_model(module, move_to_device=False) if world > 1 else module
    params = [p for p in module.parameters() if p.requires_grad]
    batches = feed["batches"]
    named = (lambda values: {f"rrdb/{k}": v for k, v in values.items()}) if stage == "rrdb" else dict
    generator = torch.Generator(device).manual_seed(tc.seed * 1009 + rank * 7 + first)
    preview = batch_to(next(batches), device) if rank == 0 and stage != "rrdb" else None
    via = _ViaModule(wrapped)
    t0, seen = time.perf_counter(), 0
    shown = t0                                 # rank 0 prints a progress line every PROGRESS_S seconds
    for step in range(first, steps + 1):
        batch = batch_to(next(batches), device)
        if stage == "rrdb":
            metrics = rrdb_pretrain_step(wrapped, opt, batch)
        else:
            metrics = train_step(via, opt, batch, generator, tc.grad_clip, tc.bf16)
            sched.step()
            if ema is not None:
                ema.update(method)
        seen += batch["hr"].shape[0] * world
        is_last = step == steps
        if validator is not None and (step % tc.eval_every == 0 or is_last):
            scores = validator(sampled)
            if tracker is not None:
                tracker.metrics(step, scores)
        logs, saves = step % tc.log_every == 0 or is_last, step % tc.checkpoint_every == 0 or is_last
        skipped = feed["skipped"] + feed["source"].skipped() if logs or saves else 0
        if rank == 0 and (time.perf_counter() - shown >= PROGRESS_S or is_last):
            shown = time.perf_counter()
            loss = metrics.get("loss", metrics.get("rrdb_l1", float("nan")))
            print(f"samsr train: {stage} step {step}/{steps}, loss {loss:.4f}, "
                  f"{seen / (shown - t0):.1f} samples/s", flush=True)
        if logs:
            values = {**metrics, "lr": opt.param_groups[0]["lr"], "samples_per_s": seen / (time.perf_counter() - t0),
                      "data/skipped_samples": skipped}
            if tracker is not None:
                tracker.metrics(step, named(values))
        if saves:
            spread = _replica_spread(params, world)
            report = {"stage": stage, "step": step, "replica_param_spread": spread, "skipped_samples": skipped,
                      "samples_per_s": seen / (time.perf_counter() - t0), **metrics}
            if rank == 0:
                with tempfile.TemporaryDirectory() as folder:
                    extra = {"stage": stage, "step": step, "mlflow_run_id": tracker.run_id if tracker else None,
                             "skipped_samples": skipped}
                    _save(method, ema, cfg, extra, opt, sched, Path(folder))
                    if tracker is not None:
                        tracker.metrics(step, named({"replica_param_spread": spread}))
                        tracker.artifact(str(Path(folder) / MODEL_FILE), "checkpoint")
                        if preview is not None:
                            tracker.image(sample_grid(sampled, preview, tc.seed), "samples", step)
                        if final and is_last:
                            tracker.model(str(Path(folder) / MODEL_FILE))
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(report)
        if fail_after and step == fail_after and rank == 0:   # rank 0 closes its MLflow run, then the group stops
            raise RuntimeError(f"test hook: failing after step {step} (fail_after_steps)")
    if stage == "rrdb":
        module.eval()
        module.requires_grad_(False)


def run(cfg: Config, *, fail_after_steps: int = 0, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `cfg` on Ray (the cluster in RAY_ADDRESS, or a local one). Returns the final metrics,
    the checkpoint URI and the MLflow run id."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not cfg.job.shards:
        raise config_mod.ConfigError("job.shards: set it to the folder or s3:// prefix `samsr shard` wrote")
    if not cfg.job.storage:
        raise config_mod.ConfigError("job.storage: set a folder or s3:// prefix for Ray Train's checkpoints")
    train_data.per_worker_batch(cfg)
    if not 0.0 <= cfg.job.max_skipped_fraction <= 1.0:
        raise config_mod.ConfigError(f"job.max_skipped_fraction={cfg.job.max_skipped_fraction} must lie in [0, 1]")
    check_tracking_reachable(tracking_uri(cfg))   # an MLflow server that does not answer: one line, in seconds
    job = cfg.job
    nodes.check_paths("samsr train", nodes.job_paths(     # a multi-node cluster: local paths refused or checked
        ("--shards", job.shards), ("--storage", job.storage), ("--val", job.val), ("the tracking URI", tracking_uri(cfg)),
        ("the teacher checkpoint", cfg.resshift.teacher), ("the SAM checkpoint", cfg.segmenter.checkpoint)), job.shared_fs)
    data = plan_data(cfg)                   # before any worker starts: a rank without samples is refused here
    path, fs = storage_target(cfg.job.storage)
    ensure_ray()
    require_gpus("samsr train", 1.0 if cfg.job.use_gpu else 0.0, cfg.job.num_workers, "no --use-gpu", cfg.job.gpu_wait_s)
    tally = train_data.new_tally()
    data_progress_bars()       # before the dataset (it keeps a copy of the DataContext): bars only in a terminal
    tracker = Tracker.for_job(cfg, run_name(cfg))     # the driver owns the MLflow run, found again on a rerun
    trainer = TorchTrainer(
        functools.partial(train_loop, tracking=tracking_uri(cfg), tally=tally),
        train_loop_config=worker_config(cfg, data, tracker.run_id, fail_after_steps),
        datasets={"train": train_data.build(cfg, data, sum(steps for _, steps in stages(cfg)), tally,
                                            concurrency=cfg.job.decode_concurrency or None)},
        scaling_config=ScalingConfig(num_workers=cfg.job.num_workers, use_gpu=cfg.job.use_gpu,
                                     resources_per_worker={"CPU": cfg.job.cpus_per_worker}),
        run_config=RunConfig(name=run_name(cfg), storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.job.keep_checkpoints)))
    empty = len(data["counts"]) - len(data["filled"])
    echo(f"samsr train: {cfg.method} '{run_name(cfg)}' on {cfg.job.num_workers} worker(s), "
         f"{len(data['filled'])} shard(s) with {sum(data['counts'].values())} sample(s)"
         + (f" ({empty} empty shard(s) left out)" if empty else "") + f", global batch {cfg.train.batch_size}")
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training '{run_name(cfg)}' ended without a checkpoint: {result.error}")
    except BaseException:
        tracker.finish(False)
        raise
    tracker.finish(True)
    kept = [c.path for c, _ in result.best_checkpoints or []] + [result.checkpoint.path]
    removed = remove_orphan_checkpoints(result.filesystem, result.path, kept)
    echo(f"samsr train: removed {len(removed)} checkpoint(s) left by a killed run: {removed}") if removed else None
    uri = f"s3://{result.checkpoint.path}" if fs is not None else result.checkpoint.path
    run_id = tracker.run_id
    out = {"metrics": dict(result.metrics or {}), "checkpoint": storage.join(uri, MODEL_FILE), "mlflow_run_id": run_id,
           "removed_checkpoints": removed}
    echo(f"samsr train: done at step {out['metrics'].get('step')}; checkpoint {out['checkpoint']}"
         + (f"; MLflow run {run_id}" if run_id else ""))
    return out


def parser():
    """The entrypoint's arguments (`cluster/` manifests are checked against it)."""
    return entrypoint_parser("pipelines.train", __doc__.splitlines()[0], "job.shards=s3://bucket/shards")


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.train --config PRESET --set job.shards=... --set job.storage=...` (ray job submit)."""
    args = parser().parse_args(argv)

    def work() -> int:
        run(config_mod.load(args.config, args.overrides))
        return EXIT_OK

    return run_entrypoint("pipelines.train", work)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""`samsr shard`: images (folder | s3://) -> WebDataset shards with HR, LR, SAM masks, SPE and coverage.

Main path: `run(cfg)` plans (sorted listing -> shard ids, `_plan.json`), skips shards whose manifest
exists (resume), then runs the stages of `pipelines.shard_stages` on Ray: a CPU task per image reads,
decodes and makes LR; an actor pool (`shard.actors`, each loading the segmenter once, with
`shard.gpus_per_actor` GPUs) computes masks + SPE + coverage per batch; a write task per shard gets the
batches' object refs, builds the tar and uploads tar, preview and manifest. Sample bytes go from worker
to worker; the driver (on a cluster, the head node) holds object refs and receives one small summary per
shard, so its memory and network do not grow with the data. `python -m pipelines.shard` is the `ray job
submit` entry.

Before any work (one line, exit 2): settings that cannot work (samples_per_shard < 1, ...), an output
that is, lies inside or holds the input, a missing input folder/bucket, a missing output bucket, an
unreachable S3 endpoint, GPUs asked for that the cluster does not bring up within shard.gpu_wait_s.
An input without images: one line, exit 1, nothing written. Resume: see `pipelines.shard_resume`
(finished shards are verified by size + sha256, and rebuilt when they differ).
On a cluster. A lost worker node costs retries, never the job or its bytes: the segmenter actors restart
without a limit (on another node when theirs is gone) and their calls are retried, so a batch never goes
to a dead actor for good; decode and write tasks are retried (`NODE_LOSS_RETRIES`), objects lost with the
node are rebuilt from their lineage, and a write that fails on storage is tried again; every output is a
function of the plan, so the tars are the bytes an undisturbed run makes. `_stats.json` and
`failures.jsonl` are written even when a run fails (`shards_missing`: what a rerun will do). A killed
driver: rerun the same command. Local paths are refused on a multi-node cluster unless `shard.shared_fs`
(pipelines/nodes.py).
Exit codes (samsr.locations): 0 when every good image is in a shard (unusable ones are recorded in the
manifests and failures.jsonl); 1 when a good image failed (read or segmenter error: rerun to retry)
or no image at all is in a shard.
"""
from __future__ import annotations

import itertools
import logging
import math
import pickle
import sys
import time
from typing import Any, Callable

from pipelines import nodes
from pipelines import shard_resume as resume
from pipelines import shard_stages as stages
from pipelines.rayenv import ensure_ray, entrypoint_parser, require_gpus, run_entrypoint
from samsr import config as config_mod
from samsr import images, listing, locations, redact, storage
from samsr.config import Config
from samsr.shards import format as fmt
from samsr.shards import plan as plan_mod

log = logging.getLogger(__name__)
NODE_LOSS_RETRIES = 5      # decode and write tasks: attempts after a lost node or a storage error
VERIFY_IN_FLIGHT = 64      # --verify: tar hashing tasks at once

# ---------------------------------------------------------------- plan, resume, stats

def check_job(cfg: Config, dry_run: bool = False) -> None:
    """Everything that can be wrong before any work, each as one line (ConfigError or LocationError),
    in seconds: settings that cannot work, overlapping input and output, a missing input folder or
    bucket, a missing output bucket, an unreachable S3 endpoint."""
    sc, ConfigError = cfg.shard, config_mod.ConfigError
    for name, value, least in (("shard.samples_per_shard", sc.samples_per_shard, 1),
                               ("shard.batch_size", sc.batch_size, 1), ("shard.actors", sc.actors, 1),
                               ("shard.limit", sc.limit, 0), ("data.max_pixels", cfg.data.max_pixels, 1)):
        if value < least:
            raise ConfigError(f"{name}={value} must be >= {least}")
    if not 0 <= sc.png_compress_level <= 9:
        raise ConfigError(f"shard.png_compress_level={sc.png_compress_level} must lie in 0..9")
    if cfg.segmenter.kind == "sam" and not cfg.segmenter.checkpoint:
        raise ConfigError("segmenter.kind=sam needs a SAM checkpoint: pass --sam-checkpoint PATH|s3://... "
                          "(or --segmenter superpixel, the non-SAM fallback)")
    if not sc.input:
        raise ConfigError("shard.input is required (--input DIR or s3://bucket/prefix)")
    if not sc.output and not dry_run:
        raise ConfigError("shard.output is required (--output DIR or s3://bucket/prefix) unless --dry-run")
    if sc.output:
        locations.refuse_overlap(sc.input, sc.output, job="samsr shard")
    locations.require_input(sc.input, "input")
    if storage.is_s3(cfg.segmenter.checkpoint):
        locations.require_input(cfg.segmenter.checkpoint, "SAM checkpoint")
    if sc.output and not dry_run:
        locations.require_output(sc.output, "output")


def load_or_build_plan(cfg: Config) -> tuple[plan_mod.Plan, list[str]]:
    """The saved `_plan.json` (checked against cfg) and the listed images it lacks (added to the input
    since; a plan is never extended), or a new plan, written first unless the input holds no image."""
    uri = storage.join(cfg.shard.output, "_plan.json")
    if storage.exists(uri):
        saved = plan_mod.plan_from_json(storage.read_bytes(uri))
        plan_mod.check_rerun(saved, cfg)
        return saved, plan_mod.new_inputs(saved, plan_mod.list_images(saved.input, cfg.shard.limit,
                                                                         cfg.shard.listing))
    plan = plan_mod.build_plan(cfg)
    if plan.num_images or plan.rejected:
        storage.write_bytes(uri, plan_mod.plan_to_json(plan))
    return plan, []


def _write_totals(cfg: Config, plan: plan_mod.Plan, totals: resume.Totals, written: int, images_now: int,
                  seconds: float, extra: dict | None = None) -> dict:
    """failures.jsonl and _stats.json from the tallies of the manifests read on resume and the shards
    written since (no manifest is read again: the driver's memory follows the failures and the shard
    count, not the size of the dataset)."""
    counts, failures = totals.stats(plan)
    storage.write_bytes(storage.join(cfg.shard.output, "failures.jsonl"),
                        b"".join(fmt.dumps(f) + b"\n" for f in failures))
    totals.save(cfg.shard.output)         # the next rerun's index: no manifest GET for an unchanged shard
    segmenter = counts.pop("segmenter")
    stats = {**counts, **(extra or {}),
             "shards_written_this_run": written, "images_this_run": images_now,
             "seconds_this_run": round(seconds, 3),
             "images_per_s_this_run": round(images_now / seconds, 4) if seconds > 0 and images_now else 0.0,
             "segmenter": segmenter,
             "config": redact.redact_config(cfg)}          # no userinfo / signatures in URIs
    storage.write_bytes(storage.join(cfg.shard.output, "_stats.json"), fmt.dumps(stats))
    return stats


class Progress:
    """What reaches the driver: one summary per written shard (SUMMARY_KEYS, a few hundred bytes),
    counted here, logged at most every `every_s` seconds, and the test hook `fail_after_shards`."""

    def __init__(self, shards: int, images_todo: int, totals: resume.Totals, fail_after_shards: int | None = None,
                 every_s: float = 30.0) -> None:
        self.shards, self.images_todo, self.every_s, self.totals = shards, images_todo, every_s, totals
        self.fail_after_shards = fail_after_shards
        self.written: list[int] = []
        self.images = self.received_bytes = 0
        self.t0 = self.last = time.perf_counter()

    def add(self, summary: dict) -> None:
        if set(summary) != set(stages.SUMMARY_KEYS):
            raise RuntimeError(f"a shard writer returned {sorted(summary)}, not a summary")
        self.received_bytes += len(pickle.dumps(summary))
        self.written.append(int(summary["shard"]))
        self.totals.add(int(summary["shard"]), summary["tally"])
        self.images += int(summary["images"])
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("samsr shard: %d/%d shards written, %d/%d images, %.2f images/s", len(self.written),
                     self.shards, self.images, self.images_todo, self.images / max(now - self.t0, 1e-9))
        if self.fail_after_shards is not None and len(self.written) >= self.fail_after_shards:
            raise RuntimeError(f"test hook: failing after {len(self.written)} shard(s) as asked")


def _warn_memory(cfg: Config, memory: int, echo: Callable[[str], None]) -> None:
    import ray

    biggest = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if 0 < biggest < memory:
        echo(f"samsr shard: warning: data.max_pixels={cfg.data.max_pixels} makes each decode task reserve "
             f"{memory / 2**30:.1f} GiB, more than the largest Ray node offers ({biggest / 2**30:.1f} GiB): decodes "
             "wait for a larger node; lower data.max_pixels to shard on these nodes")


def shards_in_flight(cfg: Config, plan: plan_mod.Plan) -> int:
    """Shards whose rows may sit in the object store at once: enough decoded images queued to keep every
    actor busy four batches ahead (a decode takes longer than a segmentation on GPU), plus one shard
    being written and one being filled; each shard's rows wait in the object store for its write."""
    sc = cfg.shard
    return 2 + math.ceil(4 * sc.actors * sc.batch_size / max(1, max(map(len, plan.shards))))


def _execute(cfg: Config, plan: plan_mod.Plan, todo: list[int], progress: Progress,
             echo: Callable[[str], None] = print) -> None:
    """Per image a decode task, per batch of a shard an actor call (round robin over `shard.actors`
    segmenter actors), per shard a write task fed the batches' object refs: bytes go from worker to
    worker, the driver holds refs and receives summaries. At most `shards_in_flight` shards at a time."""
    import ray

    sc = cfg.shard
    memory = images.decode_memory(cfg.data.max_pixels)
    _warn_memory(cfg, memory, echo)
    cfg_ref = ray.put(config_mod.to_dict(cfg))
    # `memory`: a decode holds a few copies of a 2K image; retries: work of a lost node is redone (see the
    # module doc), a write that failed on storage is tried again
    decode = ray.remote(stages.decode_row).options(num_cpus=0.5, memory=memory, max_retries=NODE_LOSS_RETRIES)
    write = ray.remote(stages.write_shard).options(num_cpus=0.25, max_retries=NODE_LOSS_RETRIES,
                                                   retry_exceptions=[storage.StorageError, OSError])
    actor_cls = ray.remote(stages.SegmentActor).options(num_cpus=sc.cpus_per_actor, num_gpus=sc.gpus_per_actor,
                                                        max_restarts=-1, max_task_retries=-1)
    actors = [actor_cls.remote(config_mod.to_dict(cfg)) for _ in range(sc.actors)]   # by value: restartable
    turn = itertools.cycle(actors)
    queue, running = list(reversed(todo)), {}
    if progress.fail_after_shards is not None:     # test hook: a job killed after that many shards
        queue = queue[-progress.fail_after_shards:]
    window = shards_in_flight(cfg, plan)
    try:
        while queue or running:
            while queue and len(running) < window:
                sid = queue.pop()
                items = [{"uri": e.uri, "key": e.key, "shard": sid, "index": i} for i, e in enumerate(plan.shards[sid])]
                batches = [next(turn).segment.remote(*[decode.remote(it, cfg_ref) for it in items[i:i + sc.batch_size]])
                           for i in range(0, len(items), sc.batch_size)]
                running[write.remote(sc.output, sid, sc.preview, *batches)] = sid
            done, _ = ray.wait(list(running), num_returns=1)
            del running[done[0]]
            progress.add(ray.get(done[0]))
    finally:
        for ref in running:
            ray.cancel(ref)
        for actor in actors:
            ray.kill(actor)

def hash_in_tasks(todo: list[tuple[int, str]]) -> dict[int, tuple[int, str]]:
    """`--verify`: the sha256 of each (shard id, tar URI), one Ray task per tar on any node (tar bytes
    go to a worker, never to the driver), at most `VERIFY_IN_FLIGHT` at once."""
    import ray

    task = ray.remote(resume.file_sha256).options(num_cpus=0.25, max_retries=NODE_LOSS_RETRIES,
                                                  retry_exceptions=[storage.StorageError, OSError])
    out, running, queue = {}, {}, list(reversed(todo))
    while queue or running:
        while queue and len(running) < VERIFY_IN_FLIGHT:
            sid, uri = queue.pop()
            running[task.remote(uri)] = sid
        done, _ = ray.wait(list(running), num_returns=1)
        out[running.pop(done[0])] = ray.get(done[0])
    return out


def _normalized(cfg: Config) -> Config:
    """Input and output in `locations.normalize` form: a relative path resumes what the absolute one
    started, and workers read the same absolute paths whatever their working directory."""
    sc = cfg.shard
    return config_mod.replace(cfg, shard=config_mod.replace(
        sc, input=locations.normalize(sc.input), output=locations.normalize(sc.output) if sc.output else ""))


def _nothing_to_do(cfg: Config) -> dict[str, Any]:
    print(f"samsr shard: no images under {cfg.shard.input!r} (looked for {', '.join(plan_mod.IMAGE_SUFFIXES[:4])}, "
          "…, recursively); nothing written", file=sys.stderr)
    return {"images_planned": 0, "ok": 0, "failed": 0, "known_bad": 0, "failed_good": 0, "shards": 0, "bytes": 0,
            "shards_written_this_run": 0}


def run(cfg: Config, *, dry_run: bool = False, fail_after_shards: int | None = None,
        echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Shard `cfg.shard.input` into `cfg.shard.output`; returns the `_stats.json` dict (or the dry-run
    plan). Refusals before any work raise ConfigError / LocationError (one line)."""
    check_job(cfg, dry_run)
    cfg = _normalized(cfg)
    if dry_run:
        from pipelines.shard_dryrun import dry_run as do_dry_run

        return do_dry_run(cfg, echo)
    # a multi-node cluster: local paths refused or checked on every node
    nodes.check_paths("samsr shard", nodes.job_paths(("--input", cfg.shard.input), ("--output", cfg.shard.output),
                                                     ("the SAM checkpoint", cfg.segmenter.checkpoint)),
                      cfg.shard.shared_fs)
    t0 = time.perf_counter()
    if cfg.shard.gpus_per_actor > 0:    # asked before the plan is written: a refusal leaves nothing behind
        ensure_ray()
        require_gpus("samsr shard", cfg.shard.gpus_per_actor, cfg.shard.actors, "--gpus-per-actor 0",
                     cfg.shard.gpu_wait_s)
    plan, new = load_or_build_plan(cfg)
    if not plan.num_images and not plan.rejected:
        return _nothing_to_do(cfg)
    tallies = resume.Totals()
    if cfg.shard.verify:
        ensure_ray()
    why = resume.check_finished(cfg.shard.output, plan, tallies, cfg.shard.verify, hash_in_tasks,
                                listing.Progress(f"samsr shard: listing {cfg.shard.output}"))
    todo = sorted(why)
    rebuilt = resume.count_reasons(list(why.values()))
    progress = Progress(len(todo), sum(len(plan.shards[i]) for i in todo), tallies, fail_after_shards)

    def totals() -> dict:          # written whether the run finished or not: what is done, what failed
        return _write_totals(cfg, plan, tallies, len(progress.written), progress.images_todo,
                             time.perf_counter() - t0,
                             {"shards_rebuilt_this_run": rebuilt, "images_not_in_plan": len(new),
                              "driver_received_bytes_this_run": progress.received_bytes})

    try:
        if todo:
            ensure_ray()
            _execute(cfg, plan, todo, progress, echo)
    except BaseException:
        totals()
        raise
    stats = totals()
    again = f", {sum(rebuilt.values())} of them rebuilt ({', '.join(f'{n} {r}' for r, n in rebuilt.items())})" \
        if rebuilt else ""
    echo(f"samsr shard: {stats['ok']} images ok, {stats['known_bad']} unusable (recorded), {stats['failed_good']} "
         f"failed{' (rerun to retry)' if stats['failed_good'] else ''}, {stats['no_masks']['hr']} without masks; "
         f"{stats['shards']} shards ({len(progress.written)} written now{again}, {len(plan.shards) - len(todo)} "
         f"already there), {stats['images_per_s_this_run']:.2f} images/s, {stats['bytes'] / 1e6:.1f} MB -> "
         f"{cfg.shard.output}")
    if new:
        echo(f"samsr shard: {len(new)} image(s) in the input are not in this output's plan (added since it was "
             f"made, e.g. {new[0]}); a plan is never extended: shard them into a new --output")
    return stats


def dry_run_exit_code(report: dict[str, Any]) -> int:
    return locations.EXIT_OK if report.get("images") else locations.EXIT_INCOMPLETE


def parser():
    """The entrypoint's arguments (`cluster/` manifests are checked against it)."""
    p = entrypoint_parser("pipelines.shard", __doc__.splitlines()[0], "shard.input=s3://bucket/images")
    p.add_argument("--dry-run", action="store_true", help="segment a small sample and print the plan only")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.shard --config PRESET --set shard.input=... --set shard.output=...` (ray job submit)."""
    args = parser().parse_args(argv)

    def work() -> int:
        result = run(config_mod.load(args.config, args.overrides), dry_run=args.dry_run)
        return dry_run_exit_code(result) if args.dry_run else resume.exit_code(result)

    return run_entrypoint("pipelines.shard", work)


if __name__ == "__main__":
    sys.exit(main())

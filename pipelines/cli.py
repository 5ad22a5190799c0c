"""The `samsr` console script: argparse subcommands over pipelines/ and samsr/.

Each subcommand maps straight onto one `run()`; `--config` takes a preset name or a YAML file and
`--set key.path=value` overrides (repeatable). `--log-level` configures logging (pipelines.rayenv
`configure_logging`), `--version` prints the installed package's version; the help texts (a
description and examples per subcommand) are in pipelines/cli_help.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from typing import Sequence

from pipelines import cli_help
from pipelines.rayenv import ResourceUnavailable, add_log_level, configure_logging
from samsr import config as config_mod
from samsr.locations import EXIT_USAGE, LocationError


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help=f"preset name ({', '.join(config_mod.presets())}) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.lr=1e-4 (repeatable)")


def _add_shared_fs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-fs", action="store_true", default=None,
                   help="local paths are on a filesystem every node mounts (checked on each node); without it a "
                        "multi-node Ray cluster refuses local paths: use s3://")


def _add_model_job_args(p: argparse.ArgumentParser) -> None:
    """The flags of the jobs that run a trained model over a listing (upscale, eval)."""
    from pipelines.rayenv import add_model_set

    p.add_argument("--model", required=True,
                   help="samsr checkpoint (path or s3:// URI) or MLflow model (runs:/<run_id>/model, models:/NAME@ALIAS)")
    p.add_argument("--actors", type=int, default=None, help="model actor pool size (default 1)")
    p.add_argument("--max-actors", type=int, default=None,
                   help="let the pool grow while work waits, up to this many actors (from --min-actors, else --actors)")
    p.add_argument("--min-actors", type=int, default=None, help="the growing pool's least size (default: --actors)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per actor (default 0: CPU); > 0 asks the cluster for them and fails if they do not "
                        "appear within gpu_wait_s")
    p.add_argument("--tile", type=int, default=None,
                   help="LR tile side in px (default: the model's infer.tile; 0 = auto: one pass up to "
                        "infer.auto_tile px a side, tiles of that side above)")
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs of the sorted listing")
    p.add_argument("--tracking-uri", default=None, help="MLflow server for runs:/ and models:/ models (default $MLFLOW_TRACKING_URI)")
    add_model_set(p)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.local import demo

    demo.run(method=args.method, out_dir=args.out, overrides=args.overrides, iterations=args.iterations,
             seed=args.seed, preset=args.preset, samples=args.samples, eval_crop=args.eval_crop,
             progress=False if args.no_progress else None)
    return 0


def _as_overrides(flags: dict, explicit: Sequence[str]) -> list[str]:
    """Flags that were given -> `key=value` overrides, then the explicit `--set`s (they win).
    JSON scalars are YAML, so paths like `123` or `yes` stay strings."""
    return [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None] + list(explicit)


def shard_overrides(args: argparse.Namespace) -> list[str]:
    """`samsr shard` flags -> `--set` overrides (segmenter.*, data.scale, shard.*), explicit --set last.
    `--segmenter tiny-sam` brings the tiny presets' permissive generator settings along (without them
    the random tiny SAM keeps no mask on any photo)."""
    flags: dict = {}
    if args.segmenter == "tiny-sam":
        from samsr.structure.segmenters import TINY_SAM_SETTINGS

        flags.update({f"segmenter.{k}": v for k, v in TINY_SAM_SETTINGS.items()})
    flags |= {"shard.input": args.input, "shard.output": args.output, "segmenter.kind": args.segmenter,
             "segmenter.checkpoint": args.sam_checkpoint, "segmenter.model_type": args.sam_model,
             "data.scale": args.scale, "shard.samples_per_shard": args.samples_per_shard,
             "shard.actors": args.actors, "shard.gpus_per_actor": args.gpus_per_actor,
             "shard.batch_size": args.batch_size, "shard.limit": args.limit,
             "shard.lrup_masks": False if args.no_lrup_masks else None, "shard.shared_fs": args.shared_fs,
             "shard.listing": args.listing, "shard.verify": args.verify}
    return _as_overrides(flags, args.overrides)


def _cmd_shard(args: argparse.Namespace) -> int:
    from pipelines import shard, shard_resume

    if not args.output and not args.dry_run:
        print("samsr shard: --output is required (a folder or s3:// prefix) unless --dry-run", file=sys.stderr)
        return EXIT_USAGE
    result = shard.run(config_mod.load(args.config, shard_overrides(args)), dry_run=args.dry_run)
    return shard.dry_run_exit_code(result) if args.dry_run else shard_resume.exit_code(result)


def train_overrides(args: argparse.Namespace) -> list[str]:
    """`samsr train` flags -> `--set` overrides (job.*, train.iterations), explicit --set last."""
    flags = {"job.shards": args.shards, "job.storage": args.storage, "job.name": args.name,
             "job.num_workers": args.num_workers, "job.use_gpu": True if args.use_gpu else None,
             "job.experiment": args.experiment, "job.tracking_uri": args.tracking_uri,
             "train.iterations": args.iterations, "job.val": args.val, "job.register": args.register,
             "job.register_alias": args.alias, "job.shared_fs": args.shared_fs}
    return _as_overrides(flags, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from pipelines import train

    cfg = config_mod.load(args.config, train_overrides(args))
    out = train.run(cfg)
    if out.get("mlflow_run_id"):        # last line: what `samsr eval/upscale --model` takes
        model = (f"models:/{cfg.job.register}@{cfg.job.register_alias}" if cfg.job.register
                 else f"runs:/{out['mlflow_run_id']}/model")
        print(f"samsr train: model {model}", flush=True)
    return 0


def _model_job_flags(args: argparse.Namespace, section: str) -> dict:
    """The flags upscale and eval share (`_add_model_job_args`, --model, --tracking-uri) as section.* keys."""
    return {f"{section}.{name}": getattr(args, name)
            for name in ("model", "actors", "min_actors", "max_actors", "gpus_per_actor", "limit", "tracking_uri",
                         "shared_fs")}


def _model_sets(args: argparse.Namespace) -> list[str]:
    """--model-set overrides of the model's own config, --tile as infer.tile."""
    return list(args.model_overrides) + ([f"infer.tile={args.tile}"] if args.tile is not None else [])


def upscale_overrides(args: argparse.Namespace) -> list[str]:
    """`samsr upscale` flags -> `--set` overrides (upscale.*), explicit --set last."""
    flags = {**_model_job_flags(args, "upscale"), "upscale.input": args.input, "upscale.output": args.output,
             "upscale.overwrite": True if args.overwrite else None}
    return _as_overrides(flags, args.overrides)


def _cmd_upscale(args: argparse.Namespace) -> int:
    from pipelines import upscale

    return upscale.exit_code(upscale.run(config_mod.load(args.config, upscale_overrides(args)), _model_sets(args)))


def eval_overrides(args: argparse.Namespace) -> list[str]:
    """`samsr eval` flags -> `--set` overrides (eval.*), explicit --set last."""
    flags = {**_model_job_flags(args, "eval"), "eval.hr": args.hr, "eval.lr": args.lr, "eval.set_name": args.set_name,
             "eval.samples": args.samples, "eval.seed": args.seed, "eval.crop": args.crop,
             "eval.output": args.output, "eval.lpips_weights": args.lpips_weights}
    return _as_overrides(flags, args.overrides)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipelines import eval as eval_job

    return eval_job.exit_code(eval_job.run(config_mod.load(args.config, eval_overrides(args)), _model_sets(args)))


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from pipelines.local import quickstart

    quickstart.run(args.workdir, keep=args.keep, presets=args.presets or quickstart.PRESETS, sets=args.overrides,
                   iterations=[args.iterations, args.student_iterations], samples=args.samples,
                   eval_crop=args.eval_crop, stack=args.stack)
    return 0


def _cmd_local(args: argparse.Namespace) -> int:
    from pipelines import local

    if args.action == "up":
        state = local.up(args.dir)
        photos = local.add_sample_photos(state)
        print(f"S3 {state['s3']} (bucket s3://{local.BUCKET}, sample photos in {photos}/)\nMLflow {state['mlflow']}\n"
              f"Ray dashboard {state['ray_dashboard']} (address {state['ray_address']}, token in "
              f"{args.dir}/{local.TOKEN})\npoint a shell at it: eval \"$(samsr local env --dir {args.dir})\"")
        return 0
    if args.action == "env":
        print(local.shell_exports(args.dir))
        return 0
    if args.action == "down":
        print("stopped" if local.down(args.dir) else f"no local stack recorded in {args.dir}")
        return 0
    up = local.status(args.dir)
    print(json.dumps(up) if up else f"no local stack recorded in {args.dir}")
    return 0 if up and all(up.values()) else 1


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in config_mod.presets():
        print(name)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(config_mod.dump_yaml(config_mod.load(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samsr", description=cli_help.MAIN_DESCRIPTION,
                                     epilog=cli_help.examples(cli_help.MAIN_EXAMPLES),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_log_level(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = cli_help.add_command(sub, "demo")
    p.add_argument("--method", choices=("samdiffsr", "samsr"), default="samdiffsr",
                   help="SAM-DiffSR (100-step sampler) or SAMSR (one-step student distilled from a ResShift teacher)")
    p.add_argument("--preset", choices=("cpu", "tiny"), default="cpu",
                   help="cpu: the recipe that beats bicubic in minutes on 2 cores (default); tiny: a quick smoke run")
    p.add_argument("--out", default="demo-output", help="folder for side-by-sides, metrics.json and the trained models")
    p.add_argument("--iterations", type=int, default=None, help="training steps per stage (default: the preset's)")
    p.add_argument("--samples", type=int, default=1,
                   help="samples per held-out photo (seeds seed..seed+N-1); N > 1 also scores their mean")
    p.add_argument("--eval-crop", type=int, default=0, help="score central HR crops of this side (default 0: whole photos)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, crops, noise and sampling")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the preset, e.g. --set segmenter.kind=superpixel")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (default: shown on stderr when it is a terminal)")
    p.set_defaults(func=_cmd_demo)

    p = cli_help.add_command(sub, "shard")
    _add_config_args(p, default="samdiffsr")
    _add_shared_fs(p)
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix of images (listed recursively)")
    p.add_argument("--output", default="", help="folder or s3://bucket/prefix for shards; rerun to resume")
    p.add_argument("--segmenter", choices=("sam", "superpixel", "tiny-sam"), default=None,
                   help="sam (needs --sam-checkpoint), superpixel (SLIC fallback, not SAM) or tiny-sam "
                        "(random weights, tests only; with the tiny presets' generator settings); "
                        "default: the config's")
    p.add_argument("--sam-checkpoint", default=None, help="SAM weights: local path or s3:// URI")
    p.add_argument("--sam-model", choices=("vit_h", "vit_l", "vit_b"), default=None,
                   help="SAM model type matching the checkpoint")
    p.add_argument("--scale", type=int, default=None, help="super-resolution factor of the LR images (default 4)")
    p.add_argument("--samples-per-shard", type=int, default=None, help="images per .tar shard (default 64)")
    p.add_argument("--actors", type=int, default=None, help="segmenter actor pool size (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per segmenter actor when the cluster has GPUs (default 1; 0.5 packs two per GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="images per segmenter call batch (default 4)")
    p.add_argument("--no-lrup-masks", action="store_true",
                   help="skip the masks of the upsampled LR (only SAM-DiffSR will be trained)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the sorted listing")
    p.add_argument("--listing", default=None, metavar="FILE",
                   help="the input's keys from a file instead of listing it (S3 Inventory CSV/Parquet, or one "
                        "key or URI per line; local or s3://): for buckets of millions of objects")
    p.add_argument("--verify", action="store_true", default=None,
                   help="on resume, also sha256 every finished tar (Ray tasks; reads them all). Default: trusted "
                        "from one listing (size + ETag/mtime recorded at write)")
    p.add_argument("--dry-run", action="store_true",
                   help="segment a small sample, print images/s per actor and the estimated bytes, "
                        "wall time and GPU-hours; writes nothing")
    p.set_defaults(func=_cmd_shard)

    p = cli_help.add_command(sub, "train")
    _add_config_args(p, default="samdiffsr")
    _add_shared_fs(p)
    p.add_argument("--shards", default=None, help="folder or s3:// prefix that `samsr shard` wrote")
    p.add_argument("--storage", default=None, help="folder or s3:// prefix for Ray Train checkpoints (shared "
                                                     "storage on a multi-node cluster)")
    p.add_argument("--name", default=None, help="run name (default: the config's); same name + storage resumes")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default 1)")
    p.add_argument("--use-gpu", action="store_true",
                   help="one GPU per worker, asked of the cluster; fails if they do not appear within job.gpu_wait_s")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default samsr)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--iterations", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--val", default=None,
                   help="HR images (folder or s3://) to validate on every train.eval_every steps (val/* in MLflow); "
                        "default: hold out the first job.val_images samples of the last shard")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="register the final model in MLflow's model registry as a new version of NAME")
    p.add_argument("--alias", default=None, help="alias set on that version (default candidate): "
                                                 "then `--model models:/NAME@ALIAS` for upscale and eval")
    p.set_defaults(func=_cmd_train)

    p = cli_help.add_command(sub, "upscale")
    _add_config_args(p, default="samdiffsr")
    _add_shared_fs(p)
    _add_model_job_args(p)
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix of LR images (listed recursively)")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix; output keys mirror input keys (.png)")
    p.add_argument("--overwrite", action="store_true", help="rewrite outputs that exist (default: skip them)")
    p.set_defaults(func=_cmd_upscale)

    p = cli_help.add_command(sub, "eval")
    _add_config_args(p, default="samdiffsr")
    _add_shared_fs(p)
    _add_model_job_args(p)
    p.add_argument("--hr", required=True, help="folder or s3://bucket/prefix of HR images (listed recursively)")
    p.add_argument("--lr", default=None, help="LR images matched to HR by key (a/0801.png or a/0801x4.png); "
                                              "default: made from HR as `samsr shard` makes them")
    p.add_argument("--set-name", default=None, help="name in the metric keys eval/<set>/… (default: the HR folder's)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per image, seeds seed..seed+N-1 (default 1); N > 1 also scores the mean of the samples")
    p.add_argument("--seed", type=int, default=None, help="first sampling seed (default 0)")
    p.add_argument("--crop", type=int, default=None, help="central HR crop side in px to bound time (default 0: whole)")
    p.add_argument("--output", default=None, help="folder or s3:// prefix for scores/ (per-image records, "
                                                  "Parquet parts) and summary.json")
    p.add_argument("--lpips-weights", default=None,
                   help="LPIPS-AlexNet state_dict (path or s3://); without it LPIPS is not computed")
    p.set_defaults(func=_cmd_eval)

    p = cli_help.add_command(sub, "quickstart")
    p.add_argument("--workdir", default="samsr-quickstart", help="folder for the stack's logs and metrics.json")
    p.add_argument("--keep", action="store_true", help="leave the local stack running (browse the MLflow UI)")
    p.add_argument("--stack", default=None, help="folder of the local stack (default WORKDIR/stack; a stack "
                   "already running there, e.g. from `samsr local up --dir`, is reused)")
    p.add_argument("--preset", dest="presets", action="append", default=None, metavar="PRESET",
                   help="a preset (name or YAML) per training stage, in order; a samsr-student stage distils the "
                        "stage before it (default: samsr-teacher-cpu, then samsr-student-cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every stage and job (repeatable)")
    p.add_argument("--iterations", type=int, default=None, help="training steps of the first stage (default: "
                   "its preset's)")
    p.add_argument("--student-iterations", type=int, default=None, help="training steps of the second stage "
                   "(default: its preset's)")
    p.add_argument("--samples", type=int, default=2,
                   help="samples per held-out photo in the final `samsr eval` (default 2: single-sample and "
                        "mean-of-samples scores)")
    p.add_argument("--eval-crop", type=int, default=0,
                   help="score central crops of this HR side instead of whole photos (default 0: whole)")
    p.set_defaults(func=_cmd_quickstart)

    p = cli_help.add_command(sub, "local")
    p.add_argument("action", choices=("up", "env", "status", "down"),
                   help="up: start (or find) the stack; env: print export lines for a shell; status; down: stop")
    p.add_argument("--dir", default=".samsr-local", help="where the stack keeps its state, logs and data")
    p.set_defaults(func=_cmd_local)

    p = cli_help.add_command(sub, "presets")
    p.set_defaults(func=_cmd_presets)

    p = cli_help.add_command(sub, "config")
    _add_config_args(p, default="samdiffsr-tiny")
    p.set_defaults(func=_cmd_config)
    for p in sub.choices.values():          # `--log-level` after the subcommand as well as before it
        add_log_level(p, default=argparse.SUPPRESS)
    return parser


def version() -> str:
    """The installed package's version (its metadata), or "unknown" when samsr runs uninstalled."""
    try:
        return metadata.version("samsr")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level)
    except argparse.ArgumentTypeError as exc:      # a bad $SAMSR_LOG_LEVEL
        parser.error(f"$SAMSR_LOG_LEVEL: {exc}")
    try:
        return args.func(args)
    except config_mod.ConfigError as exc:
        print(f"samsr: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, LocationError, ResourceUnavailable) as exc:   # refused before any work: one line
        print(f"samsr {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

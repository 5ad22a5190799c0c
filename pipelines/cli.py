"""The `samsr` console script: argparse subcommands over pipelines/ and samsr/.

Each subcommand maps straight onto one `run()`; `--config` takes a preset name or a YAML file and
`--set key.path=value` overrides (repeatable).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from samsr import config as config_mod


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help=f"preset name ({', '.join(config_mod.presets())}) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.lr=1e-4 (repeatable)")


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines import demo

    demo.run(method=args.method, out_dir=args.out, overrides=args.overrides, iterations=args.iterations,
             seed=args.seed)
    return 0


def _as_overrides(flags: dict, explicit: Sequence[str]) -> list[str]:
    """Flags that were given -> `key=value` overrides, then the explicit `--set`s (they win).
    JSON scalars are YAML, so paths like `123` or `yes` stay strings."""
    return [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None] + list(explicit)


def shard_overrides(args: argparse.Namespace) -> list[str]:
    """`samsr shard` flags -> `--set` overrides (segmenter.*, data.scale, shard.*), explicit --set last."""
    flags = {"shard.input": args.input, "shard.output": args.output, "segmenter.kind": args.segmenter,
             "segmenter.checkpoint": args.sam_checkpoint, "segmenter.model_type": args.sam_model,
             "data.scale": args.scale, "shard.samples_per_shard": args.samples_per_shard,
             "shard.actors": args.actors, "shard.gpus_per_actor": args.gpus_per_actor,
             "shard.batch_size": args.batch_size, "shard.limit": args.limit,
             "shard.lrup_masks": False if args.no_lrup_masks else None}
    return _as_overrides(flags, args.overrides)


def _cmd_shard(args: argparse.Namespace) -> int:
    from pipelines import shard

    if not args.output and not args.dry_run:
        print("samsr shard: --output is required (a folder or s3:// prefix) unless --dry-run", file=sys.stderr)
        return 2
    stats = shard.run(config_mod.load(args.config, shard_overrides(args)), dry_run=args.dry_run)
    return 0 if args.dry_run or stats["ok"] > 0 or stats["images_planned"] == 0 else 1


def train_overrides(args: argparse.Namespace) -> list[str]:
    """`samsr train` flags -> `--set` overrides (job.*, train.iterations), explicit --set last."""
    flags = {"job.shards": args.shards, "job.storage": args.storage, "job.name": args.name,
             "job.num_workers": args.num_workers, "job.use_gpu": True if args.use_gpu else None,
             "job.experiment": args.experiment, "job.tracking_uri": args.tracking_uri,
             "train.iterations": args.iterations}
    return _as_overrides(flags, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from pipelines import train

    train.run(config_mod.load(args.config, train_overrides(args)))
    return 0


def upscale_overrides(args: argparse.Namespace) -> list[str]:
    """`samsr upscale` flags -> `--set` overrides (upscale.*), explicit --set last."""
    flags = {"upscale.model": args.model, "upscale.input": args.input, "upscale.output": args.output,
             "upscale.overwrite": True if args.overwrite else None, "upscale.actors": args.actors,
             "upscale.gpus_per_actor": args.gpus_per_actor, "upscale.limit": args.limit,
             "upscale.tracking_uri": args.tracking_uri}
    return _as_overrides(flags, args.overrides)


def _cmd_upscale(args: argparse.Namespace) -> int:
    from pipelines import upscale

    model_sets = list(args.model_overrides) + ([f"infer.tile={args.tile}"] if args.tile is not None else [])
    stats = upscale.run(config_mod.load(args.config, upscale_overrides(args)), model_sets)
    return 0 if stats["failed"] == 0 or stats["ok"] > 0 else 1


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from pipelines import quickstart

    quickstart.run(args.workdir, keep=args.keep, iterations=args.iterations, rrdb_iterations=args.rrdb_iterations)
    return 0


def _cmd_local(args: argparse.Namespace) -> int:
    from pipelines import local

    if args.action == "up":
        state = local.up(args.dir)
        print(f"S3 {state['s3']}\nMLflow {state['mlflow']}\nRay dashboard {state['ray_dashboard']} "
              f"(address {state['ray_address']}, token in {args.dir}/{local.TOKEN})")
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
    parser = argparse.ArgumentParser(prog="samsr", description="Semantic-guided diffusion super-resolution at cluster scale.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a tiny model on bundled photos in a plain loop (no Ray) and report PSNR/SSIM")
    p.add_argument("--method", choices=("samdiffsr", "samsr"), default="samdiffsr",
                   help="SAM-DiffSR (100-step sampler) or SAMSR (one-step student distilled from a ResShift teacher)")
    p.add_argument("--out", default="demo-output", help="folder for side_by_side.png and metrics.json")
    p.add_argument("--iterations", type=int, default=None, help="training steps per stage (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed for crops, noise and sampling")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the tiny preset, e.g. --set segmenter.kind=superpixel")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("shard", help="precompute SAM masks: images (folder | s3://) -> WebDataset shards (Ray Data)")
    _add_config_args(p, default="samdiffsr")
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix of images (listed recursively)")
    p.add_argument("--output", default="", help="folder or s3://bucket/prefix for shards; rerun to resume")
    p.add_argument("--segmenter", choices=("sam", "superpixel", "tiny-sam"), default=None,
                   help="sam (needs --sam-checkpoint), superpixel (SLIC fallback, not SAM) or tiny-sam "
                        "(random weights, tests only); default: the config's")
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
    p.add_argument("--dry-run", action="store_true",
                   help="segment a small sample, print images/s per actor and the estimated bytes, "
                        "wall time and GPU-hours; writes nothing")
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser("train", help="train on shards with Ray Train (DDP), logging to MLflow; rerun to resume")
    _add_config_args(p, default="samdiffsr")
    p.add_argument("--shards", default=None, help="folder or s3:// prefix that `samsr shard` wrote")
    p.add_argument("--storage", default=None, help="folder or s3:// prefix for Ray Train checkpoints (shared "
                                                     "storage on a multi-node cluster)")
    p.add_argument("--name", default=None, help="run name (default: the config's); same name + storage resumes")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default samsr)")
    p.add_argument("--tracking-uri", default=None, help="MLflow server (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--iterations", type=int, default=None, help="training steps (default: the config's)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("upscale", help="super-resolve a folder or s3:// prefix into another (Ray Data, model actors)")
    _add_config_args(p, default="samdiffsr")
    p.add_argument("--model", required=True,
                   help="samsr checkpoint (path or s3:// URI) or MLflow model (runs:/<run_id>/model, models:/...)")
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix of LR images (listed recursively)")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix; output keys mirror input keys (.png)")
    p.add_argument("--overwrite", action="store_true", help="rewrite outputs that exist (default: skip them)")
    p.add_argument("--actors", type=int, default=None, help="model actor pool size (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per actor when the cluster has GPUs (default 1)")
    p.add_argument("--tile", type=int, default=None, help="LR tile side in px for large images (0 = whole image)")
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs of the sorted listing")
    p.add_argument("--tracking-uri", default=None, help="MLflow server for runs:/ models (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--model-set", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the model's own infer.* or segmenter.* settings, e.g. segmenter.checkpoint=s3://...")
    p.set_defaults(func=_cmd_upscale)

    p = sub.add_parser("quickstart", help="start a local S3/MLflow/Ray stack, then shard -> train -> upscale "
                                          "bundled photos end to end and score the result")
    p.add_argument("--workdir", default="samsr-quickstart", help="folder for the stack's logs and metrics.json")
    p.add_argument("--keep", action="store_true", help="leave the local stack running (browse the MLflow UI)")
    p.add_argument("--iterations", type=int, default=300, help="diffusion training steps (default 300)")
    p.add_argument("--rrdb-iterations", type=int, default=200, help="RRDB pretraining steps (default 200)")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("local", help="a development stack on 127.0.0.1: S3 (moto), MLflow and a token-auth Ray head")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--dir", default=".samsr-local", help="where the stack keeps its state, logs and data")
    p.set_defaults(func=_cmd_local)

    p = sub.add_parser("presets", help="list the config presets shipped with the package")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("config", help="print a resolved config (preset or file + overrides) as YAML")
    _add_config_args(p, default="samdiffsr-tiny")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config_mod.ConfigError as exc:
        print(f"samsr: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

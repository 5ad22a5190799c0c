"""The `samsr` CLI's help texts: for each subcommand a one-line summary (the command list of `samsr
--help`), a description and examples (its own `--help`). Kept apart from pipelines/cli.py so that the
parser stays readable; tests/test_cli_help.py checks that every subcommand has all three."""
from __future__ import annotations

import argparse

MAIN_DESCRIPTION = "Semantic-guided diffusion super-resolution (SAM-DiffSR, SAMSR) at cluster scale."
MAIN_EXAMPLES = """\
samsr demo --preset tiny                        # a one-minute smoke run, no Ray
samsr quickstart                                # local S3 + MLflow + Ray, shard -> train -> upscale -> eval
samsr local up && eval "$(samsr local env)"     # a local stack for your own runs (README)
samsr shard --help                              # every subcommand has a description and examples"""

# name: (summary for `samsr --help`, description for `samsr NAME --help`, examples)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": (
        "train on bundled photos in a plain loop (no Ray) and score held-out photos against bicubic",
        "Train SAM-DiffSR (or the SAMSR teacher + one-step student) in a plain single-process loop on the\n"
        "photos that ship with scikit-image and matplotlib, then score the held-out photos against bicubic.\n"
        "Writes a side-by-side per held-out photo, metrics.json and the trained models (samsr checkpoints\n"
        "for `samsr eval/upscale --model OUT/samdiffsr.pt`). The default cpu preset beats bicubic in a few\n"
        "minutes on 2 cores; a progress bar shows in a terminal (--no-progress turns it off).",
        "samsr demo --preset tiny --out demo-output   # one-minute smoke run\n"
        "samsr demo --method samsr --samples 4        # teacher + one-step student, mean of 4 samples"),
    "shard": (
        "precompute SAM masks: images (folder | s3://) -> WebDataset shards (Ray Data)",
        "List the input images, decode them and make the LR on CPU tasks, segment them with an actor pool\n"
        "(SAM, the tiny random SAM or superpixels) and write .tar shards with masks and structure maps,\n"
        "plus _plan.json, _manifest/, _preview/, _stats.json and failures.jsonl. Runs on the Ray cluster\n"
        "$RAY_ADDRESS names, else on a local Ray. Rerun the same command to resume after a crash.",
        "samsr shard --input ./photos --output ./shards --segmenter superpixel --dry-run\n"
        "samsr shard --input s3://bucket/div2k/ --output s3://bucket/shards/div2k --segmenter sam \\\n"
        "    --sam-model vit_h --sam-checkpoint s3://bucket/weights/sam_vit_h_4b8939.pth --actors 8 --gpus-per-actor 1"),
    "train": (
        "train on shards with Ray Train (DDP), logging to MLflow; rerun to resume",
        "Train a preset (or YAML config) on the shards `samsr shard` wrote with --num-workers Ray Train\n"
        "workers. Rank 0 logs params, losses, validation curves (val/*), sample grids by step and system\n"
        "metrics to MLflow ($MLFLOW_TRACKING_URI or --tracking-uri) and, at the end, the model as\n"
        "runs:/<run_id>/model (with --register NAME also models:/NAME@ALIAS); the last output line names\n"
        "it. Checkpoints go under --storage/--name: the same command resumes.",
        "samsr train --config samdiffsr-tiny --shards ./shards --storage ./runs --name smoke --iterations 20\n"
        "samsr train --config samsr-teacher --shards s3://bucket/shards/div2k --storage s3://bucket/runs \\\n"
        "    --name teacher-v1 --num-workers 8 --use-gpu --register samsr-teacher --alias candidate"),
    "upscale": (
        "super-resolve a folder or s3:// prefix into another (Ray Data, model actors)",
        "Read and decode LR images on CPU tasks; a model actor pool (--actors, or growing up to --max-actors)\n"
        "loads the model once (a samsr checkpoint or an MLflow model) and super-resolves each image with\n"
        "tiled inference; CPU tasks encode and write the PNGs. Output keys mirror input keys (.png);\n"
        "existing outputs are skipped unless --overwrite; each run adds its records of every input as\n"
        "Parquet parts under OUTPUT/_manifest/<run>/ (read them with samsr.records.read_latest).",
        "samsr upscale --model models:/samsr-teacher@candidate --input s3://bucket/lr/ --output s3://bucket/sr/\n"
        "samsr upscale --model runs:/<run_id>/model --input s3://bucket/lr/ --output s3://bucket/sr/ \\\n"
        "    --max-actors 8 --gpus-per-actor 1\n"
        "samsr upscale --model ./demo-output/samdiffsr.pt --input ./photos --output ./sr --tile 128"),
    "eval": (
        "score a model against bicubic on HR images (PSNR/SSIM on Y, HaarPSI, GMSD, LPIPS with weights) "
        "and log the result to MLflow",
        "Make the LR from each HR image (or match --lr images by key), super-resolve it --samples times and\n"
        "score the model and bicubic: PSNR and SSIM on luma Y with the border shaved, HaarPSI, GMSD (LPIPS\n"
        "with --lpips-weights). Prints the summary table; the metrics eval/<set>/* go into the MLflow run\n"
        "that logged the model (runs:/... or a registered models:/NAME@ALIAS) or a new run of samsr-eval.",
        "samsr eval --model runs:/<run_id>/model --hr s3://bucket/div2k/DIV2K_valid_HR --set-name div2k-val\n"
        "samsr eval --model ./demo-output/samdiffsr.pt --hr ./photos --samples 4 --crop 256 --output ./eval"),
    "quickstart": (
        "start a local S3/MLflow/Ray stack, then shard -> train -> eval -> upscale bundled photos end to end",
        "Start `samsr local up`'s stack in WORKDIR/stack, upload the bundled photos to\n"
        "s3://samsr-quickstart/, shard them with the tiny random SAM, train the CPU recipe with Ray Train\n"
        "(the SAMSR teacher, then its one-step student; each an MLflow run), score the student against\n"
        "bicubic on four held-out photos with `samsr eval`, upscale two held-out LR photos with the logged\n"
        "model, write side-by-sides and stop the stack (--keep leaves it up to browse the MLflow UI).\n"
        "About 6 minutes on 2 cores.",
        "samsr quickstart\n"
        "samsr quickstart --keep --workdir ./qs          # then: samsr local down --dir ./qs/stack\n"
        "samsr quickstart --preset samdiffsr-cpu         # SAM-DiffSR instead (100-step sampler)"),
    "local": (
        "a development stack on 127.0.0.1: S3 (moto), MLflow and a token-auth Ray head",
        "up: start an S3 endpoint (moto), an MLflow server and a Ray head with token authentication, all\n"
        "    on 127.0.0.1, with a bucket s3://samsr-local holding sample photos (photos/train/,\n"
        "    photos/holdout/, photos/holdout-lr/); state, logs, data and the token file live in --dir.\n"
        "env: print the `export` lines that point a shell at the stack (S3 endpoint and credentials file,\n"
        "    MLflow URI, Ray address and the token's *file*: the token itself is never printed).\n"
        "status: which services answer (exit 1 unless all).  down: stop everything and remove the state.\n"
        "README section \"Your own runs on the local stack\" walks through a whole run.",
        "samsr local up\n"
        "eval \"$(samsr local env)\"   # then samsr shard/train/eval, ray job submit, mlflow\n"
        "samsr local status\n"
        "samsr local down"),
    "presets": (
        "list the config presets shipped with the package",
        "Print the names of the presets shipped in samsr/configs/: the paper-size ones, a -cpu recipe and\n"
        "a -tiny smoke-test version of each. Every --config takes one of these names or a YAML file.",
        "samsr presets"),
    "config": (
        "print a resolved config (preset or file + overrides) as YAML",
        "Load a preset or YAML file, apply --set overrides (unknown keys and wrongly typed values are\n"
        "refused by name) and print the whole resolved config as YAML.",
        "samsr config --config samdiffsr --set train.lr=1e-4\n"
        "samsr config --config samdiffsr-tiny > my.yaml   # edit, then --config my.yaml"),
}


def examples(text: str, indent: str = "  ") -> str:
    """An `examples:` epilog block."""
    return "examples:\n" + "\n".join(indent + line for line in text.splitlines())


def add_command(sub, name: str) -> argparse.ArgumentParser:
    """`sub.add_parser(name)` with the command's summary, description and examples."""
    summary, description, example = COMMANDS[name]
    return sub.add_parser(name, help=summary, description=description, epilog=examples(example),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


__all__ = ["COMMANDS", "MAIN_DESCRIPTION", "MAIN_EXAMPLES", "add_command", "examples"]

"""The CPU recipe that learns visibly (issue: "a model that beats bicubic"): `samsr demo` with the `*-cpu`
presets, trained in a plain loop on bundled photos and scored against bicubic on photos it never saw.

    .venv/bin/python benchmarks/cpu_recipe.py --method samsr --split final --samples 4 --out recipe-samsr
    .venv/bin/python benchmarks/cpu_recipe.py --method samdiffsr --split tune --set train.iterations=600

`--split tune` trains on TUNE_TRAIN and scores TUNE_VAL (recipes are chosen there); `--split final`
trains on all of TRAIN and scores HELD_OUT (pipelines/local/photos.py). Prints the training time and a table
per model (single samples, mean of samples, bicubic); writes side-by-side PNGs + metrics.json to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.local import demo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=sorted(demo.PRESETS), required=True)
    p.add_argument("--split", choices=sorted(demo.SPLITS), default="tune")
    p.add_argument("--preset", choices=("cpu", "tiny"), default="cpu")
    p.add_argument("--set", dest="sets", action="append", default=[], help="override for every stage's preset")
    p.add_argument("--student-set", action="append", default=[], help="override for the SAMSR student only")
    p.add_argument("--samples", type=int, default=1, help="samples per image (seeds seed..seed+N-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-crop", type=int, default=0, help="score central crops of this HR side (0 = whole photos)")
    p.add_argument("--out", default="recipe-output")
    args = p.parse_args(argv)
    demo.run(args.method, args.out, args.sets, seed=args.seed, preset=args.preset, samples=args.samples,
             split=args.split, student_overrides=args.student_set, eval_crop=args.eval_crop)
    return 0


if __name__ == "__main__":
    sys.exit(main())

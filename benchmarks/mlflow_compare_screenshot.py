"""The run comparison a user sees, and the structure-map ablation: two quickstart runs on the local stack
(SAM-DiffSR with and without the structure modulation, same preset, same seeds), each with validation
curves and `samsr eval` of the held-out photos in its MLflow run, then the MLflow UI's run comparison in
headless Chromium saved as a PNG. Prints both runs' eval summaries.

    .venv/bin/python benchmarks/mlflow_compare_screenshot.py --out docs/img/mlflow-compare.png

Needs Debian's `chromium` (`apt-get install chromium`). About 25 minutes on 2 CPU cores with the
default CPU recipe (`--preset samdiffsr-tiny`: about 8).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import local  # noqa: E402
from pipelines.local import quickstart  # noqa: E402
from samsr import config, evaluation  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


CHART_CROP = (0, 0, 1190, 4800)     # MLflow 3.17's chart view at 1600x6000: runs list, eval/*, rrdb/*, val/*


def compare_url(mlflow: str, experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's run-comparison page for `run_ids` (parameters, metrics and tags side by side)."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    return f"{mlflow}/#/compare-runs?{query}"


def chart_url(mlflow: str, experiment_id: str) -> str:
    """The experiment's runs in chart view: every metric of every run, one chart per metric."""
    return f"{mlflow}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART"


def pictures(mlflow: str, out: Path, wait_ms: int) -> None:
    """`out`: the chart view (val/* curves and eval/* bars of both runs); `<out>-table.png`: the comparison page."""
    from mlflow import MlflowClient
    from PIL import Image

    client = MlflowClient(mlflow)
    experiment = client.get_experiment_by_name("samsr-quickstart").experiment_id
    run_ids = [r.info.run_id for r in client.search_runs([experiment])]
    screenshot(chart_url(mlflow, experiment), out, "1600,6000", wait_ms)
    with Image.open(out) as full:
        full.crop(CHART_CROP).save(out)
    screenshot(compare_url(mlflow, experiment, run_ids), out.with_name(out.stem + "-table.png"), "1600,3000", wait_ms)


def screenshot(url: str, out: Path, size: str, wait_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="compare-runs")
    p.add_argument("--out", default="docs/img/mlflow-compare.png")
    p.add_argument("--wait-ms", type=int, default=25000, help="virtual time for the UI to load its data")
    p.add_argument("--keep", action="store_true", help="leave the stack up afterwards")
    p.add_argument("--preset", default="samdiffsr-cpu", help="SAM-DiffSR preset both runs train")
    p.add_argument("--samples", type=int, default=4, help="samples per held-out photo in samsr eval")
    p.add_argument("--pictures-only", action="store_true",
                   help="only render the pictures again from the MLflow data a previous run left in --workdir")
    args = p.parse_args(argv)
    work = Path(args.workdir).resolve()
    if args.pictures_only:
        from pipelines.local import services

        server = services.start_mlflow(work / "stack" / "mlflow")
        try:
            pictures(server.url, Path(args.out), args.wait_ms)
        finally:
            server.stop()
        return 0
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    try:
        for modulation in (True, False):
            variant = work / f"{args.preset}-modulation-{str(modulation).lower()}.yaml"
            cfg = config.load(args.preset, [f"samdiffsr.structure_modulation={str(modulation).lower()}",
                                            f"name={variant.stem}"])
            variant.write_text(config.dump_yaml(cfg))
            name = "sam-diffsr" if modulation else "srdiff-no-structure"
            runs[name] = quickstart.run(work, keep=True, presets=[str(variant)], name=name, samples=args.samples,
                                        eval_crop=256)
        pictures(local.read_state(work / "stack")["mlflow"], Path(args.out), args.wait_ms)
        print(f"wrote {args.out}")
        for name, r in runs.items():
            print(f"\n{name} (run {r['mlflow_run_id']}):\n{evaluation.format_summary(r['summary'], args.samples)}")
            (work / f"{name}-eval.json").write_text(json.dumps(r["photos"], indent=2))
    finally:
        if not args.keep:
            local.down(work / "stack")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The driver's memory per listed key (issue 20): peak RSS above the import baseline, in bytes per key,
for the planning the driver does before any Ray work, at 10⁵ and 10⁶ keys.

- `upscale`: `pipelines.upscale.spool_plan` over N inputs whose N outputs all exist (every row decided
  as skipped by the driver: the listing's fingerprints, the records parts, the work spool);
- `upscale_work`: the same with no output yet (every row spooled as a work item for Ray Data);
- `shard_plan`: `samsr.shards.plan.build_plan` (the shard plan, still held whole as `_plan.json`).

Inputs are zero-byte files with long, odd keys (~100 characters: nested, spaces, non-ASCII) in a temp
folder (local disk: a tmpfs runs out of inodes at 2x10⁶ files). Each measurement runs in a fresh process; the peak is
the kernel's VmHWM above the RSS after imports and one warm-up Parquet part (pyarrow's memory pool
keeps ~60 MB once it has written: a constant, not a cost per key). Prints one JSON line per measurement and a summary; numbers go to RESULTS.md.

    .venv/bin/python benchmarks/driver_memory.py [--keys 100000 1000000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
from samsr import config, records
from pipelines import upscale
from samsr.shards import plan as plan_mod
job, inp, out = sys.argv[1:4]
cfg = config.load("samdiffsr", [f"upscale.input={inp}", f"upscale.output={out}", f"shard.input={inp}",
                                "upscale.model=unused"])
records.part_bytes([{"input": "warm", "output": "up"}] * 10_000, upscale.WORK_SCHEMA)   # pyarrow's pools, once
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmRSS")
if job == "shard_plan":
    n = plan_mod.build_plan(cfg).num_images
else:
    tally = records.Tally(upscale.KNOWN_BAD)
    work = records.WorkSpool(out + "/_work/bench", upscale.WORK_SCHEMA, upscale.PLAN_PART_ROWS)
    upscale.spool_plan(cfg, out + "/_manifest", "bench", tally, work)
    n = tally.counts["inputs"] + work.total
print(json.dumps({"keys": n, "peak_kb": kb("VmHWM") - base}))
"""


def key(i: int) -> str:
    return f"{i % 997:03d}/Ferienfotos – Ünïcode {i // 997:04d}/IMG {i:07d} {'x' * 48}.jpg"


def make(root: Path, n: int, outputs: bool) -> None:
    dirs = set()
    for i in range(n):
        k = key(i)
        for base, name in ((root / "in", k), *(((root / "out", k[:-4] + ".png"),) if outputs else ())):
            path = base / name
            if path.parent not in dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                dirs.add(path.parent)
            path.touch()


def measure(job: str, root: Path, n: int) -> dict:
    out = root / ("out" if job == "upscale" else "out-empty")
    out.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, job, str(root / "in"), str(out)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(root / "out" / "_work", ignore_errors=True)
    for folder in (root / "out" / "_manifest", out / "_manifest", out / "_work"):
        shutil.rmtree(folder, ignore_errors=True)
    assert got["keys"] == n, got
    return {"job": job, "keys": n, "peak_mb": round(got["peak_kb"] / 1024, 1),
            "bytes_per_key": round(got["peak_kb"] * 1024 / n, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000])
    args = ap.parse_args()
    results = []
    for n in args.keys:
        root = Path(tempfile.mkdtemp(prefix="samsr-drvmem-"))
        try:
            make(root, n, outputs=True)
            for job in ("upscale", "upscale_work", "shard_plan"):
                results.append(measure(job, root, n))
                print(json.dumps(results[-1]), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"summary ({platform.node()}, {os.cpu_count()} CPUs), bytes per key of driver peak RSS: " + "; ".join(
        f"{r['job']} {r['keys']:,}: {r['bytes_per_key']:.0f}" for r in results))


if __name__ == "__main__":
    main()

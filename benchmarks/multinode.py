"""Jobs across nodes: shard and upscale throughput on 2 worker nodes vs 1, and the time from a worker
node's death to the job's recovery.

    .venv/bin/python benchmarks/multinode.py [--images 24] [--side 384] [--cpus-per-node 2]

Ray's multi-node harness on this machine (pipelines/local/multinode.py: a 0-CPU head and N worker
nodes, each its own raylet and object store), S3 in and out on a moto server. Every job runs as a user's
driver does, a subprocess with RAY_ADDRESS set; its rate is the one it prints itself (planning and
work, without Python and Ray start-up), the wall time is start to exit.
1. shard (superpixel segmenter, one actor per node) and upscale (an untrained SAMSR teacher, one actor
   per node) on the same images with 1 and with 2 worker nodes of `--cpus-per-node` logical CPUs.
2. Recovery: the same upscale on 2 nodes with a node killed (no graceful shutdown) once outputs appear:
   seconds from the kill to the next output written, and the job's wall time against the undisturbed run.
All nodes share this machine's cores, so 2 nodes vs 1 measures what the second node's raylet, object
store and actor cost or gain on the same cores, not a second machine. Prints one JSON line per
measurement and a summary; numbers go to benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import secrets
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from pipelines.local import services
from pipelines.local.multinode import start_cluster
from pipelines.local.photos import TRAIN, bundled_photo

BUCKET = "multinode-bench"


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def crops(count: int, side: int) -> list[np.ndarray]:
    out = []
    for i in range(count):
        photo = bundled_photo(TRAIN[i % len(TRAIN)])
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        s = min(side, *photo.shape[:2])
        y, x = (i * 17) % (photo.shape[0] - s + 1), (i * 29) % (photo.shape[1] - s + 1)
        out.append(np.ascontiguousarray(photo[y:y + s, x:x + s, :3]))
    return out


def argv(module: str, preset: str, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", f"pipelines.{module}", "--config", preset] + [a for s in sets for a in ("--set", s)]


def run_job(cluster, module: str, preset: str, sets: list[str], kill_when=None) -> dict:
    """Run one job to its end; with `kill_when` (a predicate polled every 0.1 s) kill a worker node when it
    first holds, and time the recovery with `kill_when`'s companion `progress` (objects written)."""
    t0 = time.perf_counter()
    proc = cluster.start(argv(module, preset, sets))
    killed_at, recovered_at, before = None, None, 0
    if kill_when is not None:
        watch, progress = kill_when
        while proc.poll() is None and killed_at is None:
            if watch():
                before = progress()
                cluster.kill_worker()
                killed_at = time.perf_counter()
            time.sleep(0.1)
        while proc.poll() is None and recovered_at is None:
            if progress() > before:
                recovered_at = time.perf_counter()
            time.sleep(0.1)
    out, _ = proc.communicate(timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{module} exited {proc.returncode}:\n{out[-4000:]}")
    rate = re.findall(r"([\d.]+) images/s", out)
    row = {"wall_s": round(wall, 1), "images_per_s": float(rate[-1]) if rate else None}
    if killed_at is not None:
        row["kill_after_s"] = round(killed_at - t0, 1)
        row["recovery_s"] = round(recovered_at - killed_at, 1) if recovered_at else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--side", type=int, default=384, help="HR side of the shard inputs (LR side: side / 4)")
    ap.add_argument("--cpus-per-node", type=int, default=2)
    args = ap.parse_args()
    os.environ.update(services.ray_env(secrets.token_hex(32)), OMP_WAIT_POLICY="PASSIVE")

    import torch

    from samsr import config, storage
    from samsr.checkpoint import save_checkpoint
    from samsr.diffusion.samsr import ResShiftTeacher

    work = tempfile.mkdtemp(prefix="multinode-bench-")
    moto = services.start_moto(work)
    os.environ.update(AWS_ENDPOINT_URL=moto.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    results: dict[str, dict] = {}
    try:
        import boto3

        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=BUCKET)
        root = f"s3://{BUCKET}"
        photos = crops(args.images, args.side)
        for i, img in enumerate(photos):
            storage.write_bytes(f"{root}/hr/{i:04d}.png", png(img))
            lr = np.asarray(Image.fromarray(img).resize((img.shape[1] // 4, img.shape[0] // 4), Image.BICUBIC))
            storage.write_bytes(f"{root}/lr/{i:04d}.png", png(lr))
        torch.manual_seed(0)
        cfg = config.load("samsr-teacher-tiny")
        save_checkpoint(f"{root}/teacher.pt", {"model": ResShiftTeacher.from_config(cfg)}, cfg)

        def shard_sets(out: str, actors: int) -> list[str]:
            return ["segmenter.kind=superpixel", f"shard.input={root}/hr", f"shard.output={out}",
                    "shard.samples_per_shard=4", f"shard.actors={actors}", "shard.cpus_per_actor=1"]

        def upscale_sets(out: str, actors: int) -> list[str]:
            return [f"upscale.input={root}/lr", f"upscale.output={out}", f"upscale.model={root}/teacher.pt",
                    f"upscale.actors={actors}", "upscale.cpus_per_actor=1"]

        for nodes in (1, 2):
            cluster = start_cluster(workers=nodes, cpus_per_node=args.cpus_per_node)
            try:
                for job, preset, sets in (("shard", "samdiffsr", shard_sets), ("upscale", "samsr-teacher-tiny", upscale_sets)):
                    row = run_job(cluster, job, preset, sets(f"{root}/{job}-{nodes}", nodes))
                    results[f"{job} {nodes} node(s)"] = row
                    print(json.dumps({"run": f"{job} on {nodes} node(s)", **row}), flush=True)
                if nodes == 2:
                    out = f"{root}/upscale-killed"

                    def written() -> int:
                        return len(storage.list_files(out, (".png",)))

                    row = run_job(cluster, "upscale", "samsr-teacher-tiny", upscale_sets(out, 2),
                                  kill_when=(lambda: written() >= 2, written))
                    assert written() == args.images, f"{written()} of {args.images} outputs after the node loss"
                    results["upscale 2 node(s), one killed"] = row
                    print(json.dumps({"run": "upscale on 2 nodes, one killed", **row}), flush=True)
            finally:
                cluster.shutdown()
    finally:
        moto.stop()
    print("\nsummary:")
    for job in ("shard", "upscale"):
        one, two = results[f"{job} 1 node(s)"], results[f"{job} 2 node(s)"]
        print(f"  {job}: 2 nodes / 1 node = {two['images_per_s'] / one['images_per_s']:.2f}x images/s "
              f"({one['images_per_s']:.2f} -> {two['images_per_s']:.2f}); wall {one['wall_s']} -> {two['wall_s']} s")
    killed = results["upscale 2 node(s), one killed"]
    print(f"  upscale, a node killed {killed['kill_after_s']} s in: next output {killed['recovery_s']} s after the "
          f"kill; wall {killed['wall_s']} s vs {results['upscale 2 node(s)']['wall_s']} s undisturbed")


if __name__ == "__main__":
    main()

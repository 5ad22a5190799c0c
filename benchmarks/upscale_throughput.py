"""Batch upscale throughput: `samsr upscale` (1 and 2 model actors) vs a bare single-process loop, and
`samsr eval` (1 and 2 actors) on the same work: HR images 4× the LR inputs, so each is one SR of the same
size plus its scores against HR and bicubic's.

    .venv/bin/python benchmarks/upscale_throughput.py [--images 16] [--lr-size 128] [--config samsr-teacher-tiny]

Inputs: crops of bundled photos as PNGs in a local folder. Model: an untrained model of `--config`
(time does not depend on the weights), saved as a samsr checkpoint. The bare loop does what the
job does per image — read, decode, `infer.upscale_array`, PNG encode, write — in this process with
one torch thread. The job's wall time includes Ray Data start-up and actor construction.
Prints one JSON line per run; the numbers go to benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipelines.local.photos import LEGACY_TRAIN as TRAIN_PHOTOS
from pipelines.local.photos import bundled_photo
from samsr import config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--lr-size", type=int, default=128)
    p.add_argument("--config", default="samsr-teacher-tiny")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = p.parse_args()
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN=secrets.token_hex(32))
    import ray
    import torch

    from pipelines import upscale
    from pipelines.tracking.model import load_method
    from samsr import images, storage
    from samsr.checkpoint import save_checkpoint
    from samsr.infer import upscale_array
    from samsr.method import build_method
    from samsr.shards.format import png_bytes

    root = Path(tempfile.mkdtemp(prefix="upscale-bench-"))
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        n = args.lr_size
        for i in range(args.images):
            photo = bundled_photo(TRAIN_PHOTOS[i % len(TRAIN_PHOTOS)])
            y, x = (i * 17) % (photo.shape[0] - n), (i * 29) % (photo.shape[1] - n)
            (root / "in").mkdir(exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(photo[y:y + n, x:x + n]).save(buf, format="PNG")
            (root / "in" / f"img{i:04d}.png").write_bytes(buf.getvalue())
            (root / "hr").mkdir(exist_ok=True)              # for eval: an HR whose LR is n x n
            Image.fromarray(photo[y:y + n, x:x + n]).resize((4 * n, 4 * n), Image.NEAREST).save(
                root / "hr" / f"img{i:04d}.png")
        cfg = config.load(args.config)
        torch.manual_seed(0)
        save_checkpoint(str(root / "model.pt"), {"model": build_method(cfg)}, cfg)

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        method, mcfg = load_method(str(root / "model.pt"))
        (root / "bare").mkdir()
        for path in sorted((root / "in").glob("*.png")):
            lr = images.decode_image(path.read_bytes(), scale=1)
            sr = upscale_array(method, lr, mcfg.infer)
            storage.write_bytes(str(root / "bare" / path.name), png_bytes(sr, 1))
        bare = args.images / (time.perf_counter() - t0)
        print(json.dumps({"run": "bare loop", "images_per_s": bare}), flush=True)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        results = {}
        for actors in (1, 2):
            job = config.load(args.config, [f"upscale.input={root / 'in'}", f"upscale.output={root / f'out{actors}'}",
                                            f"upscale.model={root / 'model.pt'}", f"upscale.actors={actors}"])
            stats = upscale.run(job, echo=lambda s: None)
            results[actors] = stats["images_per_s"]
            print(json.dumps({**stats, "run": f"samsr upscale, {actors} actor(s)", "records_run": stats["run"]}),
                  flush=True)
        from pipelines import eval as eval_job

        for actors in (1, 2):
            job = config.load(args.config, [f"eval.hr={root / 'hr'}", f"eval.model={root / 'model.pt'}",
                                            f"eval.actors={actors}"])
            stats = eval_job.run(job, echo=lambda s: None)
            results[f"eval{actors}"] = stats["images_per_s"]
            print(json.dumps({"run": f"samsr eval, {actors} actor(s)", "images_per_s": stats["images_per_s"],
                              "seconds": stats["seconds"], "ok": stats["ok"]}), flush=True)
        print(f"SUMMARY images/s bare {bare:.2f}; job 1 actor {results[1]:.2f} ({results[1] / bare:.2f}x bare); "
              f"2 actors {results[2]:.2f} ({results[2] / results[1]:.2f}x of 1 actor); eval 1 actor "
              f"{results['eval1']:.2f} ({results['eval1'] / results[1]:.2f}x upscale), 2 actors {results['eval2']:.2f} "
              f"({results['eval2'] / results[2]:.2f}x upscale)")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()

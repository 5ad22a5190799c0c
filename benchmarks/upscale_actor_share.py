"""How much of the model actor's time goes to the model: `samsr upscale` before and after issue 20 moved
PNG encoding and the upload out of the actor into CPU tasks.

    .venv/bin/python benchmarks/upscale_actor_share.py [--images 8] [--lr-size 96] [--config samsr-teacher-tiny]

Both runs go through Ray Data on one local Ray, one actor, one torch thread, the same inputs (crops of
bundled photos, PNG, local folders) and the same untrained model of `--config` (`--set` overrides, by
default a 2-step teacher: time does not depend on the weights):
- before: decode tasks -> an actor that super-resolves, PNG-encodes and writes each image in one call
  (`ModelEncodeWrite`, what `UpscaleActor` did);
- after: `pipelines.upscale.run` as it is: the actor returns SR pixels; CPU tasks encode and write.
A one-image job runs first, so neither run pays Ray's worker start-up alone.
The actor times itself (pipelines/upscale_stages.py): `t_sr` is the model (`infer.upscale_array`),
`t_actor` its whole call; the share is sum(t_sr) / sum(t_actor). After, the timings come from the job's
records (samsr.records). Prints one JSON line per run and a SUMMARY line; numbers go to RESULTS.md by hand.
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

from pipelines import upscale_stages as stages
from pipelines.local.photos import LEGACY_TRAIN as TRAIN_PHOTOS
from pipelines.local.photos import bundled_photo
from samsr import config


class ModelEncodeWrite(stages.UpscaleModel):
    """The actor before issue 20: model, PNG encode and write in the one call (batch of one image)."""

    def __init__(self, *args, level: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.level = level

    def __call__(self, batch: dict) -> dict[str, list]:
        t0 = time.perf_counter()
        out = super().__call__(batch)
        rows = [stages.encode_row({k: v[i] for k, v in out.items()}, self.level) for i in range(len(out["input"]))]
        for row, t_sr in zip(rows, out["t_sr"]):
            row.update(t_sr=t_sr, t_actor=(time.perf_counter() - t0) / len(rows))
        return {k: [r[k] for r in rows] for k in rows[0]}


def share(rows: list[dict]) -> dict[str, float]:
    ok = [r for r in rows if r["status"] == "ok"]
    mean = {k: sum(r[k] for r in ok) / len(ok) for k in ("t_sr", "t_actor", "t_encode", "t_write")}
    return {"images": len(ok), "model_share": sum(r["t_sr"] for r in ok) / sum(r["t_actor"] for r in ok),
            **{f"mean_{k}": v for k, v in mean.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--lr-size", type=int, default=96)
    p.add_argument("--config", default="samsr-teacher-tiny")
    p.add_argument("--set", dest="overrides", action="append", default=None,
                   help="config override of the model (default: resshift.timesteps=2)")
    p.add_argument("--png-level", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = p.parse_args()
    overrides = args.overrides if args.overrides is not None else ["resshift.timesteps=2"]
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    import ray
    import torch

    from pipelines import upscale
    from samsr import images, records
    from samsr.checkpoint import save_checkpoint
    from samsr.method import build_method

    root = Path(tempfile.mkdtemp(prefix="upscale-share-"))
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    try:
        n = args.lr_size
        (root / "in").mkdir()
        for i in range(args.images):
            photo = bundled_photo(TRAIN_PHOTOS[i % len(TRAIN_PHOTOS)])
            y, x = (i * 17) % (photo.shape[0] - n), (i * 29) % (photo.shape[1] - n)
            buf = io.BytesIO()
            Image.fromarray(photo[y:y + n, x:x + n]).save(buf, format="PNG")
            (root / "in" / f"img{i:04d}.png").write_bytes(buf.getvalue())
        cfg = config.load(args.config, overrides)
        torch.manual_seed(0)
        save_checkpoint(str(root / "model.pt"), {"model": build_method(cfg)}, cfg)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1",
                 log_to_driver=False)

        def job(out: str) -> config.Config:
            return config.load(args.config, [*overrides, f"upscale.input={root / 'in'}", f"upscale.output={root / out}",
                                             f"upscale.model={root / 'model.pt'}", "upscale.actors=1",
                                             f"upscale.png_compress_level={args.png_level}"])

        warm = job("warm-up")              # Ray's workers and the model's first load, paid before either run
        upscale.run(config.replace(warm, upscale=config.replace(warm.upscale, limit=1)), echo=lambda s: None)
        before = job("before")
        items, _ = upscale.plan(before)
        t0 = time.perf_counter()
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(stages.decode_row, fn_kwargs={"max_pixels": before.data.max_pixels, "scale": before.data.scale},
                    num_cpus=0.5, memory=images.decode_memory(upscale.lr_pixel_limit(before.data)))
        ds = ds.map_batches(ModelEncodeWrite, fn_constructor_kwargs={
                                "model": str(root / "model.pt"), "model_overrides": [], "tracking_uri": "",
                                "threads": 1, "max_pixels": before.data.max_pixels, "level": args.png_level},
                            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
        old = share(ds.take_all())
        old["images_per_s"] = old["images"] / (time.perf_counter() - t0)
        print(json.dumps({"run": "before: model + PNG encode + write in the actor", **old}), flush=True)

        stats = upscale.run(job("after"), echo=lambda s: None)
        new = share(records.read_parts(stats["records"], runs=[stats["run"]]).to_pylist())
        new["images_per_s"] = stats["images_per_s"]
        print(json.dumps({"run": "after: model only in the actor (samsr upscale)", **new}), flush=True)
        print(f"SUMMARY {args.images} images {n}x{n} -> {4 * n}x{4 * n}, {args.config} {' '.join(overrides)}: "
              f"model share of the actor's time {old['model_share']:.4f} before, {new['model_share']:.4f} after; "
              f"moved out of the actor per image: encode {new['mean_t_encode'] * 1e3:.1f} ms + write "
              f"{new['mean_t_write'] * 1e3:.1f} ms (model {new['mean_t_sr']:.2f} s); job images/s "
              f"{old['images_per_s']:.3f} before, {new['images_per_s']:.3f} after")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()

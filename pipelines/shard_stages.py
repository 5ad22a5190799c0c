"""The three stages of `samsr shard`, as plain functions that know nothing of Ray (pipelines/shard.py
runs them as Ray tasks and actors; tests call them in one process):

1. `decode_row` (CPU task, one per image): read + decode + LR -> a row holding the HR/LR arrays and
   the hr.png/lr.png members, or status=failed with a reason.
2. `SegmentActor.segment` (actor, loads the segmenter once): rows -> rows with the structure members
   (masks, SPE, coverage) and a preview thumbnail; the raw arrays are dropped here.
3. `write_shard` (CPU task, one per shard): all rows of one planned shard -> tar, preview, manifest
   (written last: a shard is finished when its manifest exists; it records the tar's size, listing
   stamp and sha256), returning a summary: counts and the shard's failure rows (a few hundred bytes
   when its images are good). Tar bytes never leave the task that builds them.
"""
from __future__ import annotations

import json
import time
from typing import Any

from pipelines.shard_resume import shard_tally
from samsr import config as config_mod
from samsr import listing, storage
from samsr.images import ImageError
from samsr.shards import format as fmt
from samsr.shards import plan as plan_mod
from samsr.shards import preview
from samsr.shards import process

SUMMARY_KEYS = ("shard", "images", "ok", "failed", "tar_bytes", "tally")   # all that reaches the driver per shard


def _empty_row(item: dict) -> dict:
    return {"uri": item["uri"], "key": item["key"], "shard": int(item["shard"]), "index": int(item["index"]),
            "status": "ok", "reason": "", "message": "", "members": {}, "thumb": b"", "hr": None, "lr": None,
            "meta": {}, "t_read": 0.0, "t_decode": 0.0, "t_segment": 0.0}


def decode_row(item: dict, cfg_dict: dict) -> dict:
    """Plan entry (uri, key, shard, index) -> row with HR/LR arrays and hr.png/lr.png, or status=failed + reason."""
    import torch

    torch.set_num_threads(1)
    cfg = config_mod.from_dict(cfg_dict)
    row = _empty_row(item)
    t0 = time.perf_counter()
    try:
        data = storage.read_bytes(item["uri"])
    except storage.StorageError as exc:
        row.update(status="failed", reason="read_error", message=str(exc))
        return row
    t1 = time.perf_counter()
    try:
        dec = process.decode_source(item["uri"], data, cfg)
    except ImageError as exc:
        row.update(status="failed", reason=exc.reason, message=str(exc), t_read=t1 - t0)
        return row
    row.update(members=process.image_members(dec, cfg), hr=dec.hr, lr=dec.lr, meta=dec.meta, t_read=t1 - t0,
               t_decode=time.perf_counter() - t1)
    return row


class SegmentActor:
    """Loads the segmenter once; `segment(*rows)` adds masks + SPE + coverage members and a thumbnail."""

    def __init__(self, cfg_dict: dict) -> None:
        import torch

        from samsr.structure.segmenters import build_segmenter

        torch.set_num_threads(1)
        self.cfg = config_mod.from_dict(cfg_dict)
        self.segmenter = build_segmenter(self.cfg.segmenter)

    def segment(self, *rows: dict) -> list[dict]:
        out = []
        for row in rows:
            row = dict(row)
            hr, lr = row.pop("hr"), row.pop("lr")
            if row["status"] == "ok":
                t0 = time.perf_counter()
                try:
                    members, labels = process.segment_members(process.Decoded(hr, lr, row["meta"]), self.cfg,
                                                              self.segmenter)
                except Exception as exc:   # recorded per sample; the job goes on
                    row.update(status="failed", reason="segment_error", message=f"{type(exc).__name__}: {exc}")
                else:
                    row["members"] = {**row["members"], **members}
                    row["thumb"] = fmt.png_bytes(preview.overlay_thumbnail(hr, labels), 1)
                row["t_segment"] = time.perf_counter() - t0
            out.append(row)
        return out


def write_shard(output: str, shard_id: int, write_preview: bool, *batches: list[dict]) -> dict[str, Any]:
    """All rows of planned shard `shard_id` (in batches, any order) -> `<name>.tar`, `_preview/<name>.jpg`,
    then `_manifest/<name>.json`. Returns only SUMMARY_KEYS."""
    rows = sorted((r for batch in batches for r in batch), key=lambda r: r["index"])
    name = plan_mod.shard_name(shard_id)
    ok = [r for r in rows if r["status"] == "ok"]
    tar_uri = storage.join(output, f"{name}.tar")
    with storage.open_write(tar_uri) as f:     # streamed: no second copy in memory
        tar = fmt.HashingWriter(f)
        fmt.write_tar(tar, ((r["key"], r["members"]) for r in ok))
    stamp = listing.stat(tar_uri).stamp        # what a rerun's listing must show to trust the tar unread
    if write_preview and ok:
        thumbs = [fmt.png_array(r["thumb"]) for r in ok if r["thumb"]]
        storage.write_bytes(storage.join(output, "_preview", f"{name}.jpg"), preview.contact_sheet(thumbs))
    metas = {r["key"]: json.loads(r["members"]["json"]) for r in ok}
    manifest = {
        "shard": name, "tar": f"{name}.tar", "tar_bytes": tar.size, "tar_sha256": tar.hexdigest(),
        "tar_stamp": stamp,
        "ok": len(ok), "failed": len(rows) - len(ok),
        "segmenter": next(iter(metas.values()))["segmenter"] if metas else None,
        "samples": [{"key": r["key"], "uri": r["uri"], "status": r["status"], "reason": r["reason"] or None,
                     "message": r["message"] or None, "hr_masks": metas.get(r["key"], {}).get("hr_masks"),
                     "lrup_masks": metas.get(r["key"], {}).get("lrup_masks"),
                     "t_read": round(float(r["t_read"]), 4), "t_decode": round(float(r["t_decode"]), 4),
                     "t_segment": round(float(r["t_segment"]), 4)}
                    for r in rows]}
    manifest_uri = storage.join(output, "_manifest", f"{name}.json")
    storage.write_bytes(manifest_uri, fmt.dumps(manifest))
    return {"shard": shard_id, "images": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
            "tar_bytes": tar.size, "tally": shard_tally(manifest, listing.stat(manifest_uri).stamp)}

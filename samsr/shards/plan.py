"""The shard plan: sorted input listing -> shard ids, decided once and reused on rerun (DESIGN.md
"Shard format", `_plan.json`). A shard is the unit of resume.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from samsr import listing, storage
from samsr.config import Config
from samsr.locations import LocationError, normalize
from samsr.shards.format import dumps, sample_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".tga",
                  ".jp2", ".avif", ".mpo")
PLAN_VERSION = 1


@dataclass(frozen=True)
class Entry:
    uri: str
    key: str


@dataclass(frozen=True)
class Plan:
    input: str
    samples_per_shard: int
    fingerprint: dict            # settings that change shard bytes; a rerun must match them
    shards: tuple[tuple[Entry, ...], ...]
    rejected: tuple[dict, ...]   # listed objects whose keys are unsafe: {"uri", "reason", "message"}

    @property
    def num_images(self) -> int:
        return sum(len(s) for s in self.shards)


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The resolved settings that decide a shard's bytes (data, segmenter, PNG level, lrup on/off)."""
    from samsr.config import to_dict

    return {"data": to_dict(cfg.data), "segmenter": to_dict(cfg.segmenter),
            "png_compress_level": cfg.shard.png_compress_level, "lrup_masks": cfg.shard.lrup_masks}


def build_plan(cfg: Config, uris: Sequence[str] | None = None) -> Plan:
    """List `cfg.shard.input` (image suffixes, sorted), keep the first `limit`, cut into shards.

    `uris` replaces the listing (tests). Keys that `storage.safe_key` rejects go to `rejected`.
    """
    sc = cfg.shard
    if sc.samples_per_shard < 1:
        raise ValueError(f"shard.samples_per_shard={sc.samples_per_shard} must be >= 1")
    if not sc.input:
        raise ValueError("shard.input is empty; pass --input DIR or s3://bucket/prefix")
    base = normalize(sc.input)       # absolute: the plan holds the same URIs whatever the caller's cwd
    found = sorted(uris) if uris is not None else list_images(base, sc.limit, sc.listing)
    if uris is not None and sc.limit > 0:
        found = found[: sc.limit]
    entries, rejected, keys = [], [], set()
    for uri in found:
        try:
            rel = storage.relative_key(base, uri) if normalize(uri) != base else uri.rsplit("/", 1)[-1]
        except storage.StorageError as exc:
            rejected.append({"uri": uri, "reason": "unsafe_key", "message": str(exc)})
            continue
        key = sample_key(rel)
        if key in keys:   # only if two listings produce the same relative key
            rejected.append({"uri": uri, "reason": "duplicate_key", "message": f"key {key} already planned"})
            continue
        keys.add(key)
        entries.append(Entry(uri, key))
    n = sc.samples_per_shard
    shards = tuple(tuple(entries[i:i + n]) for i in range(0, len(entries), n))
    return Plan(base, n, fingerprint(cfg), shards, tuple(rejected))


def list_images(input_uri: str, limit: int = 0, listing_file: str = "") -> list[str]:
    """The sorted image listing of a folder / s3:// prefix (IMAGE_SUFFIXES), the first `limit` if > 0:
    streamed (a `limit` stops the LIST early), with a progress line every few seconds; or, with
    `listing_file`, the input's keys read from that file (samsr.listing), sorted."""
    progress = listing.Progress(f"samsr: listing {listing_file or input_uri}")
    if listing_file:
        found = sorted(listing.read_listing_file(listing_file, input_uri, IMAGE_SUFFIXES, progress))
    else:
        found = []
        for item in listing.iter_listing(input_uri, IMAGE_SUFFIXES, progress):
            found.append(item.uri)
            if 0 < limit <= len(found):
                break
    progress.done()
    return found[:limit] if limit > 0 else found


def new_inputs(plan: Plan, listing: Sequence[str]) -> list[str]:
    """The images of a fresh listing (cut by the same limit) that `plan` does not hold: what a new
    plan would add. A saved plan is never extended (its shard membership is fixed)."""
    known = {normalize(e.uri) for s in plan.shards for e in s} | {normalize(r["uri"]) for r in plan.rejected}
    return [u for u in listing if normalize(u) not in known]


def plan_to_json(plan: Plan) -> bytes:
    return dumps({"version": PLAN_VERSION, "input": plan.input, "samples_per_shard": plan.samples_per_shard,
                  "fingerprint": plan.fingerprint, "num_images": plan.num_images,
                  "shards": [{"id": i, "name": shard_name(i), "samples": [[e.uri, e.key] for e in s]}
                             for i, s in enumerate(plan.shards)],
                  "rejected": list(plan.rejected)})


def plan_from_json(data: bytes | str) -> Plan:
    doc = json.loads(data)
    if doc.get("version") != PLAN_VERSION:
        raise ValueError(f"_plan.json version {doc.get('version')!r} is not {PLAN_VERSION}; use a new output prefix")
    shards = tuple(tuple(Entry(u, k) for u, k in s["samples"]) for s in doc["shards"])
    return Plan(doc["input"], int(doc["samples_per_shard"]), doc["fingerprint"], shards, tuple(doc["rejected"]))


def check_rerun(saved: Plan, cfg: Config) -> None:
    """A rerun must ask for the same input (compared in `normalize`d form: a relative path matches the
    absolute one), shard size and byte-deciding settings as the saved plan; LocationError otherwise."""
    wanted = {"input": normalize(cfg.shard.input), "samples_per_shard": cfg.shard.samples_per_shard,
              "fingerprint": fingerprint(cfg)}
    have = {"input": normalize(saved.input), "samples_per_shard": saved.samples_per_shard,
            "fingerprint": saved.fingerprint}
    for name in wanted:
        if json.loads(dumps(wanted[name])) != json.loads(dumps(have[name])):
            raise LocationError(f"the output already holds a _plan.json with a different {name} "
                                f"({have[name]!r:.300} vs now {wanted[name]!r:.300}); resume with the same "
                                "settings, or write to a new --output")


__all__ = ["Entry", "Plan", "IMAGE_SUFFIXES", "shard_name", "fingerprint", "build_plan", "list_images", "new_inputs",
           "plan_to_json", "plan_from_json", "check_rerun"]

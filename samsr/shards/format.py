"""One shard sample as bytes and back, and the deterministic tar that holds them (DESIGN.md "Shard format").

Members of a sample share a stable key (sanitised source path + short hash, never row order); a tar
holds samples in plan order, members sorted, with a fixed mtime and uid/gid 0, so the same inputs
give the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from samsr.structure import masks as masks_mod

TAR_MTIME = 946684800          # 2000-01-01T00:00:00Z, fixed so shards are byte-reproducible
KEY_HASH_CHARS = 10
KEY_STEM_CHARS = 80
MEMBERS_HR = ("hr.png", "lr.png", "hr.masks.json", "hr.seg.png", "hr.spe.npy", "json")
MEMBERS_LRUP = ("lrup.masks.json", "lrup.cover.png")


def sample_key(relative_key: str) -> str:
    """`'dir/a b.png'` -> `'dir_a_b_png-<10 hex>'`: [A-Za-z0-9_-] only (no dots, WebDataset splits there).

    The hash is of the relative key itself, so two sources that sanitise alike still get distinct keys.
    """
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relative_key).strip("_")[:KEY_STEM_CHARS] or "x"
    return f"{stem}-{hashlib.sha256(relative_key.encode('utf-8')).hexdigest()[:KEY_HASH_CHARS]}"


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces), so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def png_bytes(array: np.ndarray, compress_level: int) -> bytes:
    """(H,W,3) uint8 RGB, (H,W) uint8 or (H,W) uint16 -> PNG bytes (no timestamp chunks)."""
    if array.dtype == np.uint16 and array.ndim == 2:
        img = Image.fromarray(np.ascontiguousarray(array))   # mode I;16
    elif array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        img = Image.fromarray(np.ascontiguousarray(array))
    else:
        raise ValueError(f"png_bytes takes (H,W,3)/(H,W) uint8 or (H,W) uint16, got {array.shape} {array.dtype}")
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


def png_array(data: bytes) -> np.ndarray:
    """PNG bytes -> (H,W,3) uint8, (H,W) uint8 or (H,W) uint16, as written by `png_bytes`."""
    img = Image.open(io.BytesIO(data))
    if img.mode.startswith("I;16") or img.mode == "I":
        return np.asarray(img).astype(np.uint16)
    return np.asarray(img)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def structure_members(records: Sequence[masks_mod.MaskRecord], labels: np.ndarray, values: np.ndarray,
                      compress_level: int) -> dict[str, bytes]:
    """HR masks (ordered) + their SPE (labels (H,W) uint16, values (K+1,) float32) -> hr.* structure members."""
    return {"hr.masks.json": dumps(masks_mod.records_to_json(records)),
            "hr.seg.png": png_bytes(labels.astype(np.uint16, copy=False), compress_level),
            "hr.spe.npy": npy_bytes(values.astype(np.float32, copy=False))}


def lrup_members(records: Sequence[masks_mod.MaskRecord], cover: np.ndarray, compress_level: int) -> dict[str, bytes]:
    """y↑ masks (ordered) + coverage C (H,W) uint8 -> lrup.* members (METHOD.md §B)."""
    return {"lrup.masks.json": dumps(masks_mod.records_to_json(records)),
            "lrup.cover.png": png_bytes(cover.astype(np.uint8, copy=False), compress_level)}


def decode_members(members: Mapping[str, bytes]) -> dict[str, Any]:
    """Member bytes (names without the key, e.g. 'hr.png') -> arrays, records and meta dicts.

    hr/lr (H,W,3) uint8; seg (H,W) uint16; spe (K+1,) float32; cover (H,W) uint8; *.masks.json ->
    list[MaskRecord]; json -> dict.
    """
    out: dict[str, Any] = {}
    for name, data in members.items():
        if name.endswith(".png"):
            out[name] = png_array(data)
        elif name.endswith(".npy"):
            out[name] = npy_array(data)
        elif name.endswith("masks.json"):
            out[name] = masks_mod.records_from_json(json.loads(data))
        elif name == "json":
            out[name] = json.loads(data)
        else:
            raise ValueError(f"unknown shard member {name!r}; known: {', '.join(MEMBERS_HR + MEMBERS_LRUP)}")
    return out


def tar_bytes(samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> bytes:
    """(key, {member: bytes}) in plan order -> tar bytes: members sorted per sample, fixed mtime, uid/gid 0."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if key in seen or "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} is repeated or holds '.' or '/'; make keys with sample_key")
            seen.add(key)
            for name in sorted(members):
                data = members[name]
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_tar(data: bytes) -> dict[str, dict[str, bytes]]:
    """Tar bytes -> {key: {member: bytes}} in tar order (the inverse of `tar_bytes`)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for info in tar:
            key, _, name = info.name.partition(".")
            out.setdefault(key, {})[name] = tar.extractfile(info).read()
    return out


__all__ = ["sample_key", "dumps", "png_bytes", "png_array", "npy_bytes", "npy_array", "structure_members",
           "lrup_members", "decode_members", "tar_bytes", "read_tar", "TAR_MTIME", "MEMBERS_HR", "MEMBERS_LRUP"]

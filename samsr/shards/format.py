"""One shard sample as bytes and back, and the deterministic tar that holds them (DESIGN.md "Shard format").

Members of a sample share a stable key (sanitised source path + short hash, never row order); a tar
holds samples in plan order, members sorted, with a fixed mtime and uid/gid 0, so the same inputs
give the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from samsr.structure import masks as masks_mod

TAR_MTIME = 946684800          # 2000-01-01T00:00:00Z, fixed so shards are byte-reproducible
MEMBERS_HR = ("hr.png", "lr.png", "hr.masks.json", "hr.seg.png", "hr.spe.npy", "json")
MEMBERS_LRUP = ("lrup.masks.json", "lrup.cover.png")
USTAR_NAME_BYTES = 100         # a plain ustar header holds member names up to 100 bytes
KEY_HASH_CHARS = 10
# the stem is cut so that `<key>.<longest member>` fits a plain ustar name (73 chars): every member
# name of every sample stays a classic header that any tar reader takes; keys of up to 73 sanitised
# chars are as before, longer source keys (up to S3's 1024 bytes) are cut and told apart by the hash
KEY_STEM_CHARS = USTAR_NAME_BYTES - max(len(m) for m in MEMBERS_HR + MEMBERS_LRUP) - 2 - KEY_HASH_CHARS
TAR_FORMAT = tarfile.PAX_FORMAT   # = ustar bytes for names that fit; a pax header only past 100 bytes
NPY_MAX_HEADER = 4096           # bytes of a .npy header we read (np.save writes 128)


def sample_key(relative_key: str) -> str:
    """`'dir/a b.png'` -> `'dir_a_b_png-<10 hex>'`: [A-Za-z0-9_-] only (no dots, WebDataset splits there),
    at most 84 chars, so every member name fits ustar's 100 bytes.

    The hash is of the relative key itself, so two sources that sanitise alike (or share their
    first 73 sanitised chars) still get distinct keys.
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


def npy_array(data: bytes, where: str = "") -> np.ndarray:
    """.npy bytes -> array. The header is read first: the array it declares must be exactly the bytes
    that follow (a header claiming a huge shape is refused before anything is allocated), and hold
    no Python objects."""
    label = f"{where}: " if where else ""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf, max_header_size=NPY_MAX_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf, max_header_size=NPY_MAX_HEADER)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, EOFError, OSError) as exc:
        raise ValueError(f"{label}not a readable .npy ({len(data)} bytes): {exc}") from None
    if dtype.hasobject:
        raise ValueError(f"{label}.npy of dtype {dtype} holds Python objects; refused")
    count = math.prod(shape)
    body = len(data) - buf.tell()
    if count * dtype.itemsize != body:
        raise ValueError(f"{label}.npy header declares {dtype} {shape} = {count * dtype.itemsize} bytes "
                         f"but {body} follow")
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


def _hr_shape(out: dict[str, Any]) -> tuple[int, int] | None:
    """(H, W) of the sample's HR image: from hr.png when decoded, else from the json meta's hr_size."""
    if "hr.png" in out:
        return out["hr.png"].shape[:2]
    size = out.get("json", {}).get("hr_size") if isinstance(out.get("json"), dict) else None
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size):
        return int(size[1]), int(size[0])
    return None


def _check_member(name: str, value: Any, shape: tuple[int, int] | None, out: dict[str, Any]) -> str:
    """Why a decoded member disagrees with the sample (its HR shape, its label map, its masks), or ''."""
    if name == "json":
        return "" if isinstance(value, dict) else f"is a JSON {type(value).__name__}, not an object"
    if name == "hr.png":
        return "" if value.ndim == 3 and value.shape[2] == 3 and value.dtype == np.uint8 else \
            f"is {value.shape} {value.dtype}, not (H,W,3) uint8"
    if name == "lr.png":
        if value.ndim != 3 or value.shape[2] != 3 or value.dtype != np.uint8 or min(value.shape[:2]) < 1:
            return f"is {value.shape} {value.dtype}, not (h,w,3) uint8"
        if shape is not None:
            (hh, hw), (lh, lw) = shape, value.shape[:2]
            if hh % lh or hw % lw or hh // lh != hw // lw:
                return f"{lh}x{lw} is not the HR {hh}x{hw} divided by one whole scale"
        return ""
    if name in ("hr.seg.png", "lrup.cover.png"):
        dtype = np.uint16 if name == "hr.seg.png" else np.uint8
        if value.ndim != 2 or value.dtype != dtype:
            return f"is {value.shape} {value.dtype}, not (H,W) {np.dtype(dtype).name}"
        return "" if shape is None or value.shape == tuple(shape) else f"is {value.shape}, not the HR {tuple(shape)}"
    if name == "hr.spe.npy":
        if value.ndim != 1 or value.dtype != np.float32 or value.size < 1:
            return f"is {value.shape} {value.dtype}, not (K+1,) float32"
        seg = out.get("hr.seg.png")
        top = int(seg.max()) if seg is not None and seg.size else 0
        if top >= value.size:
            return f"holds {value.size} values but hr.seg.png uses label {top}"
        masks = out.get("hr.masks.json")
        if masks is not None and value.size != len(masks) + 1:
            return f"holds {value.size} values for {len(masks)} masks (expected {len(masks) + 1})"
    return ""


DECODE_ORDER = ("json", "hr.png", "lr.png", "hr.seg.png", "hr.masks.json", "hr.spe.npy", "lrup.masks.json",
                "lrup.cover.png")


def decode_members(members: Mapping[str, bytes], where: str = "") -> dict[str, Any]:
    """Member bytes (names without the key, e.g. 'hr.png') -> arrays, records and meta dicts.

    hr/lr (H,W,3) uint8; seg (H,W) uint16; spe (K+1,) float32; cover (H,W) uint8; *.masks.json ->
    list[MaskRecord]; json -> dict. Members are inputs too: each is checked against the sample (HR
    shape from hr.png, else from the json's hr_size), mask RLEs are bounded by the HR size before
    they are decoded, and any disagreement is a ValueError naming `where` (shard/key) and the member.
    """
    label = f"{where}: " if where else ""
    unknown = sorted(set(members) - set(DECODE_ORDER))
    if unknown:
        raise ValueError(f"{label}unknown shard member {unknown[0]!r}; known: {', '.join(MEMBERS_HR + MEMBERS_LRUP)}")
    out: dict[str, Any] = {}
    for name in (n for n in DECODE_ORDER if n in members):
        data = members[name]
        shape = _hr_shape(out)
        try:
            if name.endswith(".png"):
                value = png_array(data)
            elif name.endswith(".npy"):
                value = npy_array(data)
            elif name.endswith("masks.json"):
                value = masks_mod.records_from_json(json.loads(data), shape=shape)
            else:
                value = json.loads(data)
        except Exception as exc:      # PIL, JSON, npy, RLE: every way a member can be bad
            raise ValueError(f"{label}{name} cannot be read: {' '.join(str(exc).split())[:300]}") from None
        why = _check_member(name, value, shape, out)
        if why:
            raise ValueError(f"{label}{name} {why}")
        out[name] = value
    return {name: out[name] for name in members}


class HashingWriter:
    """A write-only file object that passes bytes on to `out` and keeps their count and sha256."""

    def __init__(self, out) -> None:
        self.out, self.size, self._sha = out, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self._sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def write_tar(fileobj, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
    """(key, {member: bytes}) in plan order -> a tar written to `fileobj` as it goes: members sorted per
    sample, fixed mtime, uid/gid 0.

    The one function that makes a shard's bytes. Names within ustar's 100 bytes (all that
    `sample_key` makes) give plain ustar headers; a longer one gets a pax header instead of failing.
    """
    seen: set[str] = set()
    with tarfile.open(fileobj=fileobj, mode="w", format=TAR_FORMAT) as tar:
        for key, members in samples:
            if key in seen or "." in key or "/" in key or not key:
                raise ValueError(f"sample key {key!r} is empty, repeated or holds '.' or '/'; "
                                 "make keys with sample_key")
            seen.add(key)
            for name in sorted(members):
                data = members[name]
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


def tar_bytes(samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> bytes:
    """`write_tar` into memory."""
    buf = io.BytesIO()
    write_tar(buf, samples)
    return buf.getvalue()


class MemberCut(ValueError):
    """A member's bytes end early; `key` is the sample it belongs to (it may lack members)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def tar_members(data: bytes, strict: bool = True) -> Iterator[tuple[str, str, bytes]]:
    """(key, member, bytes) of each `<key>.<member>` file of a plain tar, in tar order (no gzip/bz2/xz: a
    shard is never compressed, and a compressed stream could expand without bound). A tar that stops
    without its end-of-archive blocks raises ValueError after its last whole member (tarfile stops
    quietly at a cut between members); a cut inside a member raises MemberCut naming its sample; a
    damaged header raises tarfile errors. `strict`:
    anything but a regular file, or a name without `<key>.<member>`, is a ValueError; else skipped."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            key, _, name = info.name.partition(".")
            if strict and not info.isfile():
                raise ValueError(f"member {info.name!r} is not a regular file")
            if strict and (not key or not name):
                raise ValueError(f"member {info.name!r} is not named <key>.<member>")
            if info.isfile():
                try:
                    blob = tar.extractfile(info).read()
                except (tarfile.TarError, EOFError, OSError) as exc:
                    raise MemberCut(str(exc), key) from None
                yield key, name, blob
        end = tar.offset                  # where the members stopped: the end-of-archive blocks follow
        if data[end:end + tarfile.BLOCKSIZE] != tarfile.NUL * tarfile.BLOCKSIZE:
            raise ValueError(f"the tar ends at byte {end} without its end-of-archive blocks (cut short?)")


def read_tar(data: bytes, where: str = "") -> dict[str, dict[str, bytes]]:
    """Tar bytes -> {key: {member: bytes}} in tar order (the inverse of `tar_bytes`), strictly: a cut or
    damaged tar, a member that is not a file or not named `<key>.<member>`, or a repeated member is a
    ValueError naming `where` (the shard) and the member."""
    label = f"{where}: " if where else ""
    out: dict[str, dict[str, bytes]] = {}
    try:
        for key, name, blob in tar_members(data):
            if name in out.get(key, {}):
                raise ValueError(f"member {key}.{name!r} appears twice")
            out.setdefault(key, {})[name] = blob
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"{label}not a whole plain tar ({len(data)} bytes): {exc}") from None
    return out


__all__ = ["sample_key", "dumps", "png_bytes", "png_array", "npy_bytes", "npy_array", "structure_members",
           "lrup_members", "decode_members", "tar_bytes", "write_tar", "HashingWriter", "tar_members", "read_tar", "TAR_MTIME", "MEMBERS_HR", "MEMBERS_LRUP",
           "USTAR_NAME_BYTES"]

"""Per-object records of a batch job, written in parts by the workers (DESIGN.md "On a cluster").

A job's records live in a folder (local or `s3://`), one sub-folder per run, each holding Parquet parts:

    <folder>/<run>/part-<name>.parquet        e.g. s3://bucket/sr/_manifest/20261203T101502123Z-3fa9c1/part-….parquet

`<run>` is `new_run_id()`: the UTC start time to the millisecond, then a random tag, so runs sort by time
as text. A run only ever adds its own parts; a later run never rewrites an earlier one's. Workers write
a part per batch (`write_part`); the driver holds counts (`Tally`), not rows, and writes what it decides
itself in bounded chunks (`PartWriter`). The jobs: `samsr upscale` (`<output>/_manifest/`, one row per
input: input, output, status ok|skipped|failed, reason, message, timings) and `samsr eval`
(`<output>/scores/`, one row per HR image, read by `hr`: key, hr, lr, status, reason, message, timings,
scores).

Reading (pure pyarrow; `read_latest` is what a person usually wants — each object's newest record):

    from samsr import records
    table = records.read_latest("s3://bucket/sr/_manifest", key="input")     # a pyarrow.Table
    table.to_pandas().groupby(["status", "reason"]).size()
    records.read_parts("s3://bucket/sr/_manifest")                            # every run's rows, + `run`

or without samsr, e.g. `duckdb -c "SELECT status, reason, count(*) FROM 'sr/_manifest/*/*.parquet'
GROUP BY ALL"` (every run's rows: filter or deduplicate by run yourself).
"""
from __future__ import annotations

import hashlib
import io
import secrets
from collections import Counter
from datetime import datetime, timezone
from typing import Callable, Collection, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from samsr import locations, storage

PART_SUFFIX = ".parquet"
RUN_COLUMN = "run"
COUNTS = ("ok", "skipped", "failed", "known_bad", "failed_good", "inputs")


def new_run_id(now: datetime | None = None) -> str:
    """`20261203T101502123Z-3fa9c1`: UTC time to the millisecond + a random tag; sorts by time as text."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def part_name(rows: Sequence[Mapping], key: str) -> str:
    """A part's file name from what it holds (its first and last `key` and its length): a retried task
    that writes the same rows writes the same part again, never a second copy."""
    first, last = (str(rows[0].get(key, "")), str(rows[-1].get(key, ""))) if rows else ("", "")
    digest = hashlib.sha256(f"{first}\0{last}\0{len(rows)}".encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"part-{digest}{PART_SUFFIX}"


def part_uri(folder: str, run: str, name: str) -> str:
    return storage.join(folder, run, name if name.endswith(PART_SUFFIX) else name + PART_SUFFIX)


def _text(value: str) -> str:
    """A str Parquet can hold: a name that is not valid UTF-8 (a local file name os.walk gave with
    surrogate escapes) keeps its bytes as backslash escapes instead of failing the whole part."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def to_table(rows: Sequence[Mapping], schema: pa.Schema | None = None) -> pa.Table:
    """Rows (dicts of str / int / float / bool / None) -> a table with every key any row has (null where a
    row lacks it), in the order first seen; bytes-valued columns are dropped."""
    names = list(schema.names) if schema is not None else list(dict.fromkeys(k for row in rows for k in row))
    columns = {name: [_text(v) if isinstance(v, str) else v for v in (row.get(name) for row in rows)]
               for name in names}
    columns = {name: values for name, values in columns.items() if not any(isinstance(v, bytes) for v in values)}
    if schema is not None:
        return pa.Table.from_pydict(columns, schema=schema)
    return pa.Table.from_pydict(columns)


def part_bytes(rows: Sequence[Mapping], schema: pa.Schema | None = None) -> bytes:
    """`rows` as the bytes of one Parquet file (zstd)."""
    buf = io.BytesIO()
    pq.write_table(to_table(rows, schema), buf, compression="zstd")
    return buf.getvalue()


def write_part(uri: str, rows: Sequence[Mapping], schema: pa.Schema | None = None) -> int:
    """Write `rows` as one Parquet file at `uri`, atomically (samsr.storage). Returns the bytes written."""
    data = part_bytes(rows, schema)
    storage.write_bytes(uri, data)
    return len(data)


class PartWriter:
    """Rows decided on the driver (a plan's skips and refusals) handed to `write(name, rows)` at most
    `rows_per_part` at a time, as parts `part-<prefix>-00000.parquet`, `…-00001…`: the driver never holds
    more than that. `folder_writer(folder, run)` writes them under `<folder>/<run>/`."""

    def __init__(self, write: Callable[[str, list], None], prefix: str = "plan", rows_per_part: int = 10_000) -> None:
        if rows_per_part < 1:
            raise ValueError(f"rows_per_part={rows_per_part} must be >= 1")
        self.write, self.prefix, self.rows_per_part = write, prefix, rows_per_part
        self.rows: list[Mapping] = []
        self.parts = 0

    def add(self, row: Mapping) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.write(f"part-{self.prefix}-{self.parts:05d}{PART_SUFFIX}", self.rows)
            self.parts += 1
            self.rows = []

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()        # what was decided before an error is still recorded


def folder_writer(folder: str, run: str, schema: pa.Schema | None = None) -> Callable[[str, list], None]:
    """`write(name, rows)` that writes part `name` under `<folder>/<run>/`."""
    def write(name: str, rows: list) -> None:
        write_part(part_uri(folder, run, name), rows, schema)
    return write


class WorkSpool(PartWriter):
    """A job's work items, spooled by the driver as it plans, `rows_per_part` at a time, into Parquet parts
    under `folder` (under the job's output: every node can read it) for Ray Data to read back
    (pipelines.rayenv.read_work), so the driver never holds the work list. `total` counts the items once
    the spool is closed (`with`); `remove()` deletes the parts."""

    def __init__(self, folder: str, schema: pa.Schema, rows_per_part: int = 10_000) -> None:
        self.folder, self.schema, self.uris, self.written = folder, schema, [], 0
        super().__init__(self._write, "work", rows_per_part)

    @property
    def total(self) -> int:
        return self.written + len(self.rows)

    def _write(self, name: str, rows: list) -> None:
        uri = storage.join(self.folder, name)
        write_part(uri, rows, self.schema)
        self.uris.append(uri)
        self.written += len(rows)

    def remove(self) -> None:
        for uri in self.uris:
            storage.delete(uri)
        self.uris = []


class Tally:
    """Counts of record rows: ok, skipped, failed = known_bad (inputs recorded as unusable: `known_bad`
    reasons) + failed_good (errors a rerun retries), inputs = all rows. What a driver keeps instead of rows."""

    def __init__(self, known_bad: Collection[str] = ()) -> None:
        self.known_bad = frozenset(known_bad)
        self.counts: Counter = Counter({name: 0 for name in COUNTS})

    def add(self, row: Mapping) -> None:
        status = row.get("status") or "failed"
        self.counts["inputs"] += 1
        if status in ("ok", "skipped"):
            self.counts[status] += 1
            return
        self.counts["failed"] += 1
        self.counts["known_bad" if row.get("reason") in self.known_bad else "failed_good"] += 1

    def add_rows(self, rows: Iterable[Mapping]) -> "Tally":
        for row in rows:
            self.add(row)
        return self

    def merge(self, counts: Mapping[str, int]) -> None:
        """Add another tally's `as_dict()` (a worker's counts for one part)."""
        for name in COUNTS:
            self.counts[name] += int(counts.get(name, 0))

    def as_dict(self) -> dict[str, int]:
        out = {name: int(self.counts[name]) for name in COUNTS}
        assert out["failed"] == out["known_bad"] + out["failed_good"]
        return out


def exit_code(counts: Mapping[str, int], done: Sequence[str] = ("ok", "skipped")) -> int:
    """The shared policy (samsr.locations.exit_code) from a tally: `done` = the statuses that count as done."""
    return locations.exit_code(done=sum(int(counts[s]) for s in done), failed_good=int(counts["failed_good"]),
                               known_bad=int(counts["known_bad"]))


# ---------------------------------------------------------------- reading

def part_uris(folder: str, run: str | None = None) -> list[str]:
    """The Parquet parts under `folder` (of one `run` when given), sorted by run then name."""
    found = storage.list_files(storage.join(folder, run) if run else folder, (PART_SUFFIX,))
    return sorted(found, key=lambda uri: (run_of(folder, uri), uri))


def run_of(folder: str, uri: str) -> str:
    """The run a part belongs to: the first path component under `folder`."""
    return storage.relative_key(folder, uri).split("/", 1)[0]


def runs(folder: str) -> list[str]:
    """The runs that wrote parts under `folder`, oldest first."""
    return sorted({run_of(folder, uri) for uri in part_uris(folder)})


def read_part(uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One part; `columns`: only those of them it has."""
    table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    return table.select([c for c in columns if c in table.column_names]) if columns else table


def read_parts(folder: str, runs: Sequence[str] | None = None, columns: Sequence[str] | None = None,
               limit: int | None = None) -> pa.Table:
    """Every row of every part under `folder` (or of `runs`), with a `run` column; columns that only some
    parts have are null elsewhere. `limit`: stop reading parts once that many rows are in (the first parts
    by run and name). An empty folder gives an empty table."""
    wanted = None if runs is None else set(runs)
    tables: list[pa.Table] = []
    held = 0
    for uri in part_uris(folder):
        run = run_of(folder, uri)
        if wanted is not None and run not in wanted:
            continue
        table = read_part(uri, columns)
        tables.append(table.append_column(RUN_COLUMN, pa.array([run] * table.num_rows, pa.string())))
        held += table.num_rows
        if limit is not None and held >= limit:
            break
    if not tables:
        return pa.table({RUN_COLUMN: pa.array([], pa.string())})
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.slice(0, limit) if limit is not None else table


def latest(table: pa.Table, key: str) -> pa.Table:
    """One row per `key`: the one of the newest run (ties within a run: the first). Sorted by `key`."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, [(key, "ascending"), (RUN_COLUMN, "descending")])
    ordered = table.take(order)
    keys = ordered.column(key).combine_chunks()
    first = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)).fill_null(True)
    keep = pa.concat_arrays([pa.array([True]), first])
    return ordered.filter(keep)


def read_latest(folder: str, key: str, columns: Sequence[str] | None = None) -> pa.Table:
    """`latest(read_parts(folder), key)`: each object's newest record (e.g. key="input" for upscale)."""
    return latest(read_parts(folder, columns=columns), key)


__all__ = ["PART_SUFFIX", "RUN_COLUMN", "COUNTS", "new_run_id", "part_name", "part_uri", "to_table", "part_bytes",
           "write_part", "PartWriter", "WorkSpool", "folder_writer", "Tally", "exit_code", "part_uris", "run_of", "runs", "read_part", "read_parts", "latest",
           "read_latest"]

"""samsr.records: per-run Parquet parts, the newest record per object, driver-side chunks and counts; the
eval job's running sums (samsr.evaluation.RunningSummary) against summarising the rows at once."""
from __future__ import annotations

import os
from datetime import datetime, timezone

import numpy as np
import pytest

from samsr import evaluation, records


def test_run_ids_sort_by_time_and_parts_are_named_by_their_rows():
    early = records.new_run_id(datetime(2026, 12, 3, 10, 15, 2, 123456, tzinfo=timezone.utc))
    late = records.new_run_id(datetime(2026, 12, 3, 10, 15, 2, 124000, tzinfo=timezone.utc))
    assert early.startswith("20261203T101502123Z-") and early < late
    rows = [{"input": "s3://b/a.png"}, {"input": "s3://b/c.png"}]
    assert records.part_name(rows, "input") == records.part_name([dict(r) for r in rows], "input")   # a retry
    assert records.part_name(rows, "input") != records.part_name(rows[:1], "input")
    assert records.part_uri("s3://b/sr/_manifest", early, "part-x") == f"s3://b/sr/_manifest/{early}/part-x.parquet"


def test_newest_run_wins_per_key_and_columns_of_some_parts_are_null_elsewhere(tmp_path):
    folder = str(tmp_path / "_manifest")
    records.write_part(records.part_uri(folder, "20261201T000000000Z-aaaaaa", "part-1"),
                       [{"input": "a", "status": "ok", "t_sr": 1.5}, {"input": "b", "status": "failed"}])
    records.write_part(records.part_uri(folder, "20261202T000000000Z-bbbbbb", "part-1"),
                       [{"input": "b", "status": "ok", "psnr_y": 30.0}, {"input": "c", "status": "skipped"}])
    assert records.runs(folder) == ["20261201T000000000Z-aaaaaa", "20261202T000000000Z-bbbbbb"]
    every = records.read_parts(folder)
    assert every.num_rows == 4 and set(every.column_names) == {"input", "status", "t_sr", "psnr_y", "run"}
    latest = records.read_latest(folder, "input").to_pylist()
    assert [(r["input"], r["status"], r["run"][:8]) for r in latest] == [
        ("a", "ok", "20261201"), ("b", "ok", "20261202"), ("c", "skipped", "20261202")]
    assert latest[0]["psnr_y"] is None and latest[1]["t_sr"] is None
    first = records.read_parts(folder, runs=["20261201T000000000Z-aaaaaa"])
    assert first.column("input").to_pylist() == ["a", "b"]
    assert records.read_parts(folder, limit=1).num_rows == 1
    assert records.read_parts(str(tmp_path / "none")).num_rows == 0 and records.runs(str(tmp_path / "none")) == []


def test_hostile_names_are_kept_and_the_driver_writes_bounded_chunks(tmp_path):
    odd = os.fsdecode(b"caf\xe9.png")          # a Latin-1 file name os.walk hands over with a surrogate escape
    written = []

    def write(name, rows):
        written.append((name, len(rows)))
        records.write_part(str(tmp_path / "run" / name), rows)

    with records.PartWriter(write, "plan", rows_per_part=2) as parts:
        for name in ("a\\b.png", odd, "x\ny.png", "d.png", "e.png"):
            parts.add({"input": name, "status": "failed", "reason": "unsafe_key"})
        assert written == [("part-plan-00000.parquet", 2), ("part-plan-00001.parquet", 2)]   # never more held
    assert written[-1] == ("part-plan-00002.parquet", 1)
    got = records.read_parts(str(tmp_path)).column("input").to_pylist()
    assert got == ["a\\b.png", "caf\\xe9.png", "x\ny.png", "d.png", "e.png"]
    with pytest.raises(ValueError, match="rows_per_part=0"):
        records.PartWriter(write, rows_per_part=0)


def test_tallies_merge_and_give_the_shared_exit_codes():
    known_bad = ("corrupt", "unsafe_key")
    driver = records.Tally(known_bad).add_rows([{"status": "skipped", "reason": "exists"},
                                                {"status": "failed", "reason": "unsafe_key"}])
    worker = records.Tally(known_bad).add_rows([{"status": "ok"}, {"status": "failed", "reason": "corrupt"}])
    driver.merge(worker.as_dict())
    assert driver.as_dict() == {"ok": 1, "skipped": 1, "failed": 2, "known_bad": 2, "failed_good": 0, "inputs": 4}
    assert records.exit_code(driver.as_dict()) == 0
    worker.add({"status": "failed", "reason": "write_error"})
    assert worker.as_dict()["failed_good"] == 1 and records.exit_code(worker.as_dict()) == 1
    assert records.exit_code(records.Tally().as_dict()) == 1                     # nothing done
    assert records.exit_code({"ok": 0, "skipped": 3, "failed_good": 0, "known_bad": 0}, done=("ok",)) == 1


def test_running_sums_in_parts_match_summarising_all_rows():
    rng = np.random.default_rng(0)
    rows = [{"psnr_y": float(v), "bicubic_psnr_y": float(v) - 0.5, "gmsd": float(g), "t_eval": 9.0, "key": "k"}
            for v, g in zip(rng.normal(30, 2, 41), rng.uniform(0, 0.2, 41))]
    parts = []
    for chunk in (rows[:1], rows[1:17], rows[17:]):          # three write tasks
        part = evaluation.RunningSummary()
        for row in chunk:
            part.add(row)
        parts.append(part.as_dict())
    driver = evaluation.RunningSummary()
    for part in parts:
        driver.merge(part)
    got, want = driver.summary(), evaluation.summarize([{k: v for k, v in r.items() if k != "t_eval"} for r in rows])
    assert got.keys() == want.keys() and "t_eval" not in got and got["psnr_y"]["n"] == 41
    for key in want:
        assert got[key]["mean"] == pytest.approx(want[key]["mean"], abs=1e-12), key
        assert got[key]["std"] == pytest.approx(want[key]["std"], abs=1e-12), key
    one = evaluation.RunningSummary()
    one.add({"psnr_y": 31.25, "bicubic_psnr_y": 31.25})
    assert one.summary()["psnr_y"] == {"mean": 31.25, "std": 0.0, "n": 1} and one.summary()["delta_psnr_y"]["mean"] == 0.0


def test_the_work_spool_holds_one_part_of_rows_and_removes_its_parts(tmp_path):
    import pyarrow as pa

    schema = pa.schema([("input", pa.string()), ("output", pa.string())])
    spool = records.WorkSpool(str(tmp_path / "_work" / "run1"), schema, rows_per_part=3)
    with spool:
        for i in range(7):
            spool.add({"input": f"in/{i}.jpg", "output": f"out/{i}.png"})
            assert len(spool.rows) < 3                                 # never a whole part held
    assert spool.total == 7 and [u.rsplit("/", 1)[1] for u in spool.uris] == [
        "part-work-00000.parquet", "part-work-00001.parquet", "part-work-00002.parquet"]
    got = [records.read_part(u).to_pylist() for u in spool.uris]
    assert [r["input"] for part in got for r in part] == [f"in/{i}.jpg" for i in range(7)]
    assert records.read_part(spool.uris[0]).schema == schema
    spool.remove()
    assert list((tmp_path / "_work" / "run1").glob("*")) == [] and spool.uris == []

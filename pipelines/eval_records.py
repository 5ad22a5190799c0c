"""Where `samsr eval`'s per-image scores go, written in parts by the workers (samsr.records).

Each run of the job adds Parquet parts, one per `rows_per_part` images (and the plan's refusals in chunks
from the driver), to
- `<eval.output>/scores/<run>/part-*.parquet` when `--output` is given, and
- the MLflow run the results go to, as artifacts `eval-scores/<set>/<run>/part-*.parquet`, when there
  is a tracking URI (so a run without `--output` keeps its per-image scores too).
A part row: key, hr, lr, status ok|failed, reason, message, t_decode, t_eval, then the scores
(samsr.evaluation.evaluate_image's keys; failed rows have none). The write task hands the driver one
small row per part: its counts and the running sums of its scores (samsr.evaluation.RunningSummary).
MLflow's table view gets the first `TABLE_ROWS` rows of the run (`first_rows`), never more.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Collection

import numpy as np

from samsr import evaluation, records, storage

SCORES_DIR = "scores"                 # under eval.output
ARTIFACTS = "eval-scores"             # in the MLflow run: eval-scores/<set>/<run>/part-*.parquet
TABLE_ROWS = 1_000                    # rows of the MLflow table eval/<set>/scores.json (the first, by part)
ROW_KEY = "hr"                        # the key a record is about (`key` is "" for an unsafe one)


@dataclass(frozen=True)
class ScoreSink:
    """Where this run's parts go: `folder` (`<output>/scores`, "" = none) and/or an MLflow run."""
    run: str
    folder: str = ""
    tracking_uri: str = ""
    mlflow_run: str = ""
    artifact_dir: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.folder or self.mlflow_run)

    def write(self, name: str, rows: list) -> None:
        """One part; a write that fails (after the S3 / MLflow clients' own retries) raises and fails the
        job: a record is never dropped in silence."""
        if not self.enabled or not rows:
            return
        data = records.part_bytes(rows)
        if self.folder:
            storage.write_bytes(records.part_uri(self.folder, self.run, name), data)
        if self.mlflow_run:
            from mlflow import MlflowClient

            with tempfile.TemporaryDirectory(prefix="samsr-scores-") as tmp:
                path = os.path.join(tmp, name)
                with open(path, "wb") as f:
                    f.write(data)
                MlflowClient(self.tracking_uri).log_artifact(self.mlflow_run, path, f"{self.artifact_dir}/{self.run}")


def score_row(row: dict) -> dict:
    """An actor's output row (scores as a JSON string) -> the record row, scores as columns."""
    out = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items() if k != "scores"}
    return {**out, **json.loads(row.get("scores") or "{}")}


def write_scores(batch: dict, sink: ScoreSink, known_bad: Collection[str]) -> dict[str, list]:
    """A batch of scored rows -> one part (ScoreSink) -> one row: counts (samsr.records.Tally) and the
    running sums of the ok rows' scores (`summary`, JSON)."""
    n = len(batch[ROW_KEY])
    rows = [score_row({k: v[i] for k, v in batch.items()}) for i in range(n)]
    sink.write(records.part_name(rows, ROW_KEY), rows)
    sums = evaluation.RunningSummary()
    for row in rows:
        if row["status"] == "ok":
            sums.add(row)
    counts = records.Tally(known_bad).add_rows(rows).as_dict()
    return {**{k: [v] for k, v in counts.items()}, "summary": [json.dumps(sums.as_dict())]}


def first_rows(sink: ScoreSink, limit: int = TABLE_ROWS) -> list[dict]:
    """The first `limit` rows of this run's parts (by part name), from the output or else from MLflow."""
    if sink.folder:
        return records.read_parts(sink.folder, runs=[sink.run], limit=limit).drop_columns(
            [records.RUN_COLUMN]).to_pylist()
    if not sink.mlflow_run:
        return []
    from mlflow import MlflowClient

    client, rows = MlflowClient(sink.tracking_uri), []
    parts = sorted(a.path for a in client.list_artifacts(sink.mlflow_run, f"{sink.artifact_dir}/{sink.run}"))
    with tempfile.TemporaryDirectory(prefix="samsr-scores-") as tmp:
        for path in parts:
            local = client.download_artifacts(sink.mlflow_run, path, tmp)
            rows.extend(records.read_part(local).to_pylist())
            os.remove(local)
            if len(rows) >= limit:
                break
    return rows[:limit]


__all__ = ["ScoreSink", "score_row", "write_scores", "first_rows", "SCORES_DIR", "ARTIFACTS", "TABLE_ROWS",
           "ROW_KEY"]

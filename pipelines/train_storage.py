"""Ray Train storage of `samsr train` (`job.storage`, a folder or s3:// prefix): where Ray Train keeps
the run's checkpoints, and the clean-up after a completed run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from samsr import storage


def storage_target(uri: str) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem) for a folder or s3:// prefix (endpoint from env)."""
    if storage.is_s3(uri):
        fs, path = storage.filesystem(uri)
        return path, fs
    return str(Path(uri).expanduser().resolve()), None


def remove_orphan_checkpoints(fs, run_path: str, kept: list[str]) -> list[str]:
    """Remove the checkpoint_* folders under a run's Ray Train storage that are not in `kept` (what Ray
    Train's result lists): a worker that outlived its killed driver, or a deletion cut short, leaves
    folders that `num_to_keep` never sees. Call only after a completed run. Returns the removed paths."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    keep = {p.rstrip("/") for p in kept}
    found = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    orphans = sorted(i.path for i in found if i.type == pafs.FileType.Directory
                     and i.base_name.startswith("checkpoint_") and i.path.rstrip("/") not in keep)
    for path in orphans:
        fs.delete_dir(path)
    return orphans


__all__ = ["storage_target", "remove_orphan_checkpoints"]

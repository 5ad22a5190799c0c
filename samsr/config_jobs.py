"""The Ray jobs' config sections (`shard`, `job` = training, `upscale`, `eval`) of samsr.config.Config:
where each job reads and writes, its Ray resources, and `shared_fs` — whether a local path is on a
filesystem every node of a multi-node cluster mounts (pipelines/nodes.py checks it before any work).
samsr.config re-exports them; load configs through it."""
from __future__ import annotations

from dataclasses import dataclass

# (field, least value, strictly above it) for the job sections' Ray resource settings
RESOURCE_LIMITS = (("actors", 1, False), ("num_workers", 1, False), ("gpus_per_actor", 0, False),
                   ("gpu_wait_s", 0, False), ("cpus_per_actor", 0, True), ("cpus_per_worker", 0, True),
                   ("decode_cpus", 0, True), ("decode_concurrency", 0, False), ("min_actors", 0, False),
                   ("max_actors", 0, False))


@dataclass(frozen=True)
class ShardConfig:
    """The shard job (`samsr shard`, DESIGN.md "Shard format")."""
    input: str = ""                     # folder or s3:// prefix of images
    output: str = ""                    # folder or s3:// prefix for the .tar shards
    samples_per_shard: int = 64
    actors: int = 1                     # segmenter actor pool size
    gpus_per_actor: float = 0.0         # > 0: asked of the cluster (autoscaler), waited for gpu_wait_s; 0: CPU
    gpu_wait_s: float = 600.0           # how long to wait for the GPUs to appear before failing
    cpus_per_actor: float = 1.0
    batch_size: int = 4                 # images per segmenter call batch
    lrup_masks: bool = True             # also segment y↑ (SAMSR); off when only SAM-DiffSR is trained
    limit: int = 0                      # only the first N images of the sorted listing (0 = all)
    png_compress_level: int = 1         # PIL level: 1 is ~5x faster than 6 for +18% bytes
    preview: bool = True                # _preview/shard-NNNNN.jpg contact sheets
    shared_fs: bool = False             # local paths are on a filesystem every node mounts (checked per node)
    listing: str = ""                   # input keys from a file (S3 Inventory CSV/Parquet, one a line) instead of LIST
    verify: bool = False                # resume: also sha256 every finished tar (Ray tasks); default: size + ETag/mtime


@dataclass(frozen=True)
class JobConfig:
    """The Ray Train job (`samsr train`, DESIGN.md "Training")."""
    shards: str = ""                    # folder or s3:// prefix of the .tar shards (samsr shard's output)
    storage: str = ""                   # Ray Train storage (checkpoints): folder or s3:// prefix
    name: str = ""                      # run name; "" = the config's name. Same name + storage resumes
    num_workers: int = 1
    use_gpu: bool = False               # one GPU per worker, asked of the cluster and waited for gpu_wait_s
    gpu_wait_s: float = 600.0
    cpus_per_worker: float = 1.0
    max_failures: int = 3               # worker-group restarts from the latest checkpoint (a lost node); -1 = no limit
    keep_checkpoints: int = 3
    experiment: str = "samsr"           # MLflow experiment
    tracking_uri: str = ""              # MLflow server; "" = $MLFLOW_TRACKING_URI (none: no MLflow logging)
    sample_pool: int = 16               # local shuffle buffer of each worker, in samples (× crops_per_sample crops)
    crops_per_sample: int = 8           # crops cut from each decoded sample per pass
    decode_cpus: float = 1.0            # CPUs of each Ray Data task that reads, decodes and crops shards, one by one
    decode_concurrency: int = 0         # such tasks at once; 0 = as many as the CPUs allow (-tiny/-cpu: 2 cores)
    val: str = ""                       # HR images (folder | s3://) to validate on; "" = hold out shard samples
    val_images: int = 4                 # images in the validation set (the first N, sorted); 0 = no validation
    val_crop: int = 256                 # central HR crop side of each validation image (px; 0 = whole image)
    max_skipped_fraction: float = 0.05  # bad shard samples skipped before training fails (share of those read)
    register: str = ""                  # MLflow registered model to add the final model to as a new version
    register_alias: str = "candidate"   # alias set on that version: models:/<register>@<alias>
    system_metrics_s: float = 10.0      # rank 0's node CPU/memory/disk/network (GPU) as system/* every N s; 0 = off
    shared_fs: bool = False             # local paths are on a filesystem every node mounts (checked per node)


@dataclass(frozen=True)
class UpscaleConfig:
    """The batch inference job (`samsr upscale`, DESIGN.md "Batch upscale")."""
    input: str = ""                     # folder or s3:// prefix of LR images (listed recursively)
    output: str = ""                    # folder or s3:// prefix; each output key mirrors its input key
    model: str = ""                     # samsr checkpoint (path | s3://) or MLflow model (runs:/… | models:/…)
    tracking_uri: str = ""              # MLflow server for runs:/ models; "" = $MLFLOW_TRACKING_URI
    overwrite: bool = False             # default: outputs that exist are skipped
    actors: int = 1                     # model actor pool size (fixed unless min_actors / max_actors are set)
    min_actors: int = 0                 # autoscaling pool: least size; 0 = actors (actor_pool())
    max_actors: int = 0                 # autoscaling pool: most size; 0 = max(actors, min_actors)
    gpus_per_actor: float = 0.0         # > 0: asked of the cluster (autoscaler), waited for gpu_wait_s; 0: CPU
    gpu_wait_s: float = 600.0
    cpus_per_actor: float = 1.0
    limit: int = 0                      # only the first N inputs of the sorted listing (0 = all)
    png_compress_level: int = 1
    shared_fs: bool = False             # local paths are on a filesystem every node mounts (checked per node)


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation job (`samsr eval`, pipelines/eval.py)."""
    model: str = ""                     # samsr checkpoint (path | s3://) or MLflow model (runs:/… | models:/…)
    hr: str = ""                        # folder or s3:// prefix of HR images (listed recursively)
    lr: str = ""                        # LR images matched to HR by key; "" = made from HR as `samsr shard` does
    set_name: str = ""                  # name in the metric keys eval/<set>/…; "" = the HR folder's name
    samples: int = 1                    # samples per image with seeds seed, seed+1, …
    seed: int = 0
    crop: int = 0                       # central HR crop side (px) to bound time; 0 = whole images
    output: str = ""                    # folder or s3:// prefix: scores/<run>/ + summary.json; "" = none
    lpips_weights: str = ""             # LPIPS-AlexNet state_dict (path | s3://); "" = no LPIPS
    tracking_uri: str = ""              # MLflow server; "" = $MLFLOW_TRACKING_URI (none: results not logged)
    experiment: str = "samsr-eval"      # MLflow experiment of the run made for a model that is not runs:/…
    actors: int = 1                     # model actor pool size (fixed unless min_actors / max_actors are set)
    min_actors: int = 0                 # autoscaling pool: least size; 0 = actors (actor_pool())
    max_actors: int = 0                 # autoscaling pool: most size; 0 = max(actors, min_actors)
    gpus_per_actor: float = 0.0         # > 0: asked of the cluster (autoscaler), waited for gpu_wait_s; 0: CPU
    gpu_wait_s: float = 600.0
    cpus_per_actor: float = 1.0
    limit: int = 0                      # only the first N HR images of the sorted listing (0 = all)
    shared_fs: bool = False             # local paths are on a filesystem every node mounts (checked per node)


def actor_pool(section: UpscaleConfig | EvalConfig) -> tuple[int, int]:
    """(least, most) model actors of an upscale or eval job. Only `actors` set: a fixed pool of that size,
    as always. `max_actors` set: the pool grows from `min_actors` (else `actors`) up to `max_actors` while
    work waits, and shrinks back when it runs out. `min_actors` alone: that fixed size; with `actors` above
    it, up to `actors`. Config load refuses least > most (samsr.config)."""
    least = section.min_actors or section.actors
    return least, section.max_actors or max(least, section.actors)


__all__ = ["RESOURCE_LIMITS", "ShardConfig", "JobConfig", "UpscaleConfig", "EvalConfig", "actor_pool"]

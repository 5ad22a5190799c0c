"""The shard format and the per-image work of `samsr shard` (DESIGN.md "Shard format"), without Ray:
`format` (keys, members <-> bytes, deterministic tars), `plan` (listing -> shard ids, `_plan.json`),
`process` (decode -> masks + SPE + coverage -> members), `preview` (contact sheets).
"""
from samsr.shards.format import decode_members, read_tar, sample_key, tar_bytes
from samsr.shards.plan import Plan, build_plan, plan_from_json, plan_to_json, shard_name
from samsr.shards.process import Failure, process_image

__all__ = ["decode_members", "read_tar", "sample_key", "tar_bytes", "Plan", "build_plan", "plan_from_json",
           "plan_to_json", "shard_name", "Failure", "process_image"]

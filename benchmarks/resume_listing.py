"""A finished shard job's rerun at 10⁴ shards: what the resume check costs (issue 20, item 1).

Starts a local S3 endpoint (moto, 127.0.0.1), writes N finished shards into it (a small tar each, its
manifest recording size, ETag and sha256 as `write_shard` records them), then times, side by side:

- `listing`: one streamed listing of the output (what any resume must do at least);
- `no_index`: `shard_resume.check_finished` without `_manifest/_index.parquet` (a job from before the
  index, or one whose index is gone): listing + one manifest read per shard; the tallies are then saved
  as the job saves them at its end;
- `resume`: the same check as a rerun runs it with the index: listing + one index GET;
- `verify`: the same with `--verify` (hashes every tar; here in driver threads, in the job Ray tasks).

It counts the requests the server logged for each, and GETs of tar bytes. Prints one JSON line per
step and a summary; numbers go to benchmarks/RESULTS.md by hand.

    .venv/bin/python benchmarks/resume_listing.py [--shards 10000] [--tar-kb 8]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines import shard_resume as resume
from pipelines.local import services
from samsr import listing, storage
from samsr.shards import format as fmt
from samsr.shards import plan as plan_mod


def write_finished(output: str, shards: int, tar_kb: int) -> plan_mod.Plan:
    def one(i: int) -> plan_mod.Entry:
        name = plan_mod.shard_name(i)
        data = hashlib.sha256(str(i).encode()).digest() * (tar_kb * 32)
        storage.write_bytes(f"{output}/{name}.tar", data)
        uri = f"s3://in/{i:08d}/a long, odd key with spaces – and ünïcode/{'x' * 80}.png"
        manifest = {"shard": name, "tar": f"{name}.tar", "tar_bytes": len(data),
                    "tar_sha256": hashlib.sha256(data).hexdigest(), "tar_stamp": listing.stat(f"{output}/{name}.tar").stamp,
                    "ok": 1, "failed": 0, "segmenter": {"segmenter": "superpixel"},
                    "samples": [{"key": f"{i:08d}", "uri": uri, "status": "ok", "reason": None, "message": None,
                                 "hr_masks": 3, "lrup_masks": 2}]}
        storage.write_bytes(f"{output}/_manifest/{name}.json", fmt.dumps(manifest))
        return plan_mod.Entry(uri, f"{i:08d}")

    with ThreadPoolExecutor(16) as pool:
        entries = list(pool.map(one, range(shards)))
    return plan_mod.Plan("s3://in", 1, {}, tuple((e,) for e in entries), ())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--tar-kb", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="samsr-resume-"))
    moto = services.start_moto(work)
    os.environ.update(AWS_ENDPOINT_URL=moto.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3

        boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket="bench")
        output = "s3://bench/shards"
        t = time.perf_counter()
        plan = write_finished(output, args.shards, args.tar_kb)
        print(json.dumps({"step": "write", "shards": args.shards, "seconds": round(time.perf_counter() - t, 1)}))
        results = {}
        for step in ("listing", "no_index", "resume", "verify"):
            since, t = moto.log_path.stat().st_size, time.perf_counter()
            if step == "listing":
                n = sum(1 for _ in listing.iter_listing(output))
                assert n == 2 * args.shards
            else:
                totals = resume.Totals()
                why = resume.check_finished(output, plan, totals, verify=step == "verify")
                assert why == {}, list(why.items())[:3]
                if step == "no_index":
                    totals.save(output)
            seconds = time.perf_counter() - t
            asked = services.s3_requests(moto.log_path, since)
            tar_gets = sum(m == "GET" and p.endswith(".tar") for m, p in asked)
            results[step] = {"step": step, "seconds": round(seconds, 2), "requests": len(asked),
                             "requests_per_shard": round(len(asked) / args.shards, 3), "tar_gets": tar_gets}
            print(json.dumps(results[step]))
        print(f"summary ({platform.node()}, {os.cpu_count()} CPUs): {args.shards} finished shards; rerun check "
              f"{results['resume']['seconds']:.1f} s, {results['resume']['requests_per_shard']:.2f} requests/shard, "
              f"{results['resume']['tar_gets']} tar GETs; listing alone {results['listing']['seconds']:.1f} s "
              f"({results['listing']['seconds'] / results['resume']['seconds']:.2f} of it); --verify "
              f"{results['verify']['seconds']:.1f} s ({results['verify']['seconds'] / results['resume']['seconds']:.1f}x); "
              f"without the index {results['no_index']['seconds']:.1f} s, {results['no_index']['requests_per_shard']:.2f} "
              "requests/shard")
    finally:
        moto.stop()


if __name__ == "__main__":
    main()

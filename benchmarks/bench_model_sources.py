"""Actor start-up with the model on S3 (node cache warm) vs the same model in a folder.

    .venv/bin/python benchmarks/bench_model_sources.py [--quick] [--repeats 3]

A render actor's start-up is building its `Renderer` (pipelines loaded, moved to the
device, warmed up nowhere: `warmup_sizes` empty). Each measurement runs in a fresh
Python process, with torch, diffusers and sdbatch imported before the clock starts, so
the figure is the model's resolution and load only:

- local: `models.base` is the tiny model's folder.
- S3 cold: `s3://…/prefix/` on a moto server (a child process on 127.0.0.1) with an
  empty node cache: listing, download of the loaded files, load.
- S3 warm, driver's listing (what `run` does): the cache is filled and the actor gets
  the driver's listing of the prefix, so it loads from the cache without a request.
- S3 warm, actor lists: the same without the listing (rerun, estimate): one LIST and one
  GET of model_index.json to recompute the content key, then the load from the cache.

The figure is S3 warm ÷ local (medians of --repeats fresh processes each). Tiny models:
the load is short, so the fixed S3 cost (two requests to a Python S3 server sharing
these 2 cores) weighs more here than it would for a multi-GB checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness as h

from tests.s3server import S3Server, use_fake_aws_env

BENCH = "model_sources"


def child(args: argparse.Namespace) -> None:
    os.environ["SDBATCH_CACHE_DIR"] = args.cache
    import torch  # noqa: F401 - imported before the clock starts

    from sdbatch.models import use_storage
    from sdbatch.render import Renderer

    storage = json.loads(args.storage)
    started = time.perf_counter()
    use_storage(storage)
    Renderer(models={"txt2img": args.ref}, model_hashes={}, batch_size=1, storage=storage,
             model_sources=json.loads(args.sources))  # fmt: skip
    h.child_report({"startup_s": time.perf_counter() - started})


def startup(ref: str, cache: str, storage: dict, sources: dict | None = None) -> float:
    """Seconds to build a Renderer for `ref` in a fresh process (after its imports)."""
    cmd = [__file__, "--child", "--cache", cache, "--ref", ref]
    cmd += ["--storage", json.dumps(storage), "--sources", json.dumps(sources or {})]
    return h.run_child(cmd, timeout=600)["startup_s"]


def measure(server: S3Server, variant: str, folder: Path, repeats: int) -> dict:
    """The model uploaded under s3://models/<variant>/; each way of starting, timed."""
    from sdbatch.modelcache import local_copy, plans

    bucket, storage = server.bucket("models"), server.storage()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{variant}/{path.relative_to(folder).as_posix()}"
            server.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    uri = f"s3://{bucket}/{variant}/"
    cache = tempfile.mkdtemp(prefix="sdbatch-bench-cache-")
    cold = startup(uri, cache, storage)
    local = [startup(str(folder), cache, storage) for _ in range(repeats)]
    listed = [startup(uri, cache, storage) for _ in range(repeats)]
    # What run_job does: the driver lists the prefix and hands the listing over.
    os.environ["SDBATCH_CACHE_DIR"] = cache
    local_copy(uri, storage)
    sources = plans([uri])
    warm = [startup(uri, cache, storage, sources) for _ in range(repeats)]
    med = statistics.median
    return {"local_s": local, "s3_warm_s": warm, "s3_warm_self_listed_s": listed,
            "s3_cold_s": cold, "warm_over_local": h.ratio(med(warm), med(local)),
            "self_listed_over_local": h.ratio(med(listed), med(local))}  # fmt: skip


def main() -> int:
    p = h.parser(__doc__, job=False, quick_help="1 repeat",
                 hidden=["ref", "cache", "storage", "sources"])  # fmt: skip
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = h.parse(p, repeats=1)
    if args.child:
        return child(args) or 0
    use_fake_aws_env()
    models = h.tiny_models(["base", "sdxl"])
    config = {"repeats": args.repeats, "models": list(models)}
    h.header("model_sources: actor start-up, S3 (warm node cache) vs local folder", config)
    server = S3Server(process=True)
    try:
        figures = {v: measure(server, v, folder, args.repeats) for v, folder in models.items()}
    finally:
        server.stop()
    med = statistics.median
    h.table(["model", "local s", "S3 warm s (driver's listing)", "S3 warm s (actor lists)",
             "S3 cold s", "warm / local"],
            [[v, med(f["local_s"]), med(f["s3_warm_s"]), med(f["s3_warm_self_listed_s"]),
              f["s3_cold_s"], f["warm_over_local"]] for v, f in figures.items()])  # fmt: skip
    print(
        "   start-up = Renderer construction in a fresh process after imports; cold includes "
        "the download into an empty node cache."
    )
    headline = {f"{v} S3 warm ÷ local start-up": f["warm_over_local"] for v, f in figures.items()}
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

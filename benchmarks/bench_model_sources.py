"""Actor start-up with the model on S3 (node cache warm) vs the same model in a folder (issue 13).

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

Goal: S3 warm ≤ 1.1× local (median of --repeats fresh processes each). Tiny models: the
load is short, so the fixed S3 cost (two requests to a Python S3 server sharing these 2
cores) weighs more here than it would for a multi-GB checkpoint.
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

import _common as c

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.s3server import S3Server, use_fake_aws_env  # noqa: E402

BENCH = "model_sources"


def child(args: argparse.Namespace) -> None:
    os.environ["SDBATCH_CACHE_DIR"] = args.cache
    import torch  # noqa: F401 - imported before the clock starts

    from sdbatch.models import use_storage
    from sdbatch.render import Renderer

    storage = json.loads(args.storage)
    sources = json.loads(args.sources)
    started = time.perf_counter()
    use_storage(storage)
    Renderer(
        models={"txt2img": args.ref},
        model_hashes={},
        batch_size=1,
        storage=storage,
        model_sources=sources,
    )
    c.child_report({"startup_s": time.perf_counter() - started})


def startup(ref: str, cache: str, storage: dict, sources: dict | None = None) -> float:
    """Seconds to build a Renderer for `ref` in a fresh process (after its imports)."""
    cmd = [str(Path(__file__).resolve()), "--child", "--cache", cache, "--ref", ref]
    cmd += ["--storage", json.dumps(storage), "--sources", json.dumps(sources or {})]
    return c.run_child(cmd, timeout=600)["startup_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--storage", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--sources", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.repeats = 1

    use_fake_aws_env()
    from sdbatch.modelcache import local_copy, plans

    models = c.tiny_models(["base", "sdxl"])
    config = {"repeats": args.repeats, "models": list(models)}
    c.header("model_sources: actor start-up, S3 (warm node cache) vs local folder", config)
    server = S3Server(process=True)
    figures: dict = {}
    rows = []
    try:
        bucket = server.bucket("models")
        storage = server.storage()
        for variant, folder in models.items():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    key = f"{variant}/{path.relative_to(folder).as_posix()}"
                    server.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            uri = f"s3://{bucket}/{variant}/"
            cache = tempfile.mkdtemp(prefix="sdbatch-bench-cache-")
            cold = startup(uri, cache, storage)
            local = [startup(str(folder), cache, storage) for _ in range(args.repeats)]
            listed = [startup(uri, cache, storage) for _ in range(args.repeats)]
            # What run_job does: the driver lists the prefix and hands the listing over.
            os.environ["SDBATCH_CACHE_DIR"] = cache
            local_copy(uri, storage)
            sources = plans([uri])
            warm = [startup(uri, cache, storage, sources) for _ in range(args.repeats)]
            ratio = c.ratio(statistics.median(warm), statistics.median(local))
            figures[variant] = {
                "local_s": local,
                "s3_warm_s": warm,
                "s3_warm_self_listed_s": listed,
                "s3_cold_s": cold,
                "warm_over_local": ratio,
                "self_listed_over_local": c.ratio(
                    statistics.median(listed), statistics.median(local)
                ),
            }
            rows.append(
                [
                    variant,
                    statistics.median(local),
                    statistics.median(warm),
                    statistics.median(listed),
                    cold,
                    ratio,
                    c.verdict(ratio, 1.1, higher_is_better=False),
                ]
            )
    finally:
        server.stop()
    c.table(
        [
            "model",
            "local s",
            "S3 warm s (driver's listing)",
            "S3 warm s (actor lists)",
            "S3 cold s",
            "warm / local",
            "≤ 1.1",
        ],
        rows,
    )
    print(
        "   start-up = Renderer construction in a fresh process after imports; cold includes "
        "the download into an empty node cache."
    )
    c.emit(BENCH, args.quick, config, figures)


if __name__ == "__main__":
    sys.exit(main())

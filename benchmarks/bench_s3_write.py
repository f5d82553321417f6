"""S3 write throughput, and whether writing to S3 ever holds the render stage back.

    .venv/bin/python benchmarks/bench_s3_write.py [--quick] [--objects 1000] [--items 96]

1. Writes `--objects` small PNGs (64×64, ~12 KB, like a tiny-model render) to a local
   moto S3 server through `S3Store`, with 1 thread (what one write task does) and with
   8 threads, and prints objects/s.
2. Runs a tiny-model job with its manifest and output on that server, then once more
   with a local output, and reads Ray's task timeline (`ray.timeline()`: start and
   duration of every actor call and task). Render busy = time the render actors spend
   inside their calls / the span from each actor's first call start to its last call
   end. If uploads held the pipeline back, Ray Data's backpressure would leave actors
   idle between calls and this fraction would fall. The write tasks' total time is
   printed beside the actors' (a write stage needing a small fraction of the render
   time can't be the bottleneck), and so is the time from the last render call's end to
   the job's end (what the writes and the final commit add after rendering stops).

Everything runs on this machine: moto (a child process, in Python) shares the CPUs with
the client and the render actors and is itself the bottleneck of part 1 (plain boto3
puts are no faster than S3Store's), so these are lower bounds for a real S3 endpoint.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import harness as h
from _steady import RENDER_CALLS

from tests.s3server import S3Server, use_fake_aws_env

BENCH = "s3_write"
# The write stage in Ray's task timeline: write_blocks since the plan streams (write_batch
# before; matching only that one counted 0 s of writes).
WRITE_TASKS = ("task::MapBatches(write_blocks)", "task::MapBatches(write_batch)")
use_fake_aws_env()  # before Ray starts: its local workers inherit the environment


def png_bytes(i: int, size: int = 64) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def bench_puts(server: S3Server, n: int, threads: int) -> float:
    from sdbatch.store import open_store

    store = open_store(f"s3://{server.bucket('bench')}/out", server.storage())
    payloads = [png_bytes(i) for i in range(n)]
    keys = [f"images/{i % 256:02x}/img-{i:05d}.png" for i in range(n)]
    store.write_bytes("warmup", b"x")  # client creation is not what we measure

    def put(i: int) -> None:
        store.write_bytes(keys[i], payloads[i], content_type="image/png")

    t = h.timer()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(n)))
    seconds = t()
    assert sum(1 for k in store.list("images")) == n
    kb = sum(map(len, payloads)) / n / 1024
    print(f"  {n} PNGs (~{kb:.0f} KB) with {threads} thread(s): {n / seconds:,.0f} objects/s")
    return n / seconds


def stage_figures(started: float, finished: float, ended: float) -> dict[str, float]:
    """Busy time of the render actors and write tasks, from Ray's task timeline."""
    import ray

    lo, hi = started * 1e6, ended * 1e6  # timeline timestamps are µs since the epoch
    actors: dict[str, list[tuple[float, float]]] = defaultdict(list)
    write_seconds = 0.0
    for event in ray.timeline():
        cat, ts, dur = event.get("cat", ""), event.get("ts", 0), event.get("dur", 0)
        if event.get("ph") != "X" or not lo <= ts <= hi:
            continue
        if cat in RENDER_CALLS:
            actors[event["tid"]].append((ts, ts + dur))
        elif cat.startswith(WRITE_TASKS):
            write_seconds += dur / 1e6
    busy = sum(e - s for calls in actors.values() for s, e in calls) / 1e6
    spans = sum(max(e for _, e in c) - min(s for s, _ in c) for c in actors.values()) / 1e6
    first = min(s for c in actors.values() for s, _ in c)
    last = max(e for c in actors.values() for _, e in c)
    return {
        "actors": len(actors),
        "busy": busy,
        "in_span": busy / spans,
        "in_stage": busy / (len(actors) * (last - first) / 1e6),
        "write": write_seconds,
        "tail": finished - last / 1e6,  # job end after the last render call ended
    }


def bench_job(server: S3Server, args: argparse.Namespace) -> dict[str, dict]:
    from sdbatch.output import read_metadata
    from sdbatch.runner import run_job

    model = h.tiny_models(["base"])["base"]
    bucket, storage = server.bucket("job"), server.storage()
    local = h.manifest(h.OUT / BENCH / "m.parquet", h.rows(args.items))
    server.client.put_object(Bucket=bucket, Key="jobs/m.parquet", Body=local.read_bytes())
    print(
        f"\n2. tiny-model job: {args.items} items, {args.size}², {args.steps} steps, "
        f"batch 4, {args.actors} actors (Ray task timeline)"
    )
    figures = {}
    for label, output in (
        ("S3 output", f"s3://{bucket}/out"),
        ("local output", tempfile.mkdtemp(prefix="bench-local-")),
    ):
        spec = h.job(h.OUT / BENCH / f"{label.split()[0]}.yaml", f"s3://{bucket}/jobs/m.parquet",
                     output, {"base": model}, size=args.size, steps=args.steps,
                     actors=args.actors, storage=storage)  # fmt: skip
        started = time.time()
        result = run_job(h.load(spec))
        finished = time.time()
        time.sleep(2)  # task events reach the GCS about once a second
        f = stage_figures(started, finished, time.time())
        assert result.done == args.items, result
        in_calls = float(read_metadata(output, storage).to_pandas()["render_seconds"].sum())
        print(
            f"  {label}: wall {result.wall_seconds:.1f} s, {result.images_per_second:.2f} images/s"
            f"\n    render actors busy {f['in_span']:.1%} of their span (first call start → "
            f"last call end, per actor), {f['in_stage']:.1%} of the render stage's span"
            f"\n    render calls {f['busy']:.1f} actor-s (pipeline calls alone {in_calls:.1f} s); "
            f"write tasks {f['write']:.1f} s in all "
            f"= {f['write'] / f['busy']:.1%} of the render time; the job ended "
            f"{f['tail']:.2f} s after the last render call"
        )
        key = label.split()[0].lower()
        figures[key] = {**f, "wall_s": result.wall_seconds, "in_calls_s": in_calls,
                        "images_per_s": result.images_per_second}  # fmt: skip
    return figures


def main() -> int:
    p = h.parser(__doc__, job=False, quick_help="50 objects; 16 items, 64², 2 steps")
    p.add_argument("--objects", type=int, default=1000)
    p.add_argument("--items", type=int, default=96)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--skip-job", action="store_true")
    args = h.parse(p, objects=50, items=16, size=64, steps=2)
    config = {k: getattr(args, k) for k in ("objects", "items", "size", "steps", "actors")}
    h.header(f"{BENCH}: S3 PUTs, and render busy with S3 vs local output", config)
    h.workdir(BENCH)
    # moto in its own process, as a real endpoint would be: not sharing our GIL.
    server = S3Server(process=True)
    figures: dict = {}
    try:
        print(f"1. PUT through S3Store to moto (separate process) at {server.endpoint_url}")
        for threads in (1, 8):
            figures[f"objects_per_s_{threads}_threads"] = bench_puts(server, args.objects, threads)
        if not args.skip_job:
            figures.update(bench_job(server, args))
    finally:
        server.stop()
    headline = {k: v for k, v in figures.items() if not isinstance(v, dict)}
    for key in ("s3", "local"):
        if key in figures:
            headline[f"{key} output: images/s"] = figures[key]["images_per_s"]
            headline[f"{key} output: render busy in span"] = figures[key]["in_span"]
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

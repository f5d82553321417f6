"""Scaling with work (issue 7 #2): time per image for growing jobs; planning memory.

    .venv/bin/python benchmarks/bench_scaling.py [--quick] [--counts 64,512,4096] [--rows 1000000]

1. The same job shape (64×64, 2 DDIM steps, batch 4, 2 actors × 1 thread) with 64, 512
   and 4,096 items, one after the other on one local Ray (a small warm-up job first).
   Per job: steady-state seconds per image (from the metadata and Ray's timeline, see
   _common.py: every actor's first block left out), in-call seconds per image, and end
   to end (run_job's whole wall time / images, start-up included, so it falls as jobs
   grow; that one is not expected to be flat). Goal: steady-state time per image flat
   within ±10 % of the median of the three.
2. (The pre-streaming driver path: run_job no longer plans in the driver, see
   bench_stream.py for what a job's driver costs now.)
   Driver memory for planning a 10⁶-row manifest: the manifest is written with pyarrow,
   then a fresh Python process runs only the driver's planning path, as run_job does
   it but without Ray: `validate_manifest`, `plan_items` over the streamed rows,
   `homogeneous_blocks` with run_job's block size, each block turned into an Arrow
   table (run_job hands those to `ray.put`; here they are dropped). Peak RSS is the
   process's high-water mark (VmHWM; `ru_maxrss` is printed too but a child inherits
   its parent's, see rss_mib), so it includes Python, pyarrow and sdbatch's imports
   (printed as the baseline). Goal: ≤ 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import _common as c

BENCH = "scaling"


def rss_mib() -> float:
    """Peak RSS of this process so far, MiB: VmHWM, the high-water mark of its own
    address space. `ru_maxrss` is printed beside it but is not the figure: Linux carries
    it over from the parent at fork + exec, so a child of a 250 MiB process reports at
    least 250 MiB however little it uses."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru_maxrss_mib()


def ru_maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_plan(args: argparse.Namespace) -> None:
    """The driver's planning path alone (no Ray), in a fresh process; prints CHILD json."""
    import pyarrow as pa

    from sdbatch.manifest import iter_rows, validate_manifest
    from sdbatch.plan import ITEM_SCHEMA, block_rows_for, homogeneous_blocks, plan_items
    from sdbatch.spec import parse_spec

    baseline = rss_mib()
    spec = parse_spec(json.loads(args.plan_spec))
    t0 = time.perf_counter()
    info = validate_manifest(spec.manifest, spec)
    t1 = time.perf_counter()
    after_validate = rss_mib()
    block_rows = block_rows_for(info.total_items, spec.batch_size, args.actors)
    items = plan_items(iter_rows(spec.manifest, info.columns), spec, set())
    blocks = planned = arrow_bytes = 0
    for block in homogeneous_blocks(items, block_rows):
        table = pa.Table.from_pylist(block, schema=ITEM_SCHEMA)
        blocks += 1
        planned += table.num_rows
        arrow_bytes += table.nbytes
    t2 = time.perf_counter()
    c.child_report(
        {
            "rows": info.num_rows,
            "items": planned,
            "blocks": blocks,
            "block_rows": block_rows,
            "arrow_mib": arrow_bytes / 2**20,
            "validate_s": t1 - t0,
            "plan_s": t2 - t1,
            "baseline_mib": baseline,
            "after_validate_mib": after_validate,
            "peak_mib": rss_mib(),
            "ru_maxrss_mib": ru_maxrss_mib(),
        }
    )


def write_big_manifest(path: Path, rows: int) -> None:
    """id + prompt, written in chunks so this process stays small too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    chunk = 100_000
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            ids = [f"row-{i:08d}" for i in range(start, start + n)]
            prompts = [f"{c.SUBJECTS[i % 4]}, style {i}, highly detailed" for i in range(n)]
            writer.write_table(pa.table({"id": ids, "prompt": prompts}, schema=schema))


def main() -> None:
    parser = c.job_parser(
        __doc__,
        size=64,
        steps=2,
        actors=2,
        threads=1,
        with_items=False,
        quick_help="16/32/48 items",
    )
    parser.add_argument("--counts", default="64,512,4096", help="item counts")
    parser.add_argument("--rows", type=int, default=1_000_000, help="planning manifest rows")
    parser.add_argument("--skip-jobs", action="store_true", help="planning memory only")
    parser.add_argument("--plan-spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plan_spec:
        return child_plan(args)
    if args.quick:  # the quick sizes are this benchmark's own: it is about counts
        args.counts, args.rows = "16,32,48", 20_000
    counts = [int(n) for n in args.counts.split(",")]
    config = c.job_config(args, counts=counts, plan_rows=args.rows)
    c.header("scaling with work: time per image vs job size; planning memory", config)
    work = c.workdir(BENCH)
    models = {"base": c.tiny_models(["base"])["base"]}
    compute = dict(actors=args.actors, threads=args.threads, batch_size=args.batch)
    figures: dict = {"jobs": {}}

    # 1. Jobs of growing size on one Ray.
    if not args.skip_jobs:
        c.start_ray()
        c.warm_up(models, work, **compute)
        for n in counts:
            manifest = c.write_manifest(work / f"m{n}.parquet", c.prompt_rows(n))
            output = work / f"out-{n}"
            spec = c.make_spec(
                f"scale{n}", manifest, output, models, size=args.size, steps=args.steps, **compute
            )
            figures["jobs"][str(n)] = c.job_figures(c.run_timed(spec), output)
        c.quiet_ray_shutdown()
        per_image = {
            n: (1 / f["steady_ips"] if f["steady_ips"] else None)
            for n, f in figures["jobs"].items()
        }
        known = [v for v in per_image.values() if v]
        median = statistics.median(known) if known else None
        rows = []
        for n, f in figures["jobs"].items():
            dev = per_image[n] / median - 1 if per_image[n] and median else None
            f["steady_s_per_image"] = per_image[n]
            f["deviation_from_median"] = dev
            rows.append(
                [
                    n,
                    c.fmt(per_image[n] * 1000 if per_image[n] else None, ".1f"),
                    c.fmt(dev * 100 if dev is not None else None, "+.1f"),
                    c.fmt(1000 / f["in_call_ips"] if f["in_call_ips"] else None, ".1f"),
                    c.fmt(f["busy"], ".0%"),
                    c.fmt(f["wall"] * 1000 / f["images"], ".1f"),
                    c.fmt(f["pre_render"], ".2f"),
                    f["blocks"],
                ]
            )
        c.table(
            [
                "items",
                "steady ms/img",
                "vs median %",
                "in-call ms/img",
                "busy",
                "e2e ms/img",
                "pre-render s",
                "blocks",
            ],
            rows,
        )
        spread = max(
            (
                abs(f["deviation_from_median"])
                for f in figures["jobs"].values()
                if f["deviation_from_median"] is not None
            ),
            default=None,
        )
        figures["steady_spread"] = spread
        print(
            f"   steady-state spread vs median: ±{c.fmt(spread * 100 if spread is not None else None, '.1f')} % "
            f"(goal ±10 %: {c.verdict(spread, 0.10, higher_is_better=False)}); "
            "e2e ms/img includes actor start-up and model load, so it falls as jobs grow.\n"
            "   busy = share of each actor's steady window spent inside pipeline calls."
        )

    # 2. Planning a big manifest, in a fresh process (its peak RSS is the figure).
    manifest = work / "plan-manifest.parquet"
    t = c.timer()
    write_big_manifest(manifest, args.rows)
    spec = c.spec_dict(
        "plan", manifest, work / "plan-out", models, size=512, steps=25, batch_size=args.batch
    )
    print(f"   planning: wrote a {args.rows:,}-row manifest in {t():.1f} s", flush=True)
    plan = c.run_child(
        [
            str(Path(__file__).resolve()),
            "--plan-spec",
            json.dumps(spec),
            "--actors",
            str(args.actors),
        ],
        timeout=3600,
    )
    figures["planning"] = {k: v for k, v in plan.items() if k != "spawned_at"}
    total = plan["validate_s"] + plan["plan_s"]
    c.table(
        ["rows", "validate s", "plan s", "µs/row", "blocks", "Arrow MiB", "RSS base", "RSS peak"],
        [
            [
                f"{plan['rows']:,}",
                plan["validate_s"],
                plan["plan_s"],
                c.fmt(total / plan["rows"] * 1e6, ".1f"),
                f"{plan['blocks']:,} × {plan['block_rows']}",
                c.fmt(plan["arrow_mib"], ".0f"),
                c.fmt(plan["baseline_mib"], ".0f") + " MiB",
                c.fmt(plan["peak_mib"], ".0f") + " MiB",
            ]
        ],
    )
    print(
        f"   driver peak RSS {plan['peak_mib']:.0f} MiB for {plan['rows']:,} rows (goal ≤ 1024 MiB "
        f"for 10⁶ rows: {c.verdict(plan['peak_mib'], 1024, higher_is_better=False)}"
        f"{'' if plan['rows'] >= 1_000_000 else '; fewer rows here, not the goal size'}); "
        f"after validation alone {plan['after_validate_mib']:.0f} MiB (VmHWM; ru_maxrss says "
        f"{plan['ru_maxrss_mib']:.0f} MiB, carried over from this process at fork). Arrow MiB = "
        "the planned blocks' total size, which run_job puts in Ray's object store, not the "
        "driver's RSS."
    )
    if args.quick:
        print("   (quick mode: tiny jobs and a small manifest; not a result)")
    c.emit(BENCH, args.quick, config, figures)


if __name__ == "__main__":
    sys.exit(main())

"""Scaling with work: time per image for growing jobs; planning memory.

    .venv/bin/python benchmarks/bench_scaling.py [--quick] [--counts 64,512,4096] [--rows 1000000]

1. The same job shape (64×64, 2 DDIM steps, batch 4, 2 actors × 1 thread) with 64, 512
   and 4,096 items, one after the other on one local Ray (a small warm-up job first).
   Per job: steady-state seconds per image (from the metadata and Ray's timeline, see
   _steady.py: every actor's first block left out), in-call seconds per image, and end
   to end (run_job's whole wall time / images, start-up included, so it falls as jobs
   grow; that one is not expected to be flat). The spread: the largest deviation of
   steady-state time per image from the median of the jobs.
2. (The pre-streaming driver path: run_job no longer plans in the driver, see
   bench_stream.py for what a job's driver costs now.)
   Driver memory for planning a 10⁶-row manifest: the manifest is written with pyarrow,
   then a fresh Python process runs only the driver's planning path, as run_job does
   it but without Ray: `validate_manifest`, `plan_items` over the streamed rows,
   `homogeneous_blocks` with run_job's block size, each block turned into an Arrow
   table (run_job hands those to `ray.put`; here they are dropped). Peak RSS is the
   process's high-water mark (VmHWM; `ru_maxrss` is printed too but a child inherits
   its parent's, see harness.vm_mib), so it includes Python, pyarrow and sdbatch's
   imports (printed as the baseline).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import harness as h

BENCH = "scaling"


def child_plan(args: argparse.Namespace) -> None:
    """The driver's planning path alone (no Ray), in a fresh process; prints CHILD json."""
    import pyarrow as pa

    from sdbatch.manifest import iter_rows, validate_manifest
    from sdbatch.plan import ITEM_SCHEMA, block_rows_for, homogeneous_blocks, plan_items

    baseline = h.vm_mib()
    spec = h.load(args.plan_spec)
    t = h.timer()
    info = validate_manifest(spec.manifest, spec)
    validate_s, after_validate, t = t(), h.vm_mib(), h.timer()
    block_rows = block_rows_for(info.total_items, spec.batch_size, args.actors)
    items = plan_items(iter_rows(spec.manifest, info.columns), spec, set())
    blocks = planned = arrow_bytes = 0
    for block in homogeneous_blocks(items, block_rows):
        table = pa.Table.from_pylist(block, schema=ITEM_SCHEMA)
        blocks += 1
        planned += table.num_rows
        arrow_bytes += table.nbytes
    h.child_report({
        "rows": info.num_rows, "items": planned, "blocks": blocks, "block_rows": block_rows,
        "arrow_mib": arrow_bytes / 2**20, "validate_s": validate_s, "plan_s": t(),
        "baseline_mib": baseline, "after_validate_mib": after_validate,
        "peak_mib": h.vm_mib(), "ru_maxrss_mib": h.ru_maxrss_mib(),
    })  # fmt: skip


def jobs(args: argparse.Namespace, work: Path, models: dict) -> dict:
    """Jobs of growing size on one Ray; their figures and the steady spread."""
    compute = dict(actors=args.actors, threads=args.threads, batch=args.batch)
    h.start_ray()
    h.warm_up(models, work, **compute)
    runs = {}
    for n in args.counts:
        spec = h.job(work / f"scale{n}.yaml", h.manifest(work / f"m{n}.parquet", h.rows(n)),
                     work / f"out-{n}", models, size=args.size, steps=args.steps,
                     **compute)  # fmt: skip
        runs[str(n)] = h.measure(spec)
    h.quiet_ray_shutdown()
    per_image = {n: 1 / f["steady_ips"] if f["steady_ips"] else None for n, f in runs.items()}
    known = [v for v in per_image.values() if v]
    median = statistics.median(known) if known else None
    for n, f in runs.items():
        f["steady_s_per_image"] = per_image[n]
        f["deviation_from_median"] = per_image[n] / median - 1 if per_image[n] and median else None
    h.table(["items", "steady ms/img", "vs median %", "in-call ms/img", "busy", "e2e ms/img",
             "pre-render s", "blocks"],
            [[n, h.fmt(f["steady_s_per_image"] and f["steady_s_per_image"] * 1000, ".1f"),
              h.fmt(f["deviation_from_median"] and f["deviation_from_median"] * 100, "+.1f"),
              h.fmt(1000 / f["in_call_ips"] if f["in_call_ips"] else None, ".1f"),
              h.fmt(f["busy"], ".0%"), h.fmt(f["wall"] * 1000 / f["images"], ".1f"),
              h.fmt(f["pre_render"], ".2f"), f["blocks"]]
             for n, f in runs.items()])  # fmt: skip
    devs = [abs(f["deviation_from_median"]) for f in runs.values()]
    spread = max((d for d in devs if d is not None), default=None)
    print(
        f"   steady-state spread vs median: ±{h.fmt(spread and spread * 100, '.1f')} %; "
        "e2e ms/img includes actor start-up and model load, so it falls as jobs grow.\n"
        "   busy = share of each actor's steady window spent inside pipeline calls."
    )
    return {"jobs": runs, "steady_spread": spread}


def planning(args: argparse.Namespace, work: Path, models: dict) -> dict:
    """Planning a big manifest, in a fresh process (its peak RSS is the figure)."""
    t = h.timer()
    manifest = h.big_manifest(work / "plan-manifest.parquet", args.rows,
                              suffix=", highly detailed")  # fmt: skip
    spec = h.job(work / "plan.yaml", manifest, work / "plan-out", models, size=512, steps=25,
                 batch=args.batch)  # fmt: skip
    print(f"   planning: wrote a {args.rows:,}-row manifest in {t():.1f} s", flush=True)
    plan = h.run_child([__file__, "--plan-spec", str(spec), "--actors", str(args.actors)], 3600)
    plan.pop("spawned_at")
    total = plan["validate_s"] + plan["plan_s"]
    h.table(["rows", "validate s", "plan s", "µs/row", "blocks", "Arrow MiB", "RSS base",
             "RSS peak"],
            [[f"{plan['rows']:,}", plan["validate_s"], plan["plan_s"],
              h.fmt(total / plan["rows"] * 1e6, ".1f"), f"{plan['blocks']:,} × {plan['block_rows']}",
              h.fmt(plan["arrow_mib"], ".0f"), h.fmt(plan["baseline_mib"], ".0f") + " MiB",
              h.fmt(plan["peak_mib"], ".0f") + " MiB"]])  # fmt: skip
    print(
        f"   driver peak RSS {plan['peak_mib']:.0f} MiB for {plan['rows']:,} rows; after "
        f"validation alone {plan['after_validate_mib']:.0f} MiB (VmHWM; ru_maxrss says "
        f"{plan['ru_maxrss_mib']:.0f} MiB, carried over from this process at fork). Arrow MiB = "
        "the planned blocks' total size, which run_job puts in Ray's object store, not the "
        "driver's RSS."
    )
    return plan


def main() -> int:
    p = h.parser(__doc__, size=64, steps=2, actors=2, threads=1, with_items=False,
                 quick_help="16/32/48 items", hidden=["plan-spec"])  # fmt: skip
    p.add_argument("--counts", default="64,512,4096", help="item counts")
    p.add_argument("--rows", type=int, default=1_000_000, help="planning manifest rows")
    p.add_argument("--skip-jobs", action="store_true", help="planning memory only")
    # The quick sizes are this benchmark's own: it is about counts.
    args = h.parse(p, counts="16,32,48", rows=20_000)
    if args.plan_spec:
        return child_plan(args) or 0
    args.counts = [int(n) for n in args.counts.split(",")]
    config = h.job_config(args, counts=args.counts, plan_rows=args.rows)
    h.header("scaling with work: time per image vs job size; planning memory", config)
    work = h.workdir(BENCH)
    models = {"base": h.tiny_models(["base"])["base"]}
    figures = {"jobs": {}} if args.skip_jobs else jobs(args, work, models)
    figures["planning"] = plan = planning(args, work, models)
    headline = {
        "steady s/img spread vs median": figures.get("steady_spread"),
        f"planning peak RSS MiB ({plan['rows']:,} rows)": plan["peak_mib"],
        "planning wall s (validate + plan)": plan["validate_s"] + plan["plan_s"],
    }
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

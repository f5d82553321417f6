"""Resume cost: a run that resumes after 50 % vs the full run.

    .venv/bin/python benchmarks/bench_resume.py [--quick] [--items 512] [--fraction 0.5]

On one local Ray, after a small warm-up job:

1. full: the whole manifest into an empty output.
2. half state: the first 50 % of the manifest's rows (a second manifest holding just
   those rows) into another output: its committed metadata parts, images and job.yaml
   are exactly what an interrupted run leaves once half the items are committed, without
   depending on where a kill lands between commits. (Deleting half of a finished run's
   metadata parts would do the same, but parts are cut by commit_rows/commit_seconds,
   not at 50 %.) Every item costs the same (same size, steps, scheduler), so the
   remaining half is half the render work.
3. resume: the full manifest into that output; sdbatch skips the committed half.

Reported: wall of run_job for the full run and for the resume (both with Ray already
up; both pay actor start-up and model loading), their ratio, and the same with Ray's
start-up (measured once, when this process started it) added to both, as each `sdbatch
run` pays it. The resume's planning cost on its own: its time before rendering (run_job's
checks, the done-set scan, planning; until on_start) next to the full run's, and,
measured separately on the half state with the driver's functions, the done-set scan
(`done_items`: listing images/ and reading metadata parts) and planning the remaining
items into Arrow blocks.

Also checked: the resumed output holds every item exactly once, and its images are
byte-identical to the full run's (same seeds, batch size and threads).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import harness as h

BENCH = "resume"


def plan_cost(spec: Any) -> dict:
    """The resume's driver-side planning, timed step by step (no Ray)."""
    import pyarrow as pa

    from sdbatch.manifest import iter_rows, validate_manifest
    from sdbatch.output import done_items
    from sdbatch.plan import ITEM_SCHEMA, block_rows_for, homogeneous_blocks, plan_items
    from sdbatch.store import open_store

    t = h.timer()
    info = validate_manifest(spec.manifest, spec)
    validate, t = t(), h.timer()
    done = done_items(open_store(spec.output))
    scan, t = t(), h.timer()
    remaining = max(1, info.total_items - len(done))
    block_rows = block_rows_for(remaining, spec.batch_size, spec.compute.actors)
    items = plan_items(iter_rows(spec.manifest, info.columns), spec, done)
    blocks = homogeneous_blocks(items, block_rows)
    planned = sum(pa.Table.from_pylist(b, schema=ITEM_SCHEMA).num_rows for b in blocks)
    return {"validate_s": validate, "done_scan_s": scan, "plan_s": t(), "done": len(done),
            "planned": planned}  # fmt: skip


def run_jobs(args: argparse.Namespace, work: Path, half_rows: int) -> dict[str, Any]:
    """Ray once (its start-up measured), a warm-up job, then full / half / resume."""
    models = {"base": h.tiny_models(["base"])["base"]}
    rows = h.rows(args.items)
    shape = dict(size=args.size, steps=args.steps, batch=args.batch, actors=args.actors,
                 threads=args.threads)  # fmt: skip
    jobs = {
        "full": h.job(work / "full.yaml", h.manifest(work / "full.parquet", rows),
                      work / "full", models, **shape),
        "half": h.job(work / "half.yaml", h.manifest(work / "half.parquet", rows[:half_rows]),
                      work / "resumed", models, **shape),
        "resume": h.job(work / "resume.yaml", work / "full.parquet", work / "resumed", models,
                        **shape),
    }  # fmt: skip
    runs: dict[str, Any] = {"ray_start": h.start_ray()}
    h.warm_up(models, work, actors=args.actors, threads=args.threads)
    runs["full"] = h.run_timed(h.load(jobs["full"]))
    runs["half"] = h.run_timed(h.load(jobs["half"]))
    runs["planning"] = plan_cost(h.load(jobs["resume"]))
    runs["resume"] = h.run_timed(h.load(jobs["resume"]))
    h.quiet_ray_shutdown()
    r = runs["resume"]["result"]
    assert r.skipped == half_rows and r.done == args.items - half_rows, r
    return runs


def checks(work: Path, items: int) -> dict[str, bool]:
    """Every item once, and the same bytes as the uninterrupted run."""
    full, resumed = h.metadata(work / "full"), h.metadata(work / "resumed")
    keys = list(zip(resumed["id"], resumed["image_index"], strict=True))
    identical = dict(zip(full["id"], full["sha256"], strict=True)) == dict(
        zip(resumed["id"], resumed["sha256"], strict=True)
    )
    return {"exactly_once": len(keys) == len(set(keys)) == items, "identical_to_full": identical}


def report(args: argparse.Namespace, runs: dict[str, Any], half_rows: int) -> dict:
    ray_start, planning = runs["ray_start"], runs["planning"]
    full, half, resume = runs["full"], runs["half"], runs["resume"]
    fw, rw = full["wall"], resume["wall"]
    figures = {
        "ray_start": ray_start, "full_wall": fw, "half_wall": half["wall"], "resume_wall": rw,
        "resume_ratio": rw / fw, "resume_ratio_with_ray_start": (rw + ray_start) / (fw + ray_start),
        "full_pre_render": full.get("pre_render"), "resume_pre_render": resume.get("pre_render"),
        "full_first_image": full.get("first_image"),
        "resume_first_image": resume.get("first_image"), "resume_planning": planning,
    }  # fmt: skip
    rendered = {"full": args.items, "half": half_rows, "resume": args.items - half_rows}
    labels = {"half": f"first {args.fraction:.0%} (makes the state)"}
    h.table(["run", "items rendered", "wall s", "wall + Ray start s", "before rendering s",
             "first image s", "× full"],
            [[labels.get(k, k), rendered[k], runs[k]["wall"], runs[k]["wall"] + ray_start,
              runs[k].get("pre_render"), runs[k].get("first_image"), runs[k]["wall"] / fw]
             for k in rendered])  # fmt: skip
    print(
        f"   resume after {args.fraction:.0%}: {rw / fw:.1%} of the full run's wall; with "
        f"Ray's start-up ({ray_start:.1f} s) in both, as each `sdbatch run` pays it: "
        f"{figures['resume_ratio_with_ray_start']:.1%}\n"
        f"   resume planning, measured on the half state: validate manifest "
        f"{planning['validate_s']:.2f} s, done-set scan {planning['done_scan_s']:.2f} s "
        f"({planning['done']} items done), plan {planning['planned']} remaining items "
        f"{planning['plan_s']:.2f} s; in the run, before rendering: "
        f"{h.fmt(resume.get('pre_render'))} s (full run: {h.fmt(full.get('pre_render'))} s)\n"
        "   The fixed part (actor start-up, model load, last block's write, commit) is paid "
        "by both runs, so the ratio sits above the 50 % of the work by about fixed / full."
    )
    return figures


def main() -> int:
    p = h.parser(__doc__, items=512, actors=2, threads=1)
    p.add_argument("--fraction", type=float, default=0.5, help="share done before resume")
    args = h.parse(p, **h.QUICK)
    half_rows = int(args.items * args.fraction)
    config = h.job_config(args, done_before_resume=half_rows)
    h.header("resume after a partial run vs the full run", config)
    work = h.workdir(BENCH)
    runs = run_jobs(args, work, half_rows)
    figures = {**report(args, runs, half_rows), **checks(work, args.items)}
    print(f"   every item exactly once: {figures['exactly_once']}; images byte-identical to "
          f"the full run's: {figures['identical_to_full']}")  # fmt: skip
    planning = figures["resume_planning"]
    headline = {
        f"resume after {args.fraction:.0%} ÷ full run (wall)": figures["resume_ratio"],
        "same, Ray start-up in both": figures["resume_ratio_with_ray_start"],
        "resume planning s (scan + plan)": planning["done_scan_s"] + planning["plan_s"],
        "exactly once, identical bytes": f"{figures['exactly_once']}, "
        f"{figures['identical_to_full']}",
    }
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

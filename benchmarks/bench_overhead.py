"""Overhead: sdbatch end to end vs a hand-written diffusers loop.

    .venv/bin/python benchmarks/bench_overhead.py [--quick] [--items N | --target-seconds 120]
        [--family sd|sdxl|sd-real] [--shapes 1x2,2x1]

`--family sdxl` runs the tiny SDXL base instead of the tiny SD 1.x model; the loop is then
a `StableDiffusionXLPipeline` loop (no negative prompt, as a plain script writes it).
`--family sd-real` runs SD 1.5's real architecture with random weights (`_real.py`, 860 M
UNet parameters); e.g. `--items 16 --size 256 --steps 4 --batch 4`.

The same items (same prompts, seeds, size, steps, DDIM, CFG 7.5, batch size) are
rendered three times, each in a fresh Python process so every contender pays its own
start-up (_loop.py):

- loop: `StableDiffusionPipeline.from_pretrained` + `torch.set_num_threads(2)`, then
  pipeline calls of `--batch` images with one CPU generator per image, each image saved
  as PNG (what a hand-written script does).
- sdbatch 1×2: `run_job` with 1 render actor × 2 torch threads (same total threads).
- sdbatch 2×1: 2 render actors × 1 thread each. Not the same shape as the loop (two
  processes instead of two threads in one); reported on its own line against the same
  2-thread loop.

Figures (the goals are in benchmarks/RESULTS.md):
(a) steady-state img/s. Loop: images after the first (warm-up) call over the time of
    those calls, PNG saves included. sdbatch: from its metadata (_steady.py). Ratio
    sdbatch / loop.
(b) end to end: process spawn → last image stored (sdbatch: `run_job` returned, Ray
    start, weight hashing, planning, actor start-up and model load included; loop:
    imports and model load included). Ratio loop time / sdbatch time. Without --items,
    the item count is calibrated so the loop takes about --target-seconds.

As a check that both render the same work, a few sdbatch 1×2 images are compared with
the loop's pixel by pixel (same seed, batch size and threads → identical bits on CPU).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import _loop as lp
import harness as h

BENCH = "overhead"
ME = str(Path(__file__).resolve())
VARIANTS = {"sd": "base", "sdxl": "sdxl", "sd-real": "sd15-real"}  # --family → model
READ = (
    "   Read: 1x2 is the apples-to-apples pair (one process, the same threads). 2x1 "
    "runs two single-thread processes; any gain over the loop there comes from "
    "process-level parallelism the loop does not use, not from sdbatch being cheaper.\n"
    "   e2e ratio = loop time / sdbatch time (= sdbatch img/s / loop img/s on the same items).\n"
    "   A multi-thread actor shares the cores with sdbatch's write tasks, driver and raylet, "
    "which the loop does not; GNU OpenMP's spinning makes that costly. Compare a run under "
    "OMP_WAIT_POLICY=PASSIVE (benchmarks/RESULTS.md, Reproduce)."
)


def child_loop(args: argparse.Namespace) -> None:
    """The hand-written loop, as a user would write it; reports its own timings."""
    imported = time.time()
    rows = lp.read_rows(args.manifest)
    pipe = lp.pipeline(args.model, args.family, args.threads)
    loaded = time.time()
    times = lp.timed_calls([rows], lambda chunk: lp.call(pipe, chunk, args), args)
    h.child_report({"imported": imported, "loaded": loaded, "done": time.time(),
                    "images": len(rows), **times})  # fmt: skip


def models_for(family: str) -> dict[str, Path]:
    if family == "sd-real":  # SD 1.5's architecture, random weights (_real.py)
        from _real import sd15

        return {"sd15-real": sd15()}
    return h.tiny_models([VARIANTS[family]])


def calibrate(args: argparse.Namespace, model: Path, work: Path) -> float:
    """Set --items so the loop runs about --target-seconds; the loop's s/image."""
    probe = h.manifest(work / "probe.parquet", h.rows(4 * args.batch))
    report = lp.run_loop(ME, args, model, probe, work / "probe", "--family", args.family)
    per_image = 1 / lp.loop_figures(report, args.batch)["steady_ips"]
    unit = 4 * args.batch
    args.items = max(unit, math.ceil(args.target_seconds / per_image / unit) * unit)
    return per_image


def contenders(args: argparse.Namespace, model: Path, work: Path) -> dict[str, dict]:
    """The loop and each sdbatch shape on the same manifest, one process each."""
    manifest = h.manifest(work / "manifest.parquet", h.rows(args.items))
    report = lp.run_loop(ME, args, model, manifest, work / "loop", "--family", args.family)
    runs = {"loop": lp.loop_figures(report, args.batch)}
    known = {"1x2": (1, args.threads), "2x1": (2, max(1, args.threads // 2))}
    for shape in args.shapes.split(","):
        actors, threads = known[shape]
        spec = h.job(work / f"sdbatch-{shape}.yaml", manifest, work / f"sdbatch-{shape}",
                     {"base": model}, size=args.size, steps=args.steps, batch=args.batch,
                     actors=actors, threads=threads)  # fmt: skip
        runs[f"sdbatch {shape}"] = lp.run_sdbatch(ME, spec)
    return runs


def report(args: argparse.Namespace, runs: dict[str, dict]) -> dict:
    loop = runs["loop"]
    rows = [[f"loop (1 process x {args.threads} threads)", loop["steady_ips"],
             loop["in_call_ips"], loop["e2e"], args.items / loop["e2e"], "-", "-"]]  # fmt: skip
    figures: dict = {"loop": loop}
    for label, r in runs.items():
        if label == "loop":
            continue
        r["steady_ratio"] = h.ratio(r["steady_ips"], loop["steady_ips"])
        r["e2e_ratio"] = h.ratio(loop["e2e"], r["e2e"])
        figures[label.replace(" ", "_")] = r
        rows.append([label, r["steady_ips"], r["in_call_ips"], r["e2e"], args.items / r["e2e"],
                     r["steady_ratio"], r["e2e_ratio"]])  # fmt: skip
    h.table(["contender", "steady img/s", "in-call img/s", "e2e s", "e2e img/s", "steady ratio",
             "e2e ratio"], rows)  # fmt: skip
    for label, r in runs.items():
        if label == "loop":
            continue
        print(
            f"   {label}: Ray start {r['ray_start']:.1f} s, before rendering (checks, hashing, "
            f"plan) {r['pre_render']:.1f} s, first image after {r['first_image']:.1f} s of "
            f"run_job; actors inside pipeline calls {h.fmt(r['busy'], '.0%')} of their steady "
            f"window ({r['steady_source']}); {r['blocks']} blocks"
        )
    print(f"   loop: start + imports + model load {loop['start_and_load']:.1f} s")
    return figures


def main() -> int:
    p = h.parser(__doc__, items=None, threads=2, hidden=lp.CHILD_OPTIONS)  # items: calibrated
    p.add_argument("--target-seconds", type=float, default=120.0)
    p.add_argument("--family", choices=sorted(VARIANTS), default="sd")
    p.add_argument("--shapes", default="1x2,2x1", help="sdbatch actors x threads to run")
    args = h.parse(p, **h.QUICK)
    if args.child == "loop":
        return child_loop(args) or 0
    if args.child == "sdbatch":
        return lp.sdbatch_child(args) or 0

    # 1. Model, and the item count that makes the loop run about --target-seconds.
    bench = BENCH if args.family == "sd" else f"{BENCH}_{args.family}"
    variant = VARIANTS[args.family]
    model = models_for(args.family)[variant]
    work = h.workdir(bench)
    per_image = calibrate(args, model, work) if args.items is None else None
    name = variant if args.family == "sd-real" else f"tiny {variant}"
    config = h.job_config(args, model=name)
    h.header(f"{bench}: sdbatch vs a hand-written diffusers loop", config)
    if per_image:
        print(f"   calibrated: loop ≈ {per_image * 1000:.0f} ms/image → {args.items} items "
              f"for ~{args.target_seconds:.0f} s\n", flush=True)  # fmt: skip

    # 2. The contenders, one at a time; 3. same work? (1 × N threads = the N-thread loop).
    runs = contenders(args, model, work)
    check = [r["id"] for r in h.rows(2 * args.batch)][: args.items]
    pair = "sdbatch 1x2" in runs
    max_diff = lp.same_pixels(work / "loop", work / "sdbatch-1x2", check) if pair else None

    # 4. Report.
    figures = {**report(args, runs), "pixel_max_diff_1x2_vs_loop": max_diff}
    print(f"   same work: largest pixel difference sdbatch 1x2 vs loop over {len(check)} "
          f"images = {max_diff} (0 = identical bits)\n{READ}")  # fmt: skip
    headline = {"pixel max diff 1x2 vs loop": max_diff}
    for label in runs:
        if label != "loop":
            headline[f"{label} steady img/s ÷ loop"] = runs[label]["steady_ratio"]
            headline[f"{label} end-to-end ÷ loop"] = runs[label]["e2e_ratio"]
    return h.finish(bench, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

"""Mixed modes: one manifest mixing all four modes vs single-mode manifests.

    .venv/bin/python benchmarks/bench_modes.py [--quick] [--items 256] [--strength 0.75]

Five jobs of the same size, steps, scheduler and batch size, on one local Ray after a
small warm-up job: a mixed manifest (txt2img, img2img, inpaint, depth2img in equal
shares, rows interleaved) and one single-mode manifest per mode. Inputs are made here
with numpy/PIL (a gradient init image, a square mask; depth2img estimates its depth
with the tiny DPT); models are the tiny base, inpaint and depth pipelines.

The modes do not cost the same: img2img, inpaint and depth2img run int(strength ×
steps) denoising steps plus a VAE encode, inpaint's UNet takes 9 channels, depth2img's
5 plus a depth estimate, and their inputs go through the CPU prepare stage. So:

- apples to apples: mixed img/s vs the img/s the single-mode runs predict for the
  same mix, harmonically: items / Σ (items of mode m / img/s of mode m alone), using
  the mixed run's own per-mode counts. A ratio below 1 is what mixing costs (pipelines
  switching between blocks, more partial blocks, three models per actor).
- for reference: mixed vs the txt2img-only img/s; it mostly measures how much cheaper
  or dearer the other modes are.

Both with steady-state rates (metadata + Ray timeline, see _steady.py) and end to end
(run_job's wall). The end-to-end prediction is the mean of the four single runs' walls
(each holds one start-up and N items of its mode; the mix holds N/4 of each); the
mixed job's actors load three pipelines, a single-mode job's one, which shows here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import harness as h
from _steady import after_first_block

BENCH = "modes"
MODES = ("txt2img", "img2img", "inpaint", "depth2img")


def rows_for(modes: list[str], n: int) -> list[dict]:
    """n rows cycling through `modes` (equal shares when n is a multiple of len(modes))."""
    rows = h.rows(n)
    for i, row in enumerate(rows):
        row["mode"] = modes[i % len(modes)]
        # Only set where used: a column of nulls alone would have no string type.
        if row["mode"] != "txt2img":
            row["init_image"] = "inputs/init.png"
        if row["mode"] == "inpaint":
            row["mask_image"] = "inputs/mask.png"
    return rows


def run_jobs(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Warm-up, then the mixed job and one job per mode, all on this process's Ray."""
    models = h.tiny_models(["base", "inpaint", "depth"])
    h.init_and_mask(work / "inputs", args.size)
    compute = dict(actors=args.actors, threads=args.threads)
    h.start_ray()
    h.warm_up({"base": models["base"]}, work, **compute)
    runs: dict[str, dict] = {}
    for label, modes in [("mixed", list(MODES))] + [(m, [m]) for m in MODES]:
        manifest = h.manifest(work / f"{label}.parquet", rows_for(modes, args.items))
        spec = h.job(work / f"{label}.yaml", manifest, work / f"out-{label}", models,
                     size=args.size, steps=args.steps, batch=args.batch,
                     defaults={"strength": args.strength}, **compute)  # fmt: skip
        runs[label] = h.measure(spec)
        later = after_first_block(h.metadata(work / f"out-{label}"))
        by_mode = later.groupby("mode")["render_seconds"].mean().mul(1000)
        runs[label]["in_call_ms_by_mode"] = by_mode.to_dict()
    h.quiet_ray_shutdown()
    return runs


def predictions(args: argparse.Namespace, runs: dict[str, dict]) -> dict:
    """What the single-mode runs predict for the mix the mixed run measured."""
    mixed, t2i = runs["mixed"], runs["txt2img"]
    counts = mixed["counted_by_mode"] or {m: args.items // 4 for m in MODES}
    steady = None
    if all(runs[m]["steady_ips"] for m in counts):
        steady = sum(counts.values()) / sum(n / runs[m]["steady_ips"] for m, n in counts.items())
    # Each single run renders N items of its mode in its wall (start-up included); the
    # mix holds N/4 of each, so the predicted wall is the mean of the four walls.
    wall = sum(runs[m]["wall"] for m in MODES) / len(MODES)
    return {
        "runs": runs,
        "expected_steady_ips": steady,
        "expected_wall": wall,
        "expected_e2e_ips": args.items / wall,
        "steady_vs_expected": h.ratio(mixed["steady_ips"], steady),
        "e2e_vs_expected": h.ratio(mixed["e2e_ips"], args.items / wall),
        "steady_vs_txt2img": h.ratio(mixed["steady_ips"], t2i["steady_ips"]),
        "e2e_vs_txt2img": h.ratio(mixed["e2e_ips"], t2i["e2e_ips"]),
    }


def report(args: argparse.Namespace, f: dict) -> None:
    t2i = f["runs"]["txt2img"]["steady_ips"]
    rows = [[label, r["steady_ips"], r["in_call_ips"], h.fmt(r["busy"], ".0%"), r["wall"],
             r["e2e_ips"], h.ratio(r["steady_ips"], t2i),
             " ".join(f"{m[:3]}={v:.0f}" for m, v in sorted(r["in_call_ms_by_mode"].items()))]
            for label, r in f["runs"].items()]  # fmt: skip
    rows.append(["expected mix (from singles)", f["expected_steady_ips"], "-", "-",
                 f["expected_wall"], f["expected_e2e_ips"],
                 h.ratio(f["expected_steady_ips"], t2i), ""])  # fmt: skip
    h.table(["job", "steady img/s", "in-call img/s", "busy", "e2e s", "e2e img/s",
             "steady ×txt2img", "in-call ms/img by mode"], rows)  # fmt: skip
    print(
        f"   apples to apples — mixed vs the mix predicted by the single-mode runs: steady "
        f"{h.fmt(f['steady_vs_expected'])}×, end to end {h.fmt(f['e2e_vs_expected'])}×\n"
        f"   literal reading — mixed vs txt2img-only: steady "
        f"{h.fmt(f['steady_vs_txt2img'])}×, end to end {h.fmt(f['e2e_vs_txt2img'])}×; not "
        f"apples to apples: the other modes run int({args.strength:g} × {args.steps}) = "
        f"{int(args.strength * args.steps)} denoising steps plus a VAE encode, different "
        "UNets, a depth estimate and a prepare stage, so this ratio says how much cheaper or "
        "dearer they are, not what mixing costs.\n"
        "   The mixed job's actors load three pipelines (base+img2img shared, inpaint, "
        "depth); each single-mode job loads one: that start-up difference is in e2e only."
    )


def main() -> int:
    p = h.parser(__doc__, actors=2, threads=1)
    p.add_argument("--strength", type=float, default=0.75)
    args = h.parse(p, **h.QUICK)
    args.items -= args.items % len(MODES)  # items per job: the mixed one has ¼ of each
    config = h.job_config(args, strength=args.strength)
    h.header("mixed modes vs single-mode manifests", config)
    figures = predictions(args, run_jobs(args, h.workdir(BENCH)))
    report(args, figures)
    headline = {
        "mixed ÷ predicted mix, steady": figures["steady_vs_expected"],
        "mixed ÷ predicted mix, end to end": figures["e2e_vs_expected"],
        "mixed ÷ txt2img-only, steady (not like for like)": figures["steady_vs_txt2img"],
    }
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

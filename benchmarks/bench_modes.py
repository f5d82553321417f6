"""Mixed modes (issue 3): one manifest mixing all four modes vs single-mode manifests.

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
  switching between blocks, more partial blocks, three models per actor). Goal ≥ 0.9.
- for reference: mixed vs the txt2img-only img/s, which is what the issue literally
  names; it mostly measures how much cheaper or dearer the other modes are.

Both with steady-state rates (metadata + Ray timeline, see _common.py) and end to end
(run_job's wall). The end-to-end prediction is the mean of the four single runs' walls
(each holds one start-up and N items of its mode; the mix holds N/4 of each); the
mixed job's actors load three pipelines, a single-mode job's one, which shows here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import _common as c

BENCH = "modes"
MODES = ("txt2img", "img2img", "inpaint", "depth2img")


def make_inputs(folder: Path, size: int) -> None:
    """An init image with structure (not noise) and a square mask, as PNG files."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    scale = 256 / size
    init = np.stack([xx * scale, yy * scale, (xx + yy) * scale / 2], axis=-1).astype(np.uint8)
    Image.fromarray(init).save(folder / "init.png")
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    Image.fromarray(mask).save(folder / "mask.png")


def rows_for(modes: list[str], n: int) -> list[dict]:
    """n rows cycling through `modes` (equal shares when n is a multiple of len(modes))."""
    rows = c.prompt_rows(n)
    for i, row in enumerate(rows):
        mode = modes[i % len(modes)]
        row["mode"] = mode
        # Only set where used: a column of nulls alone would have no string type.
        if mode != "txt2img":
            row["init_image"] = "inputs/init.png"
        if mode == "inpaint":
            row["mask_image"] = "inputs/mask.png"
    return rows


def main() -> None:
    parser = c.job_parser(__doc__, actors=2, threads=1)
    parser.add_argument("--strength", type=float, default=0.75)
    args = c.apply_quick(parser.parse_args())
    args.items -= args.items % len(MODES)  # items per job: the mixed one has ¼ of each
    config = c.job_config(args, strength=args.strength)
    c.header("mixed modes vs single-mode manifests", config)
    work = c.workdir(BENCH)
    models = c.tiny_models(["base", "inpaint", "depth"])
    make_inputs(work / "inputs", args.size)
    shape = dict(
        size=args.size,
        steps=args.steps,
        batch_size=args.batch,
        actors=args.actors,
        threads=args.threads,
        defaults={"strength": args.strength},
    )

    # 1. Warm-up, then the mixed job and one job per mode, all on this process's Ray.
    c.start_ray()
    c.warm_up({"base": models["base"]}, work, actors=args.actors, threads=args.threads)
    runs: dict[str, dict] = {}
    for label, modes in [("mixed", list(MODES))] + [(m, [m]) for m in MODES]:
        manifest = c.write_manifest(work / f"{label}.parquet", rows_for(modes, args.items))
        output = work / f"out-{label}"
        spec = c.make_spec(label, manifest, output, models, **shape)
        runs[label] = c.job_figures(c.run_timed(spec), output)
        meta = c.metadata(output)
        later = c.after_first_block(meta)
        runs[label]["in_call_ms_by_mode"] = (
            later.groupby("mode")["render_seconds"].mean().mul(1000).to_dict()
        )
    c.quiet_ray_shutdown()

    # 2. Predictions from the single-mode runs, for the mix the mixed run measured.
    mixed = runs["mixed"]
    counts = mixed["counted_by_mode"] or {m: args.items // 4 for m in MODES}
    singles = {m: runs[m] for m in MODES}
    if all(singles[m]["steady_ips"] for m in counts):
        expected_steady = sum(counts.values()) / sum(
            n / singles[m]["steady_ips"] for m, n in counts.items()
        )
    else:
        expected_steady = None
    # Each single run renders N items of its mode in its wall (start-up included); the
    # mix holds N/4 of each, so the predicted wall is the mean of the four walls.
    expected_wall = sum(singles[m]["wall"] for m in MODES) / len(MODES)
    expected_e2e = args.items / expected_wall
    t2i = runs["txt2img"]
    figures = {
        "runs": runs,
        "expected_steady_ips": expected_steady,
        "expected_e2e_ips": expected_e2e,
        "steady_vs_expected": c.ratio(mixed["steady_ips"], expected_steady),
        "e2e_vs_expected": c.ratio(mixed["e2e_ips"], expected_e2e),
        "steady_vs_txt2img": c.ratio(mixed["steady_ips"], t2i["steady_ips"]),
        "e2e_vs_txt2img": c.ratio(mixed["e2e_ips"], t2i["e2e_ips"]),
    }

    # 3. Report.
    rows = []
    for label, r in runs.items():
        rows.append(
            [
                label,
                r["steady_ips"],
                r["in_call_ips"],
                c.fmt(r["busy"], ".0%"),
                r["wall"],
                r["e2e_ips"],
                c.ratio(r["steady_ips"], t2i["steady_ips"]),
                " ".join(f"{m[:3]}={v:.0f}" for m, v in sorted(r["in_call_ms_by_mode"].items())),
            ]
        )
    rows.append(
        [
            "expected mix (from singles)",
            expected_steady,
            "-",
            "-",
            expected_wall,
            expected_e2e,
            c.ratio(expected_steady, t2i["steady_ips"]),
            "",
        ]
    )
    c.table(
        [
            "job",
            "steady img/s",
            "in-call img/s",
            "busy",
            "e2e s",
            "e2e img/s",
            "steady ×txt2img",
            "in-call ms/img by mode",
        ],
        rows,
    )
    sv, ev = figures["steady_vs_expected"], figures["e2e_vs_expected"]
    print(
        f"   apples to apples — mixed vs the mix predicted by the single-mode runs: steady "
        f"{c.fmt(sv)}× (goal ≥ 0.9: {c.verdict(sv, 0.9)}), end to end {c.fmt(ev)}×\n"
        f"   literal reading — mixed vs txt2img-only: steady "
        f"{c.fmt(figures['steady_vs_txt2img'])}×, end to end "
        f"{c.fmt(figures['e2e_vs_txt2img'])}×; not apples to apples: the other modes run "
        f"int({args.strength:g} × {args.steps}) = {int(args.strength * args.steps)} denoising "
        "steps plus a VAE encode, different UNets, a depth estimate and a prepare stage, so "
        "this ratio says how much cheaper or dearer they are, not what mixing costs.\n"
        "   The mixed job's actors load three pipelines (base+img2img shared, inpaint, "
        "depth); each single-mode job loads one: that start-up difference is in e2e only."
    )
    if args.quick:
        print("   (quick mode: seconds of work per run, start-up dominates; not a result)")
    c.emit(BENCH, args.quick, config, figures)


if __name__ == "__main__":
    sys.exit(main())

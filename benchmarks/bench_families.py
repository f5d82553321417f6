"""Render-actor memory per model family and mode set (issue 12).

    .venv/bin/python benchmarks/bench_families.py [--quick] [--size 64] [--steps 4]

For each configuration below, a fresh Python process does what one render actor does:
builds the `Renderer` (the pipelines of the job's modes, shared modules, the refiner,
the depth ControlNet and estimator where the job uses them), then renders one batch
per mode of planned, prepared items. Its peak RSS (VmHWM, the kernel's high-water mark
of that process) after loading and after rendering is the figure; a real actor adds
Ray's worker process on top (reported once, measured as an idle Ray worker's RSS is
not: ~100-150 MiB on this machine, see RESULTS.md). Load time and the images rendered
are printed beside it, so a configuration that loads a module twice shows up as
memory, not only as a failed assertion in tests/integration/test_sdxl.py.

Tiny random models: the figures compare configurations with each other (what a second
pipeline, a refiner or a ControlNet adds), not real checkpoints' sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _common as c

BENCH = "families"

# label → (models entries by tiny variant, modes in the manifest)
CONFIGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "sd1 txt2img": ({"base": "base"}, ["txt2img"]),
    "sd1 4 modes": (
        {"base": "base", "inpaint": "inpaint", "depth": "depth"},
        ["txt2img", "img2img", "inpaint", "depth2img"],
    ),
    "sd2-v txt2img": ({"base": "sd2-v"}, ["txt2img"]),
    "sdxl txt2img": ({"base": "sdxl"}, ["txt2img"]),
    "sdxl txt2img + refiner": ({"base": "sdxl", "refiner": "sdxl-refiner"}, ["txt2img"]),
    "sdxl 4 modes + refiner": (
        {
            "base": "sdxl",
            "inpaint": "sdxl-inpaint",
            "depth_controlnet": "sdxl-controlnet-depth",
            "depth_estimator": "depth",
            "refiner": "sdxl-refiner",
        },
        ["txt2img", "img2img", "inpaint", "depth2img"],
    ),
}


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def inputs(folder: Path, size: int) -> dict[str, str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    init = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    Image.fromarray(init.astype(np.uint8)).save(folder / "init.png")
    Image.fromarray(mask).save(folder / "mask.png")
    return {"init_image": str(folder / "init.png"), "mask_image": str(folder / "mask.png")}


def child(args: argparse.Namespace) -> None:
    """One actor's work in this process; prints CHILD json."""
    import torch

    from sdbatch.checks import aux_models, models_for
    from sdbatch.manifest import ManifestInfo
    from sdbatch.models import family_of, loaded_modules
    from sdbatch.plan import plan_items
    from sdbatch.prepare import prepare_item
    from sdbatch.render import Renderer

    torch.set_num_threads(args.threads)
    imported_mib = peak_mib()
    entries, modes = CONFIGS[args.config]
    paths = json.loads(args.models)
    work = Path(args.work)
    spec = c.make_spec(
        "families",
        work / "unused.parquet",
        work / "out",
        {name: paths[variant] for name, variant in entries.items()},
        size=args.size,
        steps=args.steps,
        batch_size=args.batch,
        scheduler="default",
    )
    files = inputs(work / "inputs", args.size)
    rows = []
    for mode in modes:
        for i in range(args.batch):
            row = {"id": f"{mode}-{i}", "prompt": f"{c.SUBJECTS[i % 4]}, {mode}", "mode": mode}
            if mode != "txt2img":
                row.update(init_image=files["init_image"], strength=0.7)
            if mode == "inpaint":
                row["mask_image"] = files["mask_image"]
            rows.append(row)
    info = ManifestInfo("bench", len(rows), len(rows), [], set(modes), "depth2img" in modes)

    started = time.perf_counter()
    renderer = Renderer(
        models=models_for(spec, set(modes)),
        model_hashes={},
        batch_size=args.batch,
        torch_threads=args.threads,
        **aux_models(spec, info),
    )
    load_s = time.perf_counter() - started
    loaded_mib = peak_mib()
    modules = loaded_modules(
        {**renderer.pipes, **{f"r.{m}": p for m, p in renderer.refiners.items()}}
    )

    items = list(plan_items(rows, spec, families=family_of))
    for item in items:
        if item["mode"] != "txt2img":
            prepare_item(item, None)
    started = time.perf_counter()
    ok = 0
    for mode in modes:
        batch = [it for it in items if it["mode"] == mode]
        ok += sum(r["status"] == "ok" for r in renderer.render(batch))
    c.child_report(
        {
            "imported_mib": imported_mib,
            "loaded_mib": loaded_mib,
            "peak_mib": peak_mib(),
            "load_s": load_s,
            "render_s": time.perf_counter() - started,
            "images": ok,
            "planned": len(items),
            "modules": len(modules),
            "distinct_modules": len(set(modules.values())),
        }
    )


def main() -> None:
    parser = c.job_parser(__doc__, size=64, steps=4, threads=1, with_items=False)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    c.apply_quick(args, steps=2)
    vars(args).pop("items", None)  # one batch per mode, not an item count

    variants = sorted({v for entries, _ in CONFIGS.values() for v in entries.values()})
    models = {k: str(v) for k, v in c.tiny_models(variants).items()}
    work = c.workdir(BENCH)
    config = c.job_config(args, configs=list(CONFIGS), scheduler="default")
    c.header("families: render-actor memory per model family and mode set", config)
    me = [str(Path(__file__).resolve()), "--child", "--models", json.dumps(models)]
    me += ["--size", str(args.size), "--steps", str(args.steps), "--batch", str(args.batch)]
    me += ["--threads", str(args.threads)]
    figures: dict = {}
    rows = []
    for label in CONFIGS:
        report = c.run_child(
            [*me, "--config", label, "--work", str(work / label.replace(" ", "_"))], timeout=1800
        )
        figures[label] = {k: v for k, v in report.items() if k != "spawned_at"}
        rows.append(
            [
                label,
                report["imported_mib"],
                report["loaded_mib"],
                report["peak_mib"],
                report["load_s"],
                f"{report['images']}/{report['planned']}",
                f"{report['distinct_modules']}/{report['modules']}",
            ]
        )
    c.table(
        [
            "family / modes",
            "imports MiB",
            "loaded MiB",
            "peak MiB",
            "load s",
            "images",
            "modules (distinct/held)",
        ],
        rows,
    )
    print(
        "   peak = VmHWM after one batch per mode; a render actor adds its Ray worker "
        "process's own memory. modules: torch modules the pipelines reference / distinct "
        "objects (shared VAE, text encoders, UNets counted once)."
    )
    c.emit(BENCH, args.quick, config, figures)


if __name__ == "__main__":
    sys.exit(main())

"""Render-actor memory per model family and mode set.

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

    .venv/bin/python benchmarks/bench_families.py --real --steps 2 [--dtype float16]

does the same with the real architectures (`_real.py`: SD 1.5, and SDXL base, its
inpainting UNet, refiner, a full-size depth ControlNet and a DPT-hybrid estimator; random
weights, built once under benchmarks/out/models, ~26 GB), in fp16 unless --dtype says
otherwise (steps × strength 0.7 must leave a denoising step: --steps 2 at least). The
figure there is the weights the actor holds, summed over the distinct tensor storages of
its modules (what a GPU would hold; bench_real_weights.py counts the same from configs).
RSS says less at real size: weights stored in the job's dtype are used from the mapped
safetensors files (page cache, RssFile), converted ones are the process's own (RssAnon).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness as h

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


# The same configurations at real size (`_real.py`'s folders).
REAL_CONFIGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "sd15 txt2img": ({"base": "sd15-real"}, ["txt2img"]),
    "sdxl txt2img": ({"base": "sdxl-real"}, ["txt2img"]),
    "sdxl txt2img + refiner": ({"base": "sdxl-real", "refiner": "sdxl-refiner-real"}, ["txt2img"]),
    "sdxl 4 modes + refiner": (
        {
            "base": "sdxl-real",
            "inpaint": "sdxl-inpaint-real",
            "depth_controlnet": "sdxl-controlnet-depth-real",
            "depth_estimator": "dpt-hybrid-real",
            "refiner": "sdxl-refiner-real",
        },
        ["txt2img", "img2img", "inpaint", "depth2img"],
    ),
}


def configs(real: bool) -> dict[str, tuple[dict[str, str], list[str]]]:
    return REAL_CONFIGS if real else CONFIGS


def real_models() -> dict[str, str]:
    """Builds what is missing (SDXL's set first: it needs the most free memory)."""
    from _real import sd15, sdxl_set

    return {name: str(path) for name, path in {**sdxl_set(), "sd15-real": sd15()}.items()}


def mode_rows(modes: list[str], batch: int, files: dict[str, str]) -> list[dict]:
    """One batch of rows per mode, with the inputs each mode needs."""
    rows = []
    for mode in modes:
        for i in range(batch):
            row = {"id": f"{mode}-{i}", "prompt": f"{h.SUBJECTS[i % 4]}, {mode}", "mode": mode}
            if mode != "txt2img":
                row.update(init_image=files["init_image"], strength=0.7)
            if mode == "inpaint":
                row["mask_image"] = files["mask_image"]
            rows.append(row)
    return rows


def held_gib(renderer: object) -> float:
    """GiB of distinct tensor storages in the modules a Renderer holds (pipelines, refiners,
    depth estimator): the weights, each shared module and tensor counted once."""
    import torch

    pipes = [*renderer.pipes.values(), *renderer.refiners.values()]  # type: ignore[attr-defined]
    modules = [m for p in pipes for m in p.components.values() if isinstance(m, torch.nn.Module)]
    if renderer.depth_estimator is not None:  # type: ignore[attr-defined]
        modules.append(renderer.depth_estimator[0])  # type: ignore[attr-defined]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for m in modules
        for t in [*m.parameters(), *m.buffers()]
    }
    return sum(storages.values()) / 1024**3


def child(args: argparse.Namespace) -> None:
    """One actor's work in this process; prints CHILD json."""
    import torch

    from sdbatch.checks import aux_models, models_for
    from sdbatch.manifest import ManifestInfo
    from sdbatch.models import family_of, loaded_modules
    from sdbatch.plan import plan_items
    from sdbatch.prepare import prepare_item
    from sdbatch.render import Renderer

    # 1. The spec and one batch of items per mode.
    torch.set_num_threads(args.threads)
    imported_mib = h.vm_mib()
    entries, modes = configs(args.real)[args.config]
    paths, work = json.loads(args.models), Path(args.work)
    spec = h.load(h.job(work / "job.yaml", work / "unused.parquet", work / "out",
                        {name: paths[variant] for name, variant in entries.items()},
                        size=args.size, steps=args.steps, batch=args.batch,
                        scheduler="default", compute={"dtype": args.dtype}))  # fmt: skip
    rows = mode_rows(modes, args.batch, h.init_and_mask(work / "inputs", args.size))
    info = ManifestInfo("bench", len(rows), len(rows), [], set(modes), "depth2img" in modes)

    # 2. What an actor's __init__ does, then one batch per mode.
    t = h.timer()
    renderer = Renderer(models=models_for(spec, set(modes)), model_hashes={},
                        batch_size=args.batch, torch_threads=args.threads, device="cpu",
                        dtype=args.dtype, **aux_models(spec, info))  # fmt: skip
    load_s, loaded_mib, loaded_anon = t(), h.vm_mib(), h.vm_mib("RssAnon")
    modules = loaded_modules(
        {**renderer.pipes, **{f"r.{m}": p for m, p in renderer.refiners.items()}}
    )
    items = list(plan_items(rows, spec, families=family_of))
    for item in items:
        if item["mode"] != "txt2img":
            prepare_item(item, None)
    t = h.timer()
    ok = 0
    for mode in modes:
        batch = [it for it in items if it["mode"] == mode]
        ok += sum(r["status"] == "ok" for r in renderer.render(batch))
    h.child_report({
        "imported_mib": imported_mib, "loaded_mib": loaded_mib, "peak_mib": h.vm_mib(),
        "loaded_anon_mib": loaded_anon, "rendered_anon_mib": h.vm_mib("RssAnon"),
        "held_gib": held_gib(renderer),
        "load_s": load_s, "render_s": t(), "images": ok, "planned": len(items),
        "modules": len(modules), "distinct_modules": len(set(modules.values())),
    })  # fmt: skip


def main() -> int:
    hidden = ["config", "models", "work"]
    p = h.parser(__doc__, size=64, steps=4, threads=1, with_items=False, hidden=hidden)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--real", action="store_true", help="real-size architectures (~26 GB built)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="default: float32 (tiny), float16 (--real)")  # fmt: skip
    args = h.parse(p, size=64, steps=2)
    args.dtype = args.dtype or ("float16" if args.real else "float32")
    if args.child:
        return child(args) or 0

    chosen = configs(args.real)
    if args.real:
        models = real_models()
    else:
        variants = sorted({v for entries, _ in CONFIGS.values() for v in entries.values()})
        models = {k: str(v) for k, v in h.tiny_models(variants).items()}
    work = h.workdir(BENCH)
    config = h.job_config(args, configs=list(chosen), scheduler="default", real=args.real,
                          dtype=args.dtype)  # fmt: skip
    h.header("families: render-actor memory per model family and mode set", config)
    me = [__file__, "--child", "--models", json.dumps(models), "--dtype", args.dtype]
    me += ["--real"] if args.real else []
    me += h.script_args(args, "size", "steps", "batch", "threads")
    figures: dict = {}
    rows = []
    for label in chosen:
        folder = str(work / label.replace(" ", "_"))
        r = h.run_child([*me, "--config", label, "--work", folder], timeout=1800)
        figures[label] = {k: v for k, v in r.items() if k != "spawned_at"}
        rows.append([label, r["held_gib"], r["imported_mib"], r["loaded_mib"], r["peak_mib"],
                     r["loaded_anon_mib"], r["rendered_anon_mib"], r["load_s"],
                     f"{r['images']}/{r['planned']}",
                     f"{r['distinct_modules']}/{r['modules']}"])  # fmt: skip
    h.table(["family / modes", "weights held GiB", "imports MiB", "loaded MiB", "peak MiB", "anon loaded MiB",
             "anon rendered MiB", "load s", "images", "modules (distinct/held)"], rows)  # fmt: skip
    print(
        "   weights held = distinct tensor storages of every module the actor holds (shared "
        "ones once). peak = VmHWM after one batch per mode: it counts the safetensors pages "
        "the process has mapped (weights stored in the job's dtype are used from the page "
        "cache, not copied); anon = RssAnon, what the process allocated. A render actor adds "
        "its Ray worker process's own memory. modules: torch modules the pipelines reference "
        "/ distinct objects (shared VAE, text encoders, UNets counted once)."
    )
    headline = {f"{label} peak RSS MiB": f["peak_mib"] for label, f in figures.items()}
    headline.update({f"{label} weights held GiB": f["held_gib"] for label, f in figures.items()})
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

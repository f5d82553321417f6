"""LoRAs (issue 16): a 4-adapter round-robin manifest, sdbatch vs a hand-written loop.

    .venv/bin/python benchmarks/bench_adapters.py [--quick] [--items N] [--batch B]

Rows cycle through the four tiny SD LoRAs (`<lora:NAME:0.8>` in the prompt, as A1111
prompt lists carry them). Contenders, each in a fresh process, one at a time:

- loop: `StableDiffusionPipeline` + `load_lora_weights` of the four files once, then per
  adapter (the items grouped by adapter, as a careful script does) `set_adapters` and
  pipeline calls of `--batch` images, one CPU generator per image, PNG saved.
- sdbatch 1×T: `run_job`, one render actor × the loop's threads (the same layout).

Figures: steady-state img/s (bench_overhead's definitions; goal sdbatch / loop ≥ 0.9),
and what switching costs per call: `set_adapters` time in the loop, and the loop's
in-call rate with LoRAs active vs the same calls with LoRA disabled (unfused LoRA
layers' own cost, paid by both contenders).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _common as c
import bench_overhead as ov

BENCH = "adapters"
LORAS = ("sd-style", "sd-light", "sd-dark", "sd-ink")
WEIGHT = 0.8


def child_loop(args: argparse.Namespace) -> None:
    """The hand-written loop: adapters loaded once, items grouped by adapter."""
    import pyarrow.parquet as pq
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    imported = time.time()
    torch.set_num_threads(args.threads)
    rows = pq.read_table(args.manifest).to_pylist()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loras = Path(args.model).parent / "loras"
    for name in LORAS:
        pipe.load_lora_weights(
            str(loras / f"{name}.safetensors"), adapter_name=name.replace("-", "_")
        )
    loaded = time.time()
    calls, pipe_only, switches, plain = [], [], [], []

    def render(chunk: list[dict]) -> list:
        with torch.inference_mode():
            return pipe(
                prompt=[r["text"] for r in chunk],
                negative_prompt=[""] * len(chunk),
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                width=args.size,
                height=args.size,
                generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in chunk],
            ).images

    for name in LORAS:
        group = [r for r in rows if r["adapter"] == name]
        for start in range(0, len(group), args.batch):
            chunk = group[start : start + args.batch]
            t0 = time.perf_counter()
            pipe.enable_lora()
            pipe.set_adapters([name.replace("-", "_")], [WEIGHT])
            t1 = time.perf_counter()
            images = render(chunk)
            t2 = time.perf_counter()
            for row, image in zip(chunk, images, strict=True):
                image.save(out / f"{row['id']}.png")
            calls.append(time.perf_counter() - t0)
            pipe_only.append(t2 - t1)
            switches.append(t1 - t0)
    # The LoRA layers' own cost: a few of the same calls with LoRA off.
    pipe.disable_lora()
    for start in range(0, min(len(rows), 3 * args.batch), args.batch):
        t0 = time.perf_counter()
        render(rows[start : start + args.batch])
        plain.append(time.perf_counter() - t0)
    c.child_report(
        {
            "imported": imported,
            "loaded": loaded,
            "done": time.time(),
            "images": len(rows),
            "calls": calls,
            "pipe_only": pipe_only,
            "switch_ms": statistics.median(switches) * 1000,
            "call_with_lora_s": statistics.median(pipe_only[1:] or pipe_only),
            "call_without_lora_s": statistics.median(plain[1:] or plain),
            "threads": torch.get_num_threads(),
        }
    )


def main() -> None:
    parser = c.job_parser(__doc__, items=96, threads=2)
    parser.add_argument("--child", choices=["loop", "sdbatch"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "loop":
        return child_loop(args)
    if args.child == "sdbatch":
        return ov.child_sdbatch(args)
    c.apply_quick(args)

    models = c.tiny_models(["base"])
    work = c.workdir(BENCH)
    me = [str(Path(__file__).resolve())]
    config = c.job_config(args, model="tiny base", loras=len(LORAS))
    c.header(f"{BENCH}: 4 LoRAs round-robin, sdbatch vs a hand-written diffusers loop", config)
    rows = c.prompt_rows(args.items)
    for i, row in enumerate(rows):
        row.update(adapter=LORAS[i % 4], text=row["prompt"])
        row["prompt"] = f"{row['prompt']} <lora:{LORAS[i % 4]}:{WEIGHT}>"
    manifest = c.write_manifest(work / "manifest.parquet", rows)

    common = ["--size", str(args.size), "--steps", str(args.steps), "--batch", str(args.batch)]
    loop = c.run_child(
        me
        + ["--child", "loop", "--model", str(models["base"]), "--manifest", str(manifest)]
        + ["--out", str(work / "loop"), "--threads", str(args.threads)]
        + common,
        timeout=3600,
    )
    lp = ov.loop_figures(loop, args.batch)
    spec = c.spec_dict(
        BENCH,
        manifest,
        work / "sdbatch",
        {"base": models["base"]},
        size=args.size,
        steps=args.steps,
        batch_size=args.batch,
        actors=1,
        threads=args.threads,
    )
    loras_dir = Path(models["base"]).parent / "loras"
    spec["loras"] = {n: str(loras_dir / f"{n}.safetensors") for n in LORAS}
    spec_path = c.write_spec(work / "sdbatch.yaml", spec)
    sb = ov.sdbatch_figures(
        c.run_child(me + ["--child", "sdbatch", "--spec", str(spec_path)], timeout=3600)
    )
    max_diff = ov.same_pixels(work / "loop", work / "sdbatch", [r["id"] for r in rows[:8]])

    ratio = c.ratio(sb["steady_ips"], lp["steady_ips"])
    c.table(
        ["contender", "steady img/s", "in-call img/s", "e2e s", "steady ratio"],
        [
            [
                f"loop (1 x {args.threads} threads)",
                lp["steady_ips"],
                lp["in_call_ips"],
                lp["e2e"],
                "-",
            ],
            [f"sdbatch 1x{args.threads}", sb["steady_ips"], sb["in_call_ips"], sb["e2e"], ratio],
        ],
    )
    lora_cost = c.ratio(loop["call_with_lora_s"], loop["call_without_lora_s"])
    print(
        f"   steady ratio {c.fmt(ratio)} (goal ≥ 0.9: {c.verdict(ratio, 0.9)})\n"
        f"   switching: set_adapters {loop['switch_ms']:.2f} ms per call (median); a call with "
        f"a LoRA active takes {c.fmt(lora_cost)}× the same call with LoRA disabled "
        f"({loop['call_with_lora_s'] * 1000:.0f} vs {loop['call_without_lora_s'] * 1000:.0f} ms)\n"
        f"   same work: largest pixel difference sdbatch vs loop over 8 images = {max_diff}"
    )
    figures = {
        "loop": lp,
        "sdbatch": sb,
        "steady_ratio": ratio,
        "switch_ms": loop["switch_ms"],
        "lora_call_cost_ratio": lora_cost,
        "pixel_max_diff": max_diff,
    }
    c.emit(BENCH, args.quick, config, figures)


if __name__ == "__main__":
    sys.exit(main())

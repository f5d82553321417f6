"""LoRAs: a 4-adapter round-robin manifest, sdbatch vs a hand-written loop.

    .venv/bin/python benchmarks/bench_adapters.py [--quick] [--items N] [--batch B]

Rows cycle through the four tiny SD LoRAs (`<lora:NAME:0.8>` in the prompt, as A1111
prompt lists carry them). Contenders, each in a fresh process, one at a time (_loop.py):

- loop: `StableDiffusionPipeline` + `load_lora_weights` of the four files once, then per
  adapter (the items grouped by adapter, as a careful script does) `set_adapters` and
  pipeline calls of `--batch` images, one CPU generator per image, PNG saved.
- sdbatch 1×T: `run_job`, one render actor × the loop's threads (the same layout).

Figures: steady-state img/s (bench_overhead's definitions) and their ratio, and what
switching costs per call: `set_adapters` time in the loop, and the loop's in-call rate
with LoRAs active vs the same calls with LoRA disabled (unfused LoRA layers' own cost,
paid by both contenders).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _loop as lp
import harness as h

BENCH = "adapters"
ME = str(Path(__file__).resolve())
LORAS = ("sd-style", "sd-light", "sd-dark", "sd-ink")
WEIGHT = 0.8


def child_loop(args: argparse.Namespace) -> None:
    """The hand-written loop: adapters loaded once, items grouped by adapter."""
    imported = time.time()
    rows = lp.read_rows(args.manifest)
    pipe = lp.pipeline(args.model, threads=args.threads)
    for name in LORAS:
        path = Path(args.model).parent / "loras" / f"{name}.safetensors"
        pipe.load_lora_weights(str(path), adapter_name=name.replace("-", "_"))
    loaded = time.time()

    def switch(chunk: list[dict]) -> None:
        pipe.enable_lora()
        pipe.set_adapters([chunk[0]["adapter"].replace("-", "_")], [WEIGHT])

    def render(chunk: list[dict]) -> list:
        return lp.call(pipe, chunk, args, prompt="text")

    groups = [[r for r in rows if r["adapter"] == name] for name in LORAS]
    times = lp.timed_calls(groups, render, args, before=switch)
    # The LoRA layers' own cost: a few of the same calls with LoRA off.
    pipe.disable_lora()
    plain = []
    for start in range(0, min(len(rows), 3 * args.batch), args.batch):
        t = h.timer()
        render(rows[start : start + args.batch])
        plain.append(t())
    pipe_only = times["pipe_only"]
    h.child_report({
        "imported": imported, "loaded": loaded, "done": time.time(), "images": len(rows),
        "calls": times["calls"], "pipe_only": pipe_only,
        "switch_ms": statistics.median(times["before"]) * 1000,
        "call_with_lora_s": statistics.median(pipe_only[1:] or pipe_only),
        "call_without_lora_s": statistics.median(plain[1:] or plain),
    })  # fmt: skip


def main() -> int:
    p = h.parser(__doc__, items=96, threads=2, hidden=lp.CHILD_OPTIONS)
    args = h.parse(p, **h.QUICK)
    if args.child == "loop":
        return child_loop(args) or 0
    if args.child == "sdbatch":
        return lp.sdbatch_child(args) or 0

    # 1. The manifest: rows cycling through the four LoRAs.
    model = h.tiny_models(["base"])["base"]
    work = h.workdir(BENCH)
    config = h.job_config(args, model="tiny base", loras=len(LORAS))
    h.header(f"{BENCH}: 4 LoRAs round-robin, sdbatch vs a hand-written diffusers loop", config)
    rows = h.rows(args.items)
    for i, row in enumerate(rows):
        row.update(adapter=LORAS[i % 4], text=row["prompt"])
        row["prompt"] = f"{row['prompt']} <lora:{LORAS[i % 4]}:{WEIGHT}>"
    manifest = h.manifest(work / "manifest.parquet", rows)

    # 2. The loop, then sdbatch 1 actor × the loop's threads; the same pixels?
    loop = lp.run_loop(ME, args, model, manifest, work / "loop")
    lf = lp.loop_figures(loop, args.batch)
    loras = {n: str(model.parent / "loras" / f"{n}.safetensors") for n in LORAS}
    spec = h.job(work / "sdbatch.yaml", manifest, work / "sdbatch", {"base": model},
                 size=args.size, steps=args.steps, batch=args.batch, actors=1,
                 threads=args.threads, loras=loras)  # fmt: skip
    sb = lp.run_sdbatch(ME, spec)
    max_diff = lp.same_pixels(work / "loop", work / "sdbatch", [r["id"] for r in rows[:8]])

    # 3. Report.
    ratio = h.ratio(sb["steady_ips"], lf["steady_ips"])
    h.table(["contender", "steady img/s", "in-call img/s", "e2e s", "steady ratio"], [
        [f"loop (1 x {args.threads} threads)", lf["steady_ips"], lf["in_call_ips"], lf["e2e"], "-"],
        [f"sdbatch 1x{args.threads}", sb["steady_ips"], sb["in_call_ips"], sb["e2e"], ratio],
    ])  # fmt: skip
    lora_cost = h.ratio(loop["call_with_lora_s"], loop["call_without_lora_s"])
    print(
        f"   switching: set_adapters {loop['switch_ms']:.2f} ms per call (median); a call with "
        f"a LoRA active takes {h.fmt(lora_cost)}× the same call with LoRA disabled "
        f"({loop['call_with_lora_s'] * 1000:.0f} vs {loop['call_without_lora_s'] * 1000:.0f} ms)\n"
        f"   same work: largest pixel difference sdbatch vs loop over 8 images = {max_diff}"
    )
    figures = {"loop": lf, "sdbatch": sb, "steady_ratio": ratio, "switch_ms": loop["switch_ms"],
               "lora_call_cost_ratio": lora_cost, "pixel_max_diff": max_diff}  # fmt: skip
    headline = {"steady img/s ÷ loop": ratio, "LoRA call ÷ plain call": lora_cost,
                "pixel max diff vs loop": max_diff}  # fmt: skip
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

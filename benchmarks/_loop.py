"""sdbatch vs a hand-written diffusers loop: the two contenders' child processes and
their figures (bench_overhead.py, bench_adapters.py).

Each contender runs in a fresh Python process so it pays its own start-up. A script
adds `CHILD_OPTIONS` to its parser (harness.parser(hidden=...)), dispatches `--child
loop` to its own loop body (built from `pipeline`, `call` and `timed_calls` here) and
`--child sdbatch` to `sdbatch_child`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness as h

CHILD_OPTIONS = ("child", "model", "manifest", "out", "spec")


def pipeline(model: str, family: str = "sd", threads: int = 1) -> Any:
    """The pipeline as a plain script loads it: DDIM, no progress bar, `threads` threads."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.set_num_threads(threads)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe: Any, chunk: list[dict], args: argparse.Namespace, prompt: str = "prompt") -> list:
    """One pipeline call for `chunk`: one CPU generator per image, CFG 7.5; SD 1.x gets an
    empty negative prompt per image, SDXL none at all (its zeroed negative)."""
    import torch

    negative = None if getattr(args, "family", "sd") == "sdxl" else [""] * len(chunk)
    with torch.inference_mode():
        return pipe(
            prompt=[r[prompt] for r in chunk],
            negative_prompt=negative,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            width=args.size,
            height=args.size,
            generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in chunk],
        ).images


def timed_calls(
    groups: list[list[dict]],
    render: Callable[[list[dict]], list],
    args: argparse.Namespace,
    before: Callable[[list[dict]], None] | None = None,
) -> dict[str, list[float]]:
    """Calls of --batch items per group, each image saved as PNG into --out; per call
    its whole time (`before`, render, saves), the render alone, and `before` alone."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"calls": [], "pipe_only": [], "before": []}
    for group in groups:
        for start in range(0, len(group), args.batch):
            chunk = group[start : start + args.batch]
            t0 = time.perf_counter()
            if before:
                before(chunk)
            t1 = time.perf_counter()
            images = render(chunk)
            t2 = time.perf_counter()
            for row, image in zip(chunk, images, strict=True):
                image.save(out / f"{row['id']}.png")
            times["calls"].append(time.perf_counter() - t0)
            times["pipe_only"].append(t2 - t1)
            times["before"].append(t1 - t0)
    return times


def read_rows(manifest: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(manifest).to_pylist()


def sdbatch_child(args: argparse.Namespace) -> None:
    """`run_job` on the spec at --spec, in this fresh process with its own Ray."""
    from _steady import job_figures

    imported = time.time()
    spec = h.load(args.spec)
    ray_start = h.start_ray()
    run = h.run_timed(spec)
    done = time.time()
    figures = job_figures(run, spec.output)  # after `done`: reads Ray's timeline
    h.child_report({"imported": imported, "done": done, "ray_start": ray_start, **figures})


def run_loop(script: str, args: argparse.Namespace, model: Path, manifest: Path, out: Path,
             *extra: str) -> dict:  # fmt: skip
    """The script's `--child loop` in a fresh process; its report."""
    cmd = [script, "--child", "loop", "--model", str(model), "--manifest", str(manifest)]
    cmd += ["--out", str(out), *h.script_args(args, "threads", "size", "steps", "batch"), *extra]
    return h.run_child(cmd, timeout=3600)


def run_sdbatch(script: str, spec: Path) -> dict:
    """`--child sdbatch` on `spec` in a fresh process; its figures (sdbatch_figures)."""
    report = h.run_child([script, "--child", "sdbatch", "--spec", str(spec)], timeout=3600)
    keep = ("ray_start", "pre_render", "first_image", "steady_ips", "in_call_ips", "busy")
    keep += ("blocks", "steady_source", "images", "failed")
    return {
        "e2e": report["done"] - report["spawned_at"],
        "process_wall": report["process_wall"],
        **{k: report[k] for k in keep},
    }


def loop_figures(report: dict, batch: int) -> dict:
    """Loop steady-state: images after the first (warm-up) call over those calls' time,
    PNG saves included; end to end from process spawn to the last image saved."""
    calls, pipe_only = report["calls"], report["pipe_only"]
    later = report["images"] - min(batch, report["images"])
    spawned = report["spawned_at"]
    return {
        "e2e": report["done"] - spawned,
        "process_wall": report["process_wall"],
        "start_and_load": report["loaded"] - spawned,
        "steady_ips": later / sum(calls[1:]) if len(calls) > 1 else None,
        "in_call_ips": later / sum(pipe_only[1:]) if len(calls) > 1 else None,
    }


def same_pixels(loop_dir: Path, output: Path, ids: list[str]) -> int | None:
    """Largest per-channel difference between the loop's and sdbatch's images of `ids`."""
    import numpy as np
    from PIL import Image

    meta = h.metadata(output).set_index("id")
    worst = 0
    for item_id in ids:
        if item_id not in meta.index:
            return None
        ours = np.asarray(Image.open(meta.loc[item_id, "image_uri"]).convert("RGB"), np.int16)
        theirs = np.asarray(Image.open(loop_dir / f"{item_id}.png").convert("RGB"), np.int16)
        worst = max(worst, int(np.abs(ours - theirs).max()))
    return worst

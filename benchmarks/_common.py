"""What the benchmarks share: environment, tiny models, manifests, specs, and the figures.

Every benchmark prints a table and one `RESULT {json}` line (read by run_all.py). Figures
that matter for the issues' goals come from sdbatch's own metadata, so they measure what
a user's job did, not a re-implementation:

- steady-state img/s: per render actor, the images of every block but its first (one
  Ray Data call per block; the first carries the actor's one-off costs: first pipeline
  call, allocator warm-up) over the time from the end of its first call to the end of
  its last, taken from Ray's task timeline. That is the rate a long job runs at, with
  whatever happens between calls included. The pool's rate is the sum over its actors.
- in-call img/s: the same images over the time spent inside pipeline calls
  (`render_seconds` is a call's time split over its items), i.e. what the pipeline
  alone does; the gap to steady-state is what happens between calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
MODELS = OUT / "models"


def setup_env() -> None:
    """Offline Hugging Face, no Ray usage stats; set before Ray starts (workers inherit it)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


setup_env()


# ---------------------------------------------------------------- arguments

QUICK = {"items": 32, "size": 64, "steps": 2}


def job_parser(
    doc: str | None,
    *,
    items: int | None = 256,
    size: int = 128,
    steps: int = 20,
    actors: int | None = None,
    threads: int | None = None,
    with_items: bool = True,
    quick_help: str = "32 items, 64², 2 steps",
) -> argparse.ArgumentParser:
    """The options every job benchmark takes; `None` leaves --actors/--threads out."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if with_items:
        parser.add_argument("--items", type=int, default=items)
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=4)
    if actors is not None:
        parser.add_argument("--actors", type=int, default=actors)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch threads")
    return parser


def apply_quick(args: argparse.Namespace, **quick: Any) -> argparse.Namespace:
    """--quick: a smoke-test size (its figures are not results)."""
    if args.quick:
        for name, value in {**QUICK, **quick}.items():
            setattr(args, name, value)
    return args


def job_config(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """What a job benchmark ran, for its header and RESULT line."""
    names = ("items", "size", "steps", "batch", "actors", "threads")
    config = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return {**config, "scheduler": "ddim", **extra}


# ---------------------------------------------------------------- inputs


def tiny_models(variants: Iterable[str] = ("base",)) -> dict[str, Path]:
    """Tiny random pipelines under benchmarks/out/models (built once, then reused)."""
    from sdbatch.tiny import build_tiny

    return build_tiny(MODELS, list(variants))


def workdir(name: str) -> Path:
    """A fresh benchmarks/out/<name> (the previous run's files are removed)."""
    path = OUT / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


SUBJECTS = ("a cat", "a lighthouse at dusk", "a bowl of fruit", "a mountain lake")


def prompt_rows(n: int, prefix: str = "item", start: int = 0) -> list[dict[str, Any]]:
    """Rows with explicit seeds, so a hand-written loop can use the very same ones."""
    return [
        {
            "id": f"{prefix}-{i:06d}",
            "prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, style {i}",
            "seed": 1000 + i,
        }
        for i in range(start, start + n)
    ]


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.table({c: [row.get(c) for row in rows] for c in columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def spec_dict(
    name: str,
    manifest: Path,
    output: Path,
    models: dict[str, Path],
    *,
    size: int,
    steps: int,
    batch_size: int = 4,
    actors: int = 2,
    threads: int = 1,
    cpus_per_actor: float = 1.0,
    scheduler: str = "ddim",
    **extra: Any,
) -> dict[str, Any]:
    """A job spec as the YAML would hold it (absolute paths)."""
    spec: dict[str, Any] = {
        "name": name,
        "manifest": str(manifest),
        "output": str(output),
        "models": {k: str(v) for k, v in models.items()},
        "seed": 1,
        "batch_size": batch_size,
        "defaults": {
            "steps": steps,
            "width": size,
            "height": size,
            "scheduler": scheduler,
            "guidance_scale": 7.5,
        },
        "compute": {
            "actors": actors,
            "cpus_per_actor": cpus_per_actor,
            "torch_threads": threads,
            "device": "cpu",
        },
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def make_spec(*args: Any, **kwargs: Any) -> Any:
    from sdbatch.spec import parse_spec

    return parse_spec(spec_dict(*args, **kwargs))


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------- running jobs


def start_ray() -> float:
    """Start the one local Ray of this process; returns the seconds it took."""
    from sdbatch.session import init_ray

    started = time.perf_counter()
    init_ray()
    return time.perf_counter() - started


def run_timed(spec: Any, **kwargs: Any) -> dict[str, Any]:
    """run_job plus the times run_job's own `wall_seconds` leaves out.

    RunResult.wall_seconds starts after the checks, weight hashing, resume scan and
    planning; `wall` here is the whole call, `pre_render` the part before the pipeline
    starts (on_start fires right after planning), `first_image` when the first
    finished item reached the driver.
    """
    from sdbatch.runner import run_job

    marks: dict[str, float] = {"since": time.time()}
    started = time.perf_counter()

    def on_start(progress: Any, placement: Any) -> None:
        marks["pre_render"] = time.perf_counter() - started
        marks["threads"] = placement.torch_threads

    def on_progress(progress: Any) -> None:
        marks.setdefault("first_image", time.perf_counter() - started)

    result = run_job(spec, on_start=on_start, on_progress=on_progress, **kwargs)
    wall = time.perf_counter() - started
    return {"result": result, "wall": wall, **marks}


def job_figures(run: dict[str, Any], output: str | Path) -> dict[str, Any]:
    """A finished run_timed() run, summarised: timings, steady-state and in-call rates."""
    meta = metadata(output)
    steady = steady_state(meta, render_calls(run["since"]))
    result = run["result"]
    return {
        "images": result.done,
        "failed": result.failed,
        "wall": run["wall"],
        "pre_render": run.get("pre_render"),
        "first_image": run.get("first_image"),
        "e2e_ips": result.done / run["wall"] if run["wall"] else None,
        "steady_ips": steady["ips"],
        "in_call_ips": steady["in_call_ips"],
        "busy": steady["busy"],
        "blocks": steady["blocks"],
        "steady_source": steady["source"],
        "counted_by_mode": steady["counted_by_mode"],
        "actors": len(meta["worker"].unique()),
    }


def warm_up(models: dict[str, Path], work: Path, **compute: Any) -> float:
    """A small job before the measured ones, so no measured run pays this process's
    one-off costs (Ray Data's first dataset, worker processes, file cache); returns
    its wall time."""
    manifest = write_manifest(work / "warmup.parquet", prompt_rows(8, prefix="warm"))
    spec = make_spec("warmup", manifest, work / "warmup-out", models, size=64, steps=1, **compute)
    return run_timed(spec)["wall"]


def metadata(output: str | Path) -> Any:
    from sdbatch.output import read_metadata

    return read_metadata(str(output)).to_pandas()


RENDER_CALL = "task::MapWorker(MapBatches(Renderer)).submit"


def render_calls(since: float, settle: float = 2.5) -> dict[str, list[tuple[float, float]]]:
    """(start, end) in epoch seconds of every render-actor call since `since`, per actor
    process id, from Ray's task timeline (needs this process connected to that Ray).

    The timeline names the worker (`tid` "worker:<id>"), the metadata the process id;
    the GCS actor table links the two. Empty if Ray's internals have moved on (the
    caller then falls back to write times).
    """
    import ray

    time.sleep(settle)  # task events reach the GCS about once a second
    try:
        from ray._private.state import state as global_state
        from ray.core.generated import gcs_pb2

        accessor = global_state._connect_and_get_accessor()
        pid_of = {}
        for raw in accessor.get_actor_table(None, None):
            actor = gcs_pb2.ActorTableData.FromString(raw)
            pid_of[f"worker:{actor.address.worker_id.hex()}"] = str(actor.pid)
    except Exception:  # noqa: BLE001 - a private API; the figures fall back to writes
        return {}
    calls: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for event in ray.timeline():
        if event.get("ph") != "X" or event.get("cat") != RENDER_CALL:
            continue
        start = event["ts"] / 1e6
        pid = pid_of.get(str(event.get("tid")))
        if start >= since and pid is not None:
            calls[pid].append((start, start + event["dur"] / 1e6))
    return {pid: sorted(spans) for pid, spans in calls.items()}


def _call_number(call_id: str | None) -> int:
    return int(call_id.rsplit("#", 1)[1]) if call_id and "#" in call_id else 0


def blocks_in_render_order(rows: Any) -> list[Any]:
    """One actor's rows split into its blocks (the rows of one block share the
    `created_at` of the write task that stored them), in the order it rendered them."""
    numbered = rows.assign(call_number=rows["call_id"].map(_call_number))
    blocks = [block for _, block in numbered.groupby("created_at")]
    return sorted(blocks, key=lambda block: block["call_number"].min())


def after_first_block(meta: Any) -> Any:
    """The rows of every actor's blocks but its first (the one with its one-off costs)."""
    import pandas as pd

    later = [
        block for _, rows in meta.groupby("worker") for block in blocks_in_render_order(rows)[1:]
    ]
    return pd.concat(later) if later else meta.iloc[:0]


def steady_state(meta: Any, calls: dict[str, list[tuple[float, float]]] | None = None) -> dict:
    """Steady-state and in-call rates of a job, per render actor, summed over the pool.

    Per actor, its blocks in render order; the first is left out. The window runs from
    the end of the first block's call to the end of the last one's, taken from Ray's
    task timeline (`calls`, see render_calls); without it, from the first to the last
    block's write (`created_at`), which the first write task's extra latency (a worker
    process starting) shortens, overstating the rate of a short job: a fallback only.
    """
    rates: list[float] = []
    in_call: list[float] = []
    busy: list[float] = []
    sources: set[str] = set()
    counted = blocks = 0
    by_mode: dict[str, int] = {}
    for worker, rows in meta.groupby("worker"):
        order = blocks_in_render_order(rows)
        blocks += len(order)
        if len(order) < 2:
            continue  # one block: nothing after the first
        later = rows[rows["created_at"] != order[0]["created_at"].iloc[0]]
        spans = (calls or {}).get(str(worker).rsplit(":", 1)[-1], [])
        if len(spans) >= 2:
            window = spans[-1][1] - spans[0][1]
            sources.add("timeline")
        else:
            # Writes can finish out of order (the first may wait for a worker process).
            window = (max(rows["created_at"]) - min(rows["created_at"])).total_seconds()
            sources.add("writes")
        if window <= 0:
            continue
        call_seconds = float(later["render_seconds"].sum())
        rates.append(len(later) / window)
        in_call.append(len(later) / call_seconds)
        busy.append(call_seconds / window)
        counted += len(later)
        for mode, n in later["mode"].value_counts().items():
            by_mode[str(mode)] = by_mode.get(str(mode), 0) + int(n)
    if not rates:
        return {
            "ips": None,
            "in_call_ips": None,
            "busy": None,
            "counted": 0,
            "counted_by_mode": {},
            "actors": 0,
            "blocks": blocks,
            "source": None,
        }
    return {
        "ips": sum(rates),
        "in_call_ips": sum(in_call),
        "busy": sum(busy) / len(busy),  # share of the window spent inside pipeline calls
        "counted": counted,
        "counted_by_mode": by_mode,
        "actors": len(rates),
        "blocks": blocks,
        "source": "+".join(sorted(sources)),
    }


def run_child(args: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run `python ARGS` and return the JSON of its `CHILD {...}` line, plus its wall time."""
    started = time.time()
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    wall = time.time() - started
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"child {' '.join(args)} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    report = json.loads(line.removeprefix("CHILD "))
    report["process_wall"] = wall
    report["spawned_at"] = started
    return report


def child_report(data: dict[str, Any]) -> None:
    print("CHILD " + json.dumps(data), flush=True)


# ---------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for name in ("sdbatch", "torch", "diffusers", "transformers", "ray", "pyarrow", "numpy"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        # Inherited by every process (loop, driver, Ray workers); changes 2-thread speed.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        **versions,
    }


def header(title: str, config: dict[str, Any]) -> None:
    m = machine_info()
    print(f"== {title}")
    print(
        f"   {m['date']} · {m['cpu']} · {m['cores']} cores · {m['ram_gib']} GiB · "
        f"torch {m['torch']} · diffusers {m['diffusers']} · ray {m['ray']} · "
        f"load avg {m['load_avg'][0]:.1f} · OMP_WAIT_POLICY {m['omp_wait_policy']}"
    )
    print("   " + ", ".join(f"{k}={v}" for k, v in config.items()), flush=True)
    # The load average still counts the previous benchmark's job for a minute; what is
    # busy right now (nothing of ours runs yet) says whether others share the cores.
    busy = cpu_busy_now()
    if busy is not None and busy > 0.25:
        print(
            f"   note: the CPUs are {busy:.0%} busy before this benchmark starts; other work "
            "is running and the absolute figures (and ratios, less so) are noisy",
            flush=True,
        )


def cpu_busy_now(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy over the next `seconds` (Linux /proc/stat), else None."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 1 - (idle1 - idle0) / total if total > 0 else None


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print("   " + line)
    print("   " + "  ".join("-" * w for w in widths))
    for row in cells:
        print("   " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdict(value: float | None, goal: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    ok = value >= goal if higher_is_better else value <= goal
    return "meets goal" if ok else "MISSES goal"


def emit(bench: str, quick: bool, config: dict[str, Any], figures: dict[str, Any]) -> None:
    """The machine-readable line run_all.py collects."""

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    record = {
        "bench": bench,
        "quick": quick,
        "machine": machine_info(),
        "config": config,
        "figures": clean(figures),
    }
    print("RESULT " + json.dumps(record, default=str), flush=True)


def quiet_ray_shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def timer() -> Callable[[], float]:
    started = time.perf_counter()
    return lambda: time.perf_counter() - started

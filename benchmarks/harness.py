"""What every benchmark script shares: arguments, jobs, child processes, and the ending.

A script is: `args = parse(parser(...))`, `header(...)`, build jobs with `rows`,
`manifest` and `job` (tests/helpers.py's builders underneath), run them (`measure`, or
`run_child` for a fresh process), print its tables, then `finish(...)`, which prints the
headline figures side by side and the one `RESULT {json}` line run_all.py collects.
Goals are not here: benchmarks/RESULTS.md states them next to the figures' names.
How steady-state and in-call rates are taken is in _steady.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
MODELS = OUT / "models"
SUBJECTS = ("a cat", "a lighthouse at dusk", "a bowl of fruit", "a mountain lake")


def setup_env() -> None:
    """Offline Hugging Face, no Ray usage stats; set before Ray starts (workers inherit it)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    for name, value in (
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
    ):
        os.environ.setdefault(name, value)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


setup_env()

from tests import helpers  # noqa: E402 - needs ROOT on sys.path

# ---------------------------------------------------------------- arguments

QUICK = {"items": 32, "size": 64, "steps": 2}


def parser(
    doc: str | None,
    *,
    job: bool = True,
    items: int | None = 256,
    size: int = 128,
    steps: int = 20,
    actors: int | None = None,
    threads: int | None = None,
    with_items: bool = True,
    quick_help: str = "32 items, 64², 2 steps",
    hidden: Iterable[str] = (),
) -> argparse.ArgumentParser:
    """--quick, the job options (unless job=False; `None` leaves --actors/--threads out),
    and `hidden` options (a child process's arguments, not shown in --help)."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    if job:
        if with_items:
            p.add_argument("--items", type=int, default=items)
        p.add_argument("--size", type=int, default=size)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch", type=int, default=4)
        if actors is not None:
            p.add_argument("--actors", type=int, default=actors)
        if threads is not None:
            p.add_argument("--threads", type=int, default=threads, help="torch threads")
    for name in hidden:
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    return p


def parse(p: argparse.ArgumentParser, **quick: Any) -> argparse.Namespace:
    """Parse; --quick sets `quick`'s values (a smoke-test size: its figures are not results)."""
    args = p.parse_args()
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    return args


def job_config(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """What a job benchmark ran, for its header and RESULT line."""
    names = ("items", "size", "steps", "batch", "actors", "threads")
    config = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return {**config, "scheduler": "ddim", **extra}


def script_args(args: argparse.Namespace, *names: str) -> list[str]:
    """`--name value` for each of `names`, to hand a child the parent's options."""
    return [x for name in names for x in (f"--{name}", str(getattr(args, name)))]


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


def rows(n: int, prefix: str = "item") -> list[dict[str, Any]]:
    """tests' prompt rows with explicit seeds, so a hand-written loop uses the same ones."""
    return [{**row, "seed": 1000 + i} for i, row in enumerate(helpers.prompts(n, prefix))]


def manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    return helpers.write_manifest(path, rows)


def big_manifest(path: Path, n: int, *, seeds_and_steps: bool = False, suffix: str = "") -> Path:
    """id (`row-00000000`) + prompt [+ seed, steps] in row groups of 100,000 rows,
    written one group at a time so the writing process stays small."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["id", "prompt"] + (["seed", "steps"] if seeds_and_steps else [])
    schema = pa.schema([(c, pa.string() if c in ("id", "prompt") else pa.int64()) for c in names])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, 100_000):
            index = range(start, min(start + 100_000, n))
            columns = {
                "id": [f"row-{i:08d}" for i in index],
                "prompt": [f"{SUBJECTS[i % 4]}, style {i}{suffix}" for i in index],
                "seed": [1000 + i for i in index],
                "steps": [20 + i % 30 for i in index],
            }
            writer.write_table(pa.table({c: columns[c] for c in names}, schema=schema))
    return path


def init_and_mask(folder: Path, size: int) -> dict[str, str]:
    """An init image with structure (a gradient, not noise) and a square mask, as PNG."""
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
    return {"init_image": str(folder / "init.png"), "mask_image": str(folder / "mask.png")}


def job(
    path: Path,
    manifest: Path | str,
    output: Path | str,
    models: dict[str, Any],
    *,
    size: int,
    steps: int,
    batch: int = 4,
    actors: int = 2,
    threads: int = 1,
    scheduler: str = "ddim",
    **fields: Any,
) -> Path:
    """A job spec at `path` (YAML, absolute paths) through tests' `write_spec`; `fields`
    are more top-level fields, a dict merged into the one already there."""
    spec: dict[str, Any] = {
        "name": path.stem,
        "manifest": str(manifest),
        "output": str(output),
        "models": {k: str(v) for k, v in models.items()},
        "seed": 1,
        "batch_size": batch,
        "defaults": {"steps": steps, "width": size, "height": size, "scheduler": scheduler},
        "compute": {"actors": actors, "cpus_per_actor": 1.0, "torch_threads": threads,
                    "device": "cpu"},
    }  # fmt: skip
    for key, value in fields.items():
        merge = isinstance(value, dict) and isinstance(spec.get(key), dict)
        spec[key] = {**spec[key], **value} if merge else value
    path.parent.mkdir(parents=True, exist_ok=True)
    return helpers.write_spec(path, **spec)


def load(path: Path | str) -> Any:
    from sdbatch.spec import load_spec

    return load_spec(path)


# ---------------------------------------------------------------- running jobs


def start_ray(address: str | None = None) -> float:
    """Start (or join) the one Ray of this process; returns the seconds it took."""
    from sdbatch.session import init_ray

    t = timer()
    init_ray(address)
    return t()


def run_timed(spec: Any, **kwargs: Any) -> dict[str, Any]:
    """run_job plus the times run_job's own `wall_seconds` leaves out.

    RunResult.wall_seconds starts after the checks, weight hashing, resume scan and
    planning; `wall` here is the whole call, `pre_render` the part before the pipeline
    starts (on_start fires right after planning), `first_image` when the first
    finished item reached the driver.
    """
    from sdbatch.runner import run_job

    marks: dict[str, float] = {"since": time.time()}
    t = timer()

    def on_start(progress: Any, placement: Any) -> None:
        marks["pre_render"] = t()
        marks["threads"] = placement.torch_threads

    def on_progress(progress: Any) -> None:
        marks.setdefault("first_image", t())

    result = run_job(spec, on_start=on_start, on_progress=on_progress, **kwargs)
    return {"result": result, "wall": t(), **marks}


def measure(spec_path: Path | str) -> dict[str, Any]:
    """Run the job at `spec_path` on this process's Ray; its figures (_steady.py)."""
    from _steady import job_figures

    spec = load(spec_path)
    return job_figures(run_timed(spec), spec.output)


def warm_up(models: dict[str, Path], work: Path, **compute: Any) -> float:
    """A small job before the measured ones, so no measured run pays this process's
    one-off costs (Ray Data's first dataset, worker processes, file cache); returns
    its wall time."""
    spec = job(work / "warmup.yaml", manifest(work / "warmup.parquet", rows(8, "warm")),
               work / "warmup-out", models, size=64, steps=1, **compute)  # fmt: skip
    return run_timed(load(spec))["wall"]


@contextlib.contextmanager
def local_cluster(nodes: int, cpus: int) -> Iterator[tuple[Any, list[Any]]]:
    """A multi-node Ray on this machine: a 1-CPU head and `nodes` worker nodes of `cpus`
    CPUs, each with as many `render_node` resources (a job's `compute.resources` keeps
    its actors there); yields (cluster, worker nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    workers = [cluster.add_node(num_cpus=cpus, resources={"render_node": cpus})
               for _ in range(nodes)]  # fmt: skip
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        ray.shutdown()  # disconnect first: Cluster refuses to remove the driver's node
        cluster.shutdown()


def metadata(output: str | Path) -> Any:
    from sdbatch.output import read_metadata

    return read_metadata(str(output)).to_pandas()


def quiet_ray_shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def timer() -> Callable[[], float]:
    started = time.perf_counter()
    return lambda: time.perf_counter() - started


# ---------------------------------------------------------------- child processes


def ray_env() -> dict[str, str]:
    """This environment with a Ray temp dir of its own and no RAY_ADDRESS: a child that
    starts its own Ray leaks no `ray_current_cluster` file and joins no other Ray."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    return env


def run_child(args: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run `python ARGS` and return the JSON of its `CHILD {...}` line, plus its wall time
    (`process_wall`) and start (`spawned_at`, epoch seconds)."""
    started = time.time()
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    wall = time.time() - started
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"child {' '.join(args)} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return {**json.loads(line.removeprefix("CHILD ")), "process_wall": wall, "spawned_at": started}


def child_report(data: dict[str, Any]) -> None:
    print("CHILD " + json.dumps(data), flush=True)


def vm_mib(field: str = "VmHWM", pid: int | str = "self") -> float | None:
    """VmHWM (a process's peak RSS, its own address space's high-water mark) or VmRSS
    (now), MiB. Not `ru_maxrss`: Linux carries that over from the parent at fork + exec,
    so a child of a 250 MiB process reports at least 250 MiB however little it uses."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def ru_maxrss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    def first(path: str, prefix: str) -> str | None:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return None
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(prefix)), None)

    mem = first("/proc/meminfo", "MemTotal:")
    versions = {}
    for name in ("sdbatch", "torch", "diffusers", "transformers", "ray", "pyarrow", "numpy"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        # Inherited by every process (loop, driver, Ray workers); changes 2-thread speed.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        **versions,
    }


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · {m['ram_gib']} GiB · "
        f"torch {m['torch']} · diffusers {m['diffusers']} · ray {m['ray']} · "
        f"load avg {m['load_avg'][0]:.1f} · OMP_WAIT_POLICY {m['omp_wait_policy']}"
    )


def header(title: str, config: dict[str, Any]) -> None:
    print(f"== {title}\n   {machine_line(machine_info())}")
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
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait

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
    print("   " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("   " + "  ".join("-" * w for w in widths))
    for row in cells:
        print("   " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def clean(value: Any) -> Any:
    """Floats rounded to 4 places, all the way down (for the RESULT line)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: clean(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(x) for x in value]
    return value


def finish(
    bench: str,
    args: argparse.Namespace,
    config: dict[str, Any],
    figures: dict[str, Any],
    headline: dict[str, Any],
) -> int:
    """The common ending: the headline figures (what RESULTS.md sets goals for) side by
    side, the quick-mode caveat, and the `RESULT {json}` line run_all.py collects."""
    quick = bool(getattr(args, "quick", False))
    if headline:
        table(["figure", "value"], [[k, v] for k, v in headline.items()])
    if quick:
        print("   (quick mode: a smoke test at a small size; its figures are not results)")
    record = {
        "bench": bench,
        "quick": quick,
        "machine": machine_info(),
        "config": config,
        "headline": clean(headline),
        "figures": clean(figures),
    }
    print("RESULT " + json.dumps(record, default=str), flush=True)
    return 0

"""The driver: check a job, plan it, stream it through Ray Data, commit what was written.

    plan (driver, pure)  →  render (actor pool)  →  write (CPU tasks)  →  commit (driver)

Nothing here prints; progress goes to a callback the CLI draws.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .manifest import ManifestInfo, iter_rows, validate_manifest
from .plan import block_rows_for, homogeneous_blocks, plan_items
from .spec import JobSpec, dump_spec
from .store import AWS_ENV_VARS, Store, open_store
from .write import METADATA_SCHEMA, write_batch

METADATA_PREFIX = "metadata/"
FAILURES_PREFIX = "failures/"
SUCCESS_KEY = "_SUCCESS"
SPEC_KEY = "job.yaml"
# CPUs kept free for the read/prepare/write tasks so the actor pool can never take
# them all (Ray Data then hangs silently on a 2-CPU machine).
CPU_STAGE_CPUS = 0.25


class RunError(Exception):
    """A job that cannot start or cannot finish; the message says why."""


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class Placement:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    device: str


@dataclass
class RunResult:
    name: str
    output: str
    total: int
    done: int
    failed: int
    skipped: int
    wall_seconds: float
    images_per_second: float
    actors: int
    run_id: str
    metadata_parts: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- checks before Ray


def check_job(spec: JobSpec) -> ManifestInfo:
    """Everything that can be known without rendering: manifest, models, output."""
    from .models import check_checkpoint

    info = validate_manifest(spec.manifest, spec)
    problems = []
    for mode in sorted(info.modes):
        try:
            ref = spec.model_for(mode)
        except ValueError as err:
            problems.append(f"{spec.manifest}: {err}")
            continue
        problem = check_checkpoint(ref)
        if problem:
            problems.append(problem)
    if problems:
        raise RunError("\n".join(sorted(set(problems))))
    return info


def models_for(spec: JobSpec, modes: set[str]) -> dict[str, str]:
    """Checkpoint per mode, for the modes this job uses only (actors load nothing else)."""
    return {mode: spec.model_for(mode) for mode in sorted(modes)}


def done_items(store: Store) -> set[tuple[str, int]]:
    """(id, image_index) of items with a metadata row and an image on record."""
    done: set[tuple[str, int]] = set()
    for table in read_parts(store, METADATA_PREFIX, columns=["id", "image_index"]):
        done.update(zip(table["id"].to_pylist(), table["image_index"].to_pylist(), strict=True))
    return done


def read_parts(store: Store, prefix: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    for key in sorted(store.list(prefix)):
        if key.endswith(".parquet"):
            yield pq.read_table(io.BytesIO(store.read_bytes(key)), columns=columns)


def read_metadata(output: str, storage: dict[str, Any] | None = None) -> pa.Table:
    """Every metadata row of a job output, as one table (empty with the schema if none)."""
    store = open_store(output, storage)
    tables = list(read_parts(store, METADATA_PREFIX))
    if not tables:
        return METADATA_SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------- Ray


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    import ray

    if not verbose:
        # A known spurious core-worker error line per actor about constructor args
        # in the object store (ray#57733); real errors still reach the session logs.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        logging.getLogger("ray").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        runtime_env={"env_vars": _forwarded_env()},
    )


def _forwarded_env() -> dict[str, str]:
    names = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE", *AWS_ENV_VARS)
    env = {n: os.environ[n] for n in names if n in os.environ}
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def place(spec: JobSpec, cluster: dict[str, float]) -> Placement:
    """Actor count and per-actor resources that leave room for the CPU stages."""
    c = spec.compute
    cpus = float(cluster.get("CPU", 1))
    gpus = float(cluster.get("GPU", 0))
    device = c.device
    gpus_per_actor = c.gpus_per_actor
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus_per_actor == 0:
        gpus_per_actor = 1.0
    if device == "cpu":
        gpus_per_actor = 0.0
    free_cpus = max(cpus - 2 * CPU_STAGE_CPUS, 0.1)
    if c.actors == "auto":
        if gpus_per_actor > 0:
            actors = max(1, int(gpus // gpus_per_actor))
        else:
            actors = max(1, int(free_cpus // c.cpus_per_actor))
    else:
        actors = c.actors
    if gpus_per_actor > 0 and actors * gpus_per_actor > gpus:
        raise RunError(
            f"compute: {actors} actors × {gpus_per_actor} GPUs needs {actors * gpus_per_actor:g} "
            f"GPUs, the cluster has {gpus:g}"
        )
    # Ray's CPU count is bookkeeping; threads are set separately. Shrink the logical
    # reservation so the pool always fits beside the CPU stages.
    cpus_per_actor = min(c.cpus_per_actor, free_cpus / actors)
    threads = c.torch_threads or max(1, math.ceil(c.cpus_per_actor))
    return Placement(actors, round(cpus_per_actor, 3), gpus_per_actor, threads, device)


def quiet_ray_data(verbose: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.enable_operator_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_auto_log_stats = False
    if not verbose:
        # Ray Data logs execution notes to the console and everything to its session
        # log file; keep the file (it is what explains a hang), quiet the console.
        for handler in logging.getLogger("ray.data").handlers:
            if type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(logging.ERROR)


# ---------------------------------------------------------------- the job


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[Progress, Placement], None] | None = None,
    verbose: bool = False,
    flush_rows: int = 256,
    flush_seconds: float = 10.0,
) -> RunResult:
    """Run a job to completion; resumes from whatever the output already holds."""
    import ray

    # 1. Check inputs before loading anything.
    store = open_store(spec.output, spec.storage.model_dump())
    store.check_writable()
    info = check_job(spec)

    # 2. What is already done (resume) and what remains.
    done = done_items(store)
    progress = Progress(total=info.total_items, skipped=len(done))
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    store.write_bytes(SPEC_KEY, dump_spec(spec).encode(), content_type="application/yaml")

    # 3. Models: hash weights once in the driver; actors load only what the modes need.
    from .models import weights_sha256

    models = models_for(spec, info.modes)
    hashes = {ref: weights_sha256(ref) for ref in set(models.values())}

    # 4. Ray and placement.
    init_ray(address, verbose)
    quiet_ray_data(verbose)
    placement = place(spec, ray.cluster_resources())
    if on_start:
        on_start(progress, placement)

    # 5. Plan into homogeneous blocks (one batch key per block, a multiple of batch_size).
    remaining = info.total_items - len(done)
    parts: list[str] = []
    if remaining > 0:
        refs = _plan_blocks(spec, info, done, remaining, placement.actors)
        ds = _pipeline(
            spec, refs, models, hashes, placement, needs_inputs=info.modes != {"txt2img"}
        )
        parts = _commit_stream(ds, store, run_id, progress, on_progress, flush_rows, flush_seconds)

    # 6. The success marker comes last, and only when nothing is missing.
    result = RunResult(
        name=spec.name,
        output=store.uri,
        total=info.total_items,
        done=progress.done,
        failed=progress.failed,
        skipped=progress.skipped,
        wall_seconds=round(progress.elapsed, 3),
        images_per_second=round(progress.rate, 3),
        actors=placement.actors,
        run_id=run_id,
        metadata_parts=parts,
    )
    if progress.done + progress.skipped == info.total_items:
        store.write_bytes(
            SUCCESS_KEY,
            json.dumps(result.summary(), indent=2).encode(),
            content_type="application/json",
        )
    return result


def _plan_blocks(spec: JobSpec, info: ManifestInfo, done: set, remaining: int, actors: int) -> list:
    import ray

    from .plan import ITEM_SCHEMA

    block_rows = block_rows_for(remaining, spec.batch_size, actors)
    items = plan_items(
        iter_rows(spec.manifest, info.columns, spec.storage.model_dump()), spec, done
    )
    return [
        ray.put(pa.Table.from_pylist(block, schema=ITEM_SCHEMA))
        for block in homogeneous_blocks(items, block_rows)
    ]


def _pipeline(
    spec: JobSpec,
    refs: list,
    models: dict[str, str],
    hashes: dict[str, str],
    placement: Placement,
    needs_inputs: bool,
) -> Any:
    import ray.data

    from .prepare import prepare_batch
    from .render import Renderer

    ds = ray.data.from_arrow_refs(refs)
    if needs_inputs:
        # Fetch + decode input images in CPU tasks, ahead of the actors.
        ds = ds.map_batches(
            prepare_batch,
            fn_kwargs=dict(storage=spec.storage.model_dump()),
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=CPU_STAGE_CPUS,
        )
    # batch_size=None: each call gets one planned block (one batch key, a multiple of
    # batch_size items), so pipeline calls are as full as the plan allows.
    ds = ds.map_batches(
        Renderer,
        fn_constructor_kwargs=dict(
            models=models,
            model_hashes=hashes,
            batch_size=spec.batch_size,
            device=placement.device,
            dtype=spec.compute.dtype,
            torch_threads=placement.torch_threads,
            prompt_overflow=spec.prompt_overflow,
        ),
        compute=ray.data.ActorPoolStrategy(size=placement.actors),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=placement.cpus_per_actor,
        num_gpus=placement.gpus_per_actor or None,
    )
    return ds.map_batches(
        write_batch,
        fn_kwargs=dict(output=spec.output, job_name=spec.name, storage=spec.storage.model_dump()),
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=CPU_STAGE_CPUS,
    )


def _commit_stream(
    ds: Any,
    store: Store,
    run_id: str,
    progress: Progress,
    on_progress: Callable[[Progress], None] | None,
    flush_rows: int,
    flush_seconds: float,
) -> list[str]:
    """Append written rows to metadata/failure parts as they stream in."""
    parts: list[str] = []
    ok_rows: list[pa.Table] = []
    failed_rows: list[pa.Table] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal ok_rows, failed_rows, last_flush
        for prefix, tables in ((METADATA_PREFIX, ok_rows), (FAILURES_PREFIX, failed_rows)):
            tables = [t for t in tables if t.num_rows]
            if tables:
                key = f"{prefix}part-{run_id}-{len(parts):05d}.parquet"
                buf = io.BytesIO()
                pq.write_table(pa.concat_tables(tables), buf)
                store.write_bytes(
                    key, buf.getvalue(), content_type="application/vnd.apache.parquet"
                )
                parts.append(key)
        ok_rows, failed_rows, last_flush = [], [], time.monotonic()

    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            ok_mask = pc.equal(table["status"], "ok")
            ok = table.filter(ok_mask)
            bad = table.filter(pc.invert(ok_mask))
            ok_rows.append(ok)
            failed_rows.append(bad)
            progress.done += ok.num_rows
            progress.failed += bad.num_rows
            if on_progress:
                on_progress(progress)
            pending = sum(t.num_rows for t in ok_rows) + sum(t.num_rows for t in failed_rows)
            if pending >= flush_rows or time.monotonic() - last_flush > flush_seconds:
                flush()
    finally:
        # Whatever was written before an interruption is committed, so resume skips it.
        flush()
    return parts

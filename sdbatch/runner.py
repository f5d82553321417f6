"""The driver: check a job, plan it, stream it through Ray Data, commit what was written.

    plan (driver, pure)  →  render (actor pool)  →  write (CPU tasks)  →  commit (driver)

Nothing here prints; progress goes to a callback the CLI draws.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import queue
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .compact import compact, live_files, repair
from .lease import LEASE_KEY, Lease, LeaseError, describe
from .manifest import ManifestInfo, validate_manifest
from .plan import block_rows_for
from .spec import JobSpec, dump_spec
from .store import AWS_ENV_VARS, Store, open_store, unwrap_task_error
from .stream import ROW_PER_BLOCK, anti_join, unpack
from .write import METADATA_SCHEMA, ShardPacker

METADATA_PREFIX = "metadata/"
FAILURES_PREFIX = "failures/"
SUCCESS_KEY = "_SUCCESS"
SPEC_KEY = "job.yaml"
RUN_KEY = "_RUN.json"
MODELS_KEY = "_MODELS.json"  # per checkpoint: combined, per-component and per-file hashes
# CPUs kept free for the read/prepare/write tasks so the actor pool can never take
# them all (Ray Data then hangs silently on a 2-CPU machine).
CPU_STAGE_CPUS = 0.25
# CPU-stage tasks that always fit beside the pool: one plan, one prepare, one write.
# Ray Data reserves each stage its share of the CPUs up front; a stage left without one
# waits for another to finish. The plan stage runs for as long as the job (a task per
# manifest fragment), so it is capped at PLAN_TASKS concurrent tasks: its reservation
# is then PLAN_TASKS × CPU_STAGE_CPUS and the write stage always gets its own.
STAGE_TASKS = 3
PLAN_TASKS = 1
# Ray keeps at most num_cpus idle worker processes (its soft limit) and kills the rest
# after a second. With one render actor per core the actors alone reach it, so every
# write task started a fresh Python worker (1-3 s of CPU taken from the actors): a
# 64-image job took 47 s instead of 33 s on 2 cores. A few more idle workers fix it.
LOCAL_RAY_CONFIG = {"num_workers_soft_limit": (os.cpu_count() or 1) + 4}


class RunError(Exception):
    """A job that cannot start or cannot finish; the message says why."""


class Stalled(Exception):
    """No item finished within the watchdog interval."""


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    actor_seconds: float = 0.0  # time inside pipeline calls, summed over images
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
    wall_seconds: float  # from the first planned block to the last commit
    images_per_second: float
    actors: int
    run_id: str
    actor_seconds_per_image: float | None
    metadata_parts: list[str] = field(default_factory=list)
    # Before rendering: checks, resume scan, weight hashing, Ray start, planning.
    setup_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- checks before Ray


def check_job(spec: JobSpec) -> ManifestInfo:
    """Everything that can be known without rendering: manifest, models, output."""
    from .models import use_layouts, use_storage

    info = validate_manifest(spec.manifest, spec)
    use_storage(spec.storage.model_dump())  # s3:// checkpoints are read with these options
    assert spec.models is not None
    use_layouts(spec.models.layouts())  # single-file checkpoints: their models.config
    problems = check_models(spec, info)
    if problems:
        raise RunError("\n".join(dict.fromkeys(problems)))
    return info


def check_models(spec: JobSpec, info: ManifestInfo) -> list[str]:
    """Problems with the checkpoints the job's modes need: unsupported pipeline classes,
    and models that do not fit together (so `validate` never passes a job whose every
    item would then fail)."""
    from .models import (
        check_checkpoint,
        check_controlnet,
        check_depth_estimator,
        inspect_checkpoint,
        pickle_problem,
    )

    models = spec.models
    assert models is not None
    problems: list[str] = []
    checkpoints = {}
    for mode in sorted(info.modes):
        try:
            ref = spec.model_for(mode)
        except ValueError as err:
            problems.append(f"{spec.manifest}: {err}")
            continue
        problem = check_checkpoint(ref)
        if problem:
            problems.append(problem)
        else:
            checkpoints[mode] = inspect_checkpoint(ref)
    base_problem = check_checkpoint(models.base)
    base = None if base_problem else inspect_checkpoint(models.base)
    if base is not None and not base.has_text_encoder and base.family == "sdxl":
        problems.append(
            f"models.base {models.base}: an SDXL refiner (no text_encoder) cannot be the base "
            "model; give it as models.refiner"
        )
    inpaint = checkpoints.get("inpaint")
    if inpaint is not None and inpaint.unet_in_channels not in (4, 9):
        problems.append(
            f"models.inpaint {inpaint.ref}: UNet has {inpaint.unet_in_channels} input channels, "
            "expected 9 (an inpainting checkpoint) or 4 (a base model)"
        )
    depth = checkpoints.get("depth2img")
    if depth is not None and models.depth:
        if depth.family == "sdxl":
            problems.append(
                f"models.depth {models.depth}: an SDXL checkpoint; SDXL depth2img uses "
                "models.depth_controlnet with the base model"
            )
        elif depth.unet_in_channels != 5 or not depth.has_depth_estimator:
            problems.append(
                f"models.depth {models.depth}: not a depth2img checkpoint (needs a 5-channel "
                f"UNet and a depth_estimator; found {depth.pipeline_class}, "
                f"{depth.unet_in_channels}-channel UNet)"
            )
    if models.depth_controlnet:
        if base is not None and base.family != "sdxl":
            problems.append(
                f"models.depth_controlnet is for SDXL; the base model {models.base} is "
                f"{base.family.upper()}: use models.depth (an SD 2 depth checkpoint)"
            )
        elif "depth2img" in info.modes:
            problems.append(check_controlnet(models.depth_controlnet) or "")
            if info.estimates_depth and not models.depth_estimator:
                problems.append(
                    f"{spec.manifest}: depth2img rows without a depth_map need "
                    "models.depth_estimator (a DPT, e.g. Intel/dpt-hybrid-midas) beside "
                    "models.depth_controlnet"
                )
    if models.depth_estimator and "depth2img" in info.modes and info.estimates_depth:
        problems.append(check_depth_estimator(models.depth_estimator) or "")
    if models.refiner:
        problem = check_checkpoint(models.refiner)
        if problem:
            problems.append(f"models.refiner: {problem}")
        elif inspect_checkpoint(models.refiner).family != "sdxl":
            problems.append(
                f"models.refiner {models.refiner}: "
                f"{inspect_checkpoint(models.refiner).pipeline_class}, not an SDXL pipeline"
            )
        if base is not None and base.family != "sdxl":
            problems.append(
                f"models.refiner is an SDXL second stage; the base model {models.base} is "
                f"{base.family.upper()}"
            )
    if not models.allow_pickle and not problems:
        for name, ref in model_fields(spec, info).items():
            problems.append(pickle_problem(ref, f"models.{name}") or "")
    return [p for p in problems if p]


def model_fields(spec: JobSpec, info: ManifestInfo) -> dict[str, str]:
    """`models.<field>` → checkpoint, for every model the job's rows load."""
    m = spec.models
    assert m is not None
    used = {spec.model_for(mode) for mode in info.modes}
    aux = {ref for ref in aux_models(spec, info).values() if ref}
    fields = {
        name: ref
        for name in ("base", "inpaint", "depth", "depth_controlnet", "depth_estimator", "refiner")
        if (ref := getattr(m, name)) and (ref in used or ref in aux)
    }
    return fields


def pin_hub_models(spec: JobSpec) -> JobSpec:
    """The spec with each hub id (`org/name`, `org/name@branch`) as `org/name@<commit>`."""
    from . import hub

    assert spec.models is not None

    def pinned(value: str) -> str:
        if value.startswith("s3://") or Path(value).exists() or not hub.split(value):
            return value
        return hub.pin(value)

    fields = {k: v for k, v in spec.models.model_dump().items() if isinstance(v, str)}
    changed: dict[str, Any] = {k: p for k, v in fields.items() if (p := pinned(v)) != v}
    config = {k: pinned(v) for k, v in spec.models.config.items()}
    if config != spec.models.config:
        changed["config"] = config
    if not changed:
        return spec
    return spec.model_copy(update={"models": spec.models.model_copy(update=changed)})


def models_for(spec: JobSpec, modes: set[str]) -> dict[str, str]:
    """Checkpoint per mode, for the modes this job uses only (actors load nothing else)."""
    return {mode: spec.model_for(mode) for mode in sorted(modes)}


def aux_models(spec: JobSpec, info: ManifestInfo) -> dict[str, str | None]:
    """The refiner, depth ControlNet and depth estimator the actors load, where the job's
    rows use them (Renderer keyword arguments)."""
    from .models import family_of
    from .plan import REFINER_MODES

    m = spec.models
    assert m is not None
    sdxl = {mode for mode in info.modes if family_of(spec.model_for(mode)) == "sdxl"}
    depth = "depth2img" in sdxl and bool(m.depth_controlnet)
    return {
        "refiner": m.refiner if m.refiner and sdxl & set(REFINER_MODES) else None,
        "depth_controlnet": m.depth_controlnet if depth else None,
        "depth_estimator": m.depth_estimator if depth and info.estimates_depth else None,
    }


def done_items(store: Store) -> set[tuple[str, int]]:
    """(id, image_index) of items with a metadata row whose image exists (a Python set:
    for tools that need one; the driver keeps `stream.done_table`'s Arrow table)."""
    table = done_table(store)
    return set(zip(table["id"].to_pylist(), table["image_index"].to_pylist(), strict=True))


def done_table(store: Store) -> pa.Table:
    """`stream.DONE_SCHEMA` rows of items with a metadata row whose image exists, once
    each. One listing of images/ and shards/ (not a request per item): cheap on S3."""
    from .stream import done_table as scan

    return scan(store, METADATA_PREFIX, ("images/", "shards/"))


def failed_table(store: Store) -> pa.Table:
    """`stream.DONE_SCHEMA` rows of items with a failure row (they may have succeeded since)."""
    from .stream import DONE_SCHEMA, unique

    parts = [
        t.cast(DONE_SCHEMA)
        for t in read_parts(store, FAILURES_PREFIX, columns=["id", "image_index", "row_id"])
    ]
    return unique(pa.concat_tables(parts)) if parts else DONE_SCHEMA.empty_table()


def _drop_orphan_shards(store: Store) -> None:
    """Delete shards no metadata row points to: an interrupted run uploaded them but did
    not commit their rows, so their items render again and would be read twice."""
    shards = set(store.list("shards/"))
    if not shards:
        return
    referenced: set[str] = set()
    for table in read_parts(store, METADATA_PREFIX, columns=["key"]):
        referenced.update(table["key"].to_pylist())
    for key in shards - referenced:
        store.delete(key)


def read_parts(store: Store, prefix: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The tables of `prefix`'s live files (`compact.live_files`: each row exactly once,
    whatever state a compaction was interrupted in)."""
    for key in live_files(store, prefix):
        yield pq.read_table(io.BytesIO(store.read_bytes(key)), columns=columns)


def read_metadata(output: str, storage: dict[str, Any] | None = None) -> pa.Table:
    """Every metadata row of a job output, as one table (empty with the schema if none)."""
    store = open_store(output, storage)
    tables = list(read_parts(store, METADATA_PREFIX))
    if not tables:
        return METADATA_SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------- Ray


def init_ray(address: str | None = None, verbose: bool = False) -> bool:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray.

    True if this call initialised Ray (started a local one or connected this process);
    False if the caller had already done so (then the caller's Ray is left alone).
    """
    import ray

    if not verbose:
        # A known spurious core-worker error line per actor about constructor args
        # in the object store (ray#57733); real errors still reach the session logs.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        logging.getLogger("ray").setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    target = address or os.environ.get("RAY_ADDRESS")
    where = f"{target} ({'--address' if address else 'RAY_ADDRESS'})" if target else "a local Ray"
    if target:
        _check_reachable(target, where)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR,
            runtime_env=_runtime_env(),
            **({} if target else {"_system_config": LOCAL_RAY_CONFIG}),
        )
    except (ConnectionError, OSError, RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        hint = ""
        if target and target != "auto" and "RAY_AUTH_MODE" not in os.environ:
            # Ray turns token auth on for clusters started where ~/.ray/auth_token exists,
            # but only looks for the token when the address is "auto"; with HOST:PORT the
            # GCS answers InvalidAuthToken and ray.init says only "Failed to connect".
            hint = (
                "; if the cluster uses token authentication (Ray's default when "
                "~/.ray/auth_token exists), set RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN, "
                "or copy the head's ~/.ray/auth_token)"
            )
        raise RunError(f"could not start or connect to {where}: {first}{hint}") from None
    return True


def _check_reachable(target: str, where: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, on a cluster address nothing listens at (ray.init
    retries a dead GCS address for minutes, printing a warning every few seconds)."""
    if target in ("auto", "local") or "://" in target:
        return  # found on this machine, or a Ray Client address (ray.init reports those)
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout).close()
    except ValueError:
        raise RunError(f"Ray address {where}: expected HOST:PORT, auto or ray://…") from None
    except OSError as err:
        raise RunError(
            f"cannot reach the Ray cluster at {where}: {err.strerror or err}; is it up "
            "(`ray status` on the head node)?"
        ) from None


def release_ray(verbose: bool = False) -> None:
    """Stop this job's work after an interrupt or a stall: disconnect from Ray (a local Ray
    we started stops; on a cluster, the actors this driver owns are killed).

    Ray Data's threads keep calling into Ray while it shuts down, and any such call would
    auto-start a whole new local Ray (measured: a second Ray session started at the moment
    of Ctrl-C, and a driver that did not exit for minutes on a busy machine). Auto-init is
    switched off for the rest of this process first; sdbatch always calls ray.init itself.
    Those threads then fail with "Ray has not been started" and log it with a traceback:
    teardown noise, kept out of the console (Ray Data's session log file still has it).
    """
    import ray

    try:
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False
    except ImportError:  # a Ray without the hook has nothing to switch off
        pass
    if not verbose:
        _ray_data_console(logging.CRITICAL + 1)
    ray.shutdown()


def _ray_data_console(level: int) -> None:
    """Ray Data logs to the console and, in full, to its session log file (what explains a
    hang); this sets the console's level only."""
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(level)


def _runtime_env() -> dict[str, Any]:
    """What every sdbatch task and actor runs with (the same one, so idle workers are reused)."""
    return {"env_vars": _forwarded_env()}


def _forwarded_env() -> dict[str, str]:
    names = (
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "HF_HUB_CACHE",
        "TRANSFORMERS_OFFLINE",
        "SDBATCH_FAULT",
        "SDBATCH_CACHE_DIR",
        *AWS_ENV_VARS,
    )
    env = {n: os.environ[n] for n in names if n in os.environ}
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # GNU OpenMP threads (torch's CPU wheel) spin while idle; on a shared CPU node that
    # starves the write tasks and the other actors (measured: ~10x slower renders at
    # 2 threads on 2 busy cores). Passive waiting changes timing only, never results.
    env.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
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
    free_cpus = max(cpus - STAGE_TASKS * CPU_STAGE_CPUS, 0.1)
    if c.actors == "auto":
        if gpus_per_actor > 0:
            actors = int(gpus // gpus_per_actor)
            if actors < 1:
                raise RunError(
                    f"compute.actors: auto counts GPUs, and the cluster has {gpus:g} now; on an "
                    "autoscaling cluster set compute.actors to the number of GPU actors you want "
                    "(the autoscaler then adds nodes), or use device: cpu"
                )
        else:
            # Every core renders: the CPU stages are light and fit beside the actors once
            # their logical reservation shrinks below. (One actor per core at 1 thread
            # beats fewer actors with more threads on CPU: benchmarks/RESULTS.md.)
            actors = max(1, int(cpus // c.cpus_per_actor))
    else:
        # More than the cluster holds now is fine: Ray's autoscaler adds nodes for the
        # pending actors (a fixed cluster would wait; the watchdog then reports it).
        actors = c.actors
    # Ray's CPU count is bookkeeping; threads are set separately. Shrink the logical
    # reservation so the pool always fits beside the CPU stages.
    cpus_per_actor = min(c.cpus_per_actor, free_cpus / actors)
    threads = c.threads()
    # Rounded down: rounding up could make the pool overflow the CPUs and starve the stages.
    cpus_per_actor = math.floor(cpus_per_actor * 1000) / 1000
    return Placement(actors, cpus_per_actor, gpus_per_actor, threads, device)


def configure_ray_data(spec: JobSpec, verbose: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Start rendering only once every actor of the pool is up: otherwise the first actor
    # to finish loading takes all the blocks of a small job. Too few resources for the
    # pool then end in Ray's "Timed out while starting actors" instead of a silent wait.
    ctx.wait_for_min_actors_s = int(spec.execution.watchdog_seconds) or 3600
    ctx.enable_progress_bars = verbose
    ctx.enable_operator_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_auto_log_stats = False
    # A write task's StoreError reaches the driver as a StoreError (not UserCodeException).
    ctx.raise_original_map_exception = True
    # Every row (one planned block) its own Ray block through every stage (`stream`).
    ctx.target_max_block_size = ROW_PER_BLOCK
    # Planned blocks are made by the plan task on whatever node it ran on; preferring the
    # actors of that node would hand a small job's every block to one node's actors.
    # A block is a few KB of items: send it to the least busy actor wherever it is.
    # (Deprecated in Ray 2.60 "for removal after January 2027", with nothing replacing it.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx.execution_options.actor_locality_enabled = False
    if not verbose:
        _ray_data_console(logging.ERROR)  # execution notes off, errors still shown


# ---------------------------------------------------------------- the job


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[Progress, Placement], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    verbose: bool = False,
    fresh: bool = False,
    overwrite: bool = False,
    retry_failed: bool = False,
    stop: threading.Event | None = None,
    break_lease: bool = False,
) -> RunResult:
    """Run a job to completion; resumes from whatever the output already holds.

    fresh: refuse a non-empty output (unless overwrite: clear it first).
    retry_failed: render only items with a failure row and no image yet.
    break_lease: delete another run's lease on the output first (that run may be alive).
    on_note: called with a line of what the driver is doing before rendering starts.
    stop: set it (the CLI's SIGINT handler does) to stop the job: what is finished is
      committed, then KeyboardInterrupt is raised. Checked between steps and while
      rendering, so a KeyboardInterrupt swallowed inside a library cannot keep the job going.
    """

    def check_stop() -> None:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt

    called = time.monotonic()
    # 1. Check inputs and the output before loading anything; take the output's lease.
    store = open_store(spec.output, spec.storage.model_dump())
    store.check_writable()
    info = check_job(spec)
    spec = pin_hub_models(spec)  # every actor loads the same commit, and job.yaml says which
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    try:
        lease = Lease(store, run_id, spec.execution.lease_seconds).acquire(break_lease)
    except LeaseError as err:
        raise RunError(str(err)) from None
    try:
        return _run_held(
            spec, store, info, lease, called, check_stop, address, on_progress, on_start,
            on_note, verbose, fresh, overwrite, retry_failed,
        )  # fmt: skip
    except LeaseError as err:
        raise RunError(str(err)) from None
    finally:
        lease.release()


def _run_held(
    spec: JobSpec,
    store: Store,
    info: ManifestInfo,
    lease: Lease,
    called: float,
    check_stop: Callable[[], None],
    address: str | None,
    on_progress: Callable[[Progress], None] | None,
    on_start: Callable[[Progress, Placement], None] | None,
    on_note: Callable[[str], None] | None,
    verbose: bool,
    fresh: bool,
    overwrite: bool,
    retry_failed: bool,
) -> RunResult:
    """run_job's steps while this run holds the output's lease."""
    import ray

    run_id = lease.run_id
    if fresh:
        _start_fresh(store, overwrite)
    _check_same_render(spec, store)
    # Models: hash what they load once, in the driver; a resume with other weights is
    # refused. Actors load only what the job's modes need.
    from .models import model_hash

    models = models_for(spec, info.modes)
    aux = aux_models(spec, info)
    checkpoints = set(models.values()) | {ref for ref in aux.values() if ref}
    model_hashes = {ref: model_hash(ref) for ref in sorted(checkpoints)}
    _check_same_weights(store, model_hashes)
    hashes = {ref: h.sha256 for ref, h in model_hashes.items()}
    check_stop()

    # 2. What is already done (resume) and what remains.
    for prefix in (METADATA_PREFIX, FAILURES_PREFIX):
        repair(store, prefix)  # what an interrupted compaction left
    _drop_orphan_shards(store)
    note = on_note or (lambda line: None)
    parts_before = len(live_files(store, METADATA_PREFIX))
    if parts_before:
        note(f"resuming: scanning {parts_before:,} metadata file(s) for done items")
    scan_started = time.monotonic()
    done = done_table(store)
    only = anti_join(failed_table(store), done) if retry_failed else None
    if parts_before:
        note(
            f"{done.num_rows:,} item(s) already done"
            + (f", {only.num_rows:,} failed to retry" if only is not None else "")
            + f" ({time.monotonic() - scan_started:.1f} s)"
        )
    store.write_bytes(SPEC_KEY, dump_spec(spec).encode(), content_type="application/yaml")
    store.delete(SUCCESS_KEY)

    # 3. Ray and placement.
    owns_ray = init_ray(address, verbose)
    try:
        configure_ray_data(spec, verbose)
        placement = place(spec, ray.cluster_resources())
        _warm_stage_workers(STAGE_TASKS)
        check_stop()

        # 4. The plan, streamed: Ray Data tasks expand manifest fragments into homogeneous
        # blocks as rendering goes (`stream`); here only its size is estimated.
        plan, to_render = _plan(spec, info, done, only, models, placement.actors)
        progress = Progress(total=info.total_items, skipped=info.total_items - to_render)
        store.write_bytes(
            RUN_KEY,
            json.dumps(
                {
                    "run_id": run_id,
                    "total": info.total_items,
                    "planned": to_render,
                    "started_at": datetime.now(timezone.utc).isoformat(),
                    "lease_taken_over_from": (
                        describe(lease.took_over) if lease.took_over else None
                    ),
                }
            ).encode(),
            content_type="application/json",
        )
        if on_start:
            on_start(progress, placement)
        check_stop()

        # 5. Render, write, and commit metadata parts as results stream back.
        parts: list[str] = []
        if plan is not None:
            ds = _pipeline(
                spec, plan, models, aux, hashes, placement, info.modes != {"txt2img"},
                _warmup_sizes(spec, info),
            )  # fmt: skip
            packer = None
            if spec.output_options.layout == "webdataset":
                o = spec.output_options
                packer = ShardPacker(store, run_id, o.shard_size, o.extension)
            parts = _commit_stream(
                ds, store, run_id, progress, on_progress, spec.execution, packer, check_stop,
                lease.check,
            )  # fmt: skip
    except Stalled as err:
        if owns_ray:
            release_ray(verbose)  # the only way to stop a hung actor's work from here
        raise RunError(str(err)) from None
    except ray.exceptions.RayError as err:
        raise RunError(_explain_ray_error(err, spec)) from None
    except KeyboardInterrupt:
        # What finished is committed (_commit_stream's finally); stop the rest now, even
        # an actor hung inside a pipeline call, instead of at interpreter exit.
        if owns_ray:
            release_ray(verbose)
        raise

    # 6. The success marker comes last, and only when every item is done.
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
        actor_seconds_per_image=(
            round(progress.actor_seconds / progress.done, 4) if progress.done else None
        ),
        metadata_parts=parts,
        setup_seconds=round(progress.started - called, 3),
    )
    # Every planned item went through (failures included): the rows into ≤ 1 file per
    # 10⁶ (crash-safe, `compact`); a stopped run leaves its parts for the next one.
    files = {p.rstrip("/"): compact(store, p) for p in (METADATA_PREFIX, FAILURES_PREFIX)}
    if done_table(store).num_rows >= info.total_items:
        store.write_bytes(
            SUCCESS_KEY,
            json.dumps({**result.summary(), "files": files}, indent=2).encode(),
            content_type="application/json",
        )
    return result


def _start_fresh(store: Store, overwrite: bool) -> None:
    existing = [k for k in store.list() if k not in ("_sdbatch_write_probe", LEASE_KEY)]
    if not existing:
        return
    if not overwrite:
        raise RunError(
            f"{store.uri}: output is not empty ({len(existing)} objects); --fresh needs "
            "--overwrite to delete them, or choose another output"
        )
    for key in existing:
        store.delete(key)


def _check_same_render(spec: JobSpec, store: Store) -> None:
    """Refuse to resume into an output whose items were rendered with other settings."""
    from .spec import SpecError, parse_spec, render_signature, signature_changes

    if not store.exists(SPEC_KEY):
        return
    import yaml

    try:
        old = parse_spec(yaml.safe_load(store.read_bytes(SPEC_KEY)), store.uri_of(SPEC_KEY))
    except (SpecError, yaml.YAMLError):
        raise RunError(
            f"{store.uri_of(SPEC_KEY)}: unreadable stored spec; use --fresh --overwrite"
        ) from None
    changes = signature_changes(render_signature(old), render_signature(spec))
    if changes:
        raise RunError(
            "\n".join(
                [f"{store.uri}: this output was rendered with different settings:"]
                + [f"  {c}" for c in changes]
                + ["resuming would mix images from both; use a new output, or --fresh --overwrite"]
            )
        )


def _check_same_weights(store: Store, hashes: dict[str, Any]) -> None:
    """Refuse to resume with other weights under the same model names; then record these.

    Only files the pipelines load count (`weights.loaded_files`), so adding or changing
    an unused file (a root-level .ckpt, an fp16 variant) never stops a resume.
    """
    recorded: dict[str, Any] = {}
    if store.exists(MODELS_KEY):
        try:
            recorded = json.loads(store.read_bytes(MODELS_KEY))
        except ValueError:
            recorded = {}
    changes = []
    for ref, now in hashes.items():
        old = recorded.get(ref)
        if not isinstance(old, dict) or old.get("sha256") == now.sha256:
            continue
        before = old.get("components") or {}
        parts = sorted(
            name
            for name in set(before) | set(now.components)
            if before.get(name) != now.components.get(name)
        )
        changes.append(
            f"  {ref}: {', '.join(parts) or 'files'} changed "
            f"(recorded {str(old.get('sha256'))[:12]}, now {now.sha256[:12]})"
        )
    if changes:
        raise RunError(
            "\n".join(
                [f"{store.uri}: the weights differ from those this output was rendered with:"]
                + changes
                + ["resuming would mix images from both; use a new output, or --fresh --overwrite"]
            )
        )
    merged = {**recorded, **{ref: h.as_json() for ref, h in hashes.items()}}
    store.write_bytes(
        MODELS_KEY,
        json.dumps(merged, indent=1, sort_keys=True).encode(),
        content_type="application/json",
    )


def _explain_ray_error(err: Exception, spec: JobSpec) -> str:
    text = str(err)
    # The user's exception inside a Ray error: its last "module.SomeError: message" line.
    cause = next(
        (
            ln.strip()
            for ln in reversed(text.splitlines())
            if re.match(r"^\s*[\w.]+(Error|Exception): ", ln)
        ),
        "",
    )
    if "creation task" in text:
        return f"a render actor failed to start: {cause or text.splitlines()[0]}"
    if "actor died" in text.lower() or "restart" in text.lower():
        return (
            f"a render actor kept dying (more than execution.max_actor_restarts="
            f"{spec.execution.max_actor_restarts} restarts); committed images are kept and a rerun "
            f"resumes. Last error: {cause or text.splitlines()[0]}"
        )
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"the job failed in Ray: {cause or (lines[-1] if lines else type(err).__name__)}"


def _plan(
    spec: JobSpec,
    info: ManifestInfo,
    done: pa.Table,
    only: pa.Table | None,
    models: dict[str, str],
    actors: int,
) -> tuple[Any, int]:
    """The planning stage (a Ray Data dataset of packed planned blocks, `stream`) and an
    estimate of the items it will plan; (None, 0) when there is nothing to render."""
    import ray
    import ray.data

    from .manifest import _open
    from .models import family_of
    from .stream import fragments, plan_fragment

    storage = spec.storage.model_dump()
    estimate = only.num_rows if only is not None else max(0, info.total_items - done.num_rows)
    kwargs: dict[str, Any] = dict(
        spec=spec,
        columns=info.columns,
        storage=storage,
        families={ref: family_of(ref) for ref in set(models.values())},
        block_rows=block_rows_for(max(1, estimate), spec.batch_size, actors),
    )
    if only is not None and not only.num_rows:
        return None, 0
    parts = fragments(_open(spec.manifest, storage))
    if len(parts) == 1:
        # One fragment (at most FRAGMENT_ROWS rows, so bounded): planned here, up front,
        # so every actor has a block from the first moment. Streamed, a plan slower than
        # the actors (tiny models) would feed one idle actor at a time.
        rows = list(plan_fragment(pa.Table.from_pylist(parts), done=done, only=only, **kwargs))
        planned = sum(b.num_rows for row in rows for b, _ in unpack(row) if b is not None)
        return (ray.data.from_arrow(rows), planned) if planned else (None, 0)
    kwargs.update(
        done=ray.put(done) if done.num_rows else None,
        only=ray.put(only) if only is not None else None,
    )
    ds = ray.data.from_items(parts, override_num_blocks=len(parts)).map_batches(
        plan_fragment,
        fn_kwargs=kwargs,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=CPU_STAGE_CPUS,
        compute=ray.data.TaskPoolStrategy(size=PLAN_TASKS),
        runtime_env=_runtime_env(),
    )
    if estimate == 0:
        # Everything looks done: confirm it with the planning tasks alone (cheap, no
        # actor loads a model) before starting a pool for nothing.
        counts = ds.map_batches(_count_items, batch_format="pyarrow", num_cpus=CPU_STAGE_CPUS)
        estimate = sum(int(row["items"]) for row in counts.iter_rows())
        if estimate == 0:
            return None, 0
    return ds, estimate


def _count_items(batch: pa.Table) -> pa.Table:
    from .stream import unpack

    return pa.table({"items": [sum(b.num_rows for b, _ in unpack(batch) if b is not None)]})


def _warmup_sizes(spec: JobSpec, info: ManifestInfo) -> list[tuple[str, int, int]]:
    """(mode, width, height) the actors compile for before the first batch; a scan of
    three manifest columns, only where the job compiles (torch_compile)."""
    if not spec.compute.render_options().get("torch_compile"):
        return []
    from .manifest import _open

    pf = _open(spec.manifest, spec.storage.model_dump())
    names = [c for c in ("mode", "width", "height") if c in info.columns]
    d = spec.defaults
    sizes: set[tuple[str, int, int]] = set()
    if not names:
        return [(d.mode, d.width, d.height)]
    for batch in pf.iter_batches(columns=names, batch_size=65536):
        table = pa.Table.from_batches([batch]).group_by(names).aggregate([])
        for row in table.to_pylist():
            sizes.add(
                (
                    row.get("mode") or d.mode,
                    row.get("width") or d.width,
                    row.get("height") or d.height,
                )
            )
    return sorted(sizes)


def _import_stage_modules() -> None:
    from . import prepare, write  # noqa: F401 - the import is the point


def _warm_stage_workers(count: int) -> None:
    """Start the CPU-stage worker processes now, while the render actors start up.

    A new Python worker that imports pyarrow, PIL and sdbatch costs 1-3 s of CPU; started
    on demand, the first write tasks pay it in the middle of rendering, on the cores the
    actors use. Fire and forget: Ray Data's tasks then reuse these idle workers (same
    runtime env).
    """
    import ray

    warm = ray.remote(num_cpus=CPU_STAGE_CPUS, max_retries=0)(_import_stage_modules)
    for _ in range(count):
        warm.options(runtime_env=_runtime_env()).remote()


def _pipeline(*args: Any) -> Any:
    with warnings.catch_warnings():
        # Actor restarts (max_restarts, max_task_retries) only go through ray_remote_args,
        # which Ray 2.60 flags as deprecated (removed in 2.64, hence the pin in
        # pyproject.toml); there is no named parameter for them yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return _build_pipeline(*args)


def _build_pipeline(
    spec: JobSpec,
    plan: Any,
    models: dict[str, str],
    aux: dict[str, str | None],
    hashes: dict[str, str],
    placement: Placement,
    needs_inputs: bool,
    sizes: list[tuple[str, int, int]],
) -> Any:
    import ray.data

    from . import modelcache
    from .render import BlockRenderer
    from .stream import prepare_blocks, write_blocks

    # Environment read now, not at ray.init: a connected cluster gets this job's settings.
    env = _runtime_env()
    ds = plan  # one packed planned block per row (`stream`), whatever the stage
    if needs_inputs:
        # Fetch + decode input images in CPU tasks, ahead of the actors.
        ds = ds.map_batches(
            prepare_blocks,
            fn_kwargs=dict(storage=spec.storage.model_dump()),
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=CPU_STAGE_CPUS,
            runtime_env=env,
        )
    # batch_size=None: each call gets one planned block (one batch key, a multiple of
    # batch_size items), so pipeline calls are as full as the plan allows.
    ds = ds.map_batches(
        BlockRenderer,
        fn_constructor_kwargs=dict(
            models=models,
            **aux,
            model_hashes=hashes,
            batch_size=spec.batch_size,
            device=placement.device,
            dtype=spec.compute.dtype,
            torch_threads=placement.torch_threads,
            prompt_overflow=spec.prompt_overflow,
            render_options=spec.compute.render_options(),
            warmup_sizes=sizes,
            storage=spec.storage.model_dump(),
            layouts=spec.models.layouts(),
            model_sources=modelcache.plans(sorted({*hashes, *spec.models.layouts().values()})),
        ),
        compute=ray.data.ActorPoolStrategy(size=placement.actors),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=placement.cpus_per_actor,
        num_gpus=placement.gpus_per_actor or None,
        resources=spec.compute.resources or None,
        # Ray Data restarts dead actors forever by default; a crash loop must end.
        max_restarts=spec.execution.max_actor_restarts,
        max_task_retries=spec.execution.max_actor_restarts + 1,
        runtime_env=env,
    )
    return ds.map_batches(
        write_blocks,
        fn_kwargs=dict(
            output=spec.output,
            job_name=spec.name,
            storage=spec.storage.model_dump(),
            image_options=spec.output_options.model_dump(),
        ),
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=CPU_STAGE_CPUS,
        runtime_env=env,
    )


def _commit_stream(
    ds: Any,
    store: Store,
    run_id: str,
    progress: Progress,
    on_progress: Callable[[Progress], None] | None,
    execution: Any,
    packer: ShardPacker | None = None,
    check_stop: Callable[[], None] = lambda: None,
    check_lease: Callable[[], None] = lambda: None,
) -> list[str]:
    """Append written rows to metadata/failure parts as they stream in.

    The dataset is consumed on a helper thread so the driver can notice a stall: if no
    item finishes within `execution.watchdog_seconds`, Stalled names the render actors.
    However this ends (done, stall, error, Ctrl-C), what arrived is committed and the
    helper thread stops taking batches.
    """
    parts: list[str] = []
    pending: dict[str, list[pa.Table]] = {METADATA_PREFIX: [], FAILURES_PREFIX: []}
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if any(t.num_rows for ts in pending.values() for t in ts):
            check_lease()  # a run that lost the output's lease commits nothing more
        for prefix, tables in pending.items():
            tables = [t for t in tables if t.num_rows]
            if tables:
                key = f"{prefix}part-{run_id}-{len(parts):05d}.parquet"
                buf = io.BytesIO()
                pq.write_table(pa.concat_tables(tables), buf)
                store.write_bytes(
                    key, buf.getvalue(), content_type="application/vnd.apache.parquet"
                )
                parts.append(key)
            pending[prefix] = []
        last_flush = time.monotonic()

    results: queue.Queue = queue.Queue(maxsize=64)
    done_marker = object()
    abandoned = threading.Event()  # the driver stopped listening

    def hand_over(item: Any) -> bool:
        while not abandoned.is_set():
            try:
                results.put(item, timeout=1.0)
                return True
            except queue.Full:
                continue
        return False

    def consume() -> None:
        batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
        try:
            for table in batches:
                if not hand_over(table):
                    # Nobody commits what follows: end the execution (its actors and
                    # tasks) now rather than whenever the iterator is collected.
                    with contextlib.suppress(Exception):
                        batches.close()  # type: ignore[attr-defined]
                    return
            hand_over(done_marker)
        except BaseException as err:  # noqa: BLE001 - handed to the driver thread
            hand_over(err)

    def take(block: pa.Table) -> None:
        ok_mask = pc.equal(block["status"], "ok")
        ok, bad = block.filter(ok_mask), block.filter(pc.invert(ok_mask))
        if packer is not None:
            bad = bad.drop_columns(["encoded"])
            pending[METADATA_PREFIX].extend(packer.add(ok))
        else:
            pending[METADATA_PREFIX].append(ok)
        pending[FAILURES_PREFIX].append(bad)
        progress.done += ok.num_rows
        progress.failed += bad.num_rows
        progress.actor_seconds += pc.sum(ok["render_seconds"]).as_py() or 0.0

    planned_skips = 0
    threading.Thread(target=consume, name="sdbatch-consume", daemon=True).start()
    watchdog = execution.watchdog_seconds or None
    last_item = time.monotonic()
    finished = False
    try:
        while True:
            check_stop()
            try:
                got = results.get(timeout=min(watchdog or 1.0, 1.0))
            except queue.Empty:
                if watchdog and time.monotonic() - last_item > watchdog:
                    raise Stalled(_stall_report(watchdog)) from None
                if time.monotonic() - last_flush > execution.commit_seconds:
                    flush()
                continue
            if got is done_marker:
                finished = True
                break
            if isinstance(got, BaseException):
                raise unwrap_task_error(got)
            last_item = time.monotonic()
            for block, skipped in unpack(got):
                if block is None:
                    planned_skips += skipped
                else:
                    take(block)
            if on_progress:
                on_progress(progress)
            rows = sum(t.num_rows for ts in pending.values() for t in ts)
            if (
                rows >= execution.commit_rows
                or time.monotonic() - last_flush > execution.commit_seconds
            ):
                flush()
        # Every fragment reported: the exact count of what was already done.
        progress.skipped = planned_skips
    finally:
        abandoned.set()
        if not finished:
            _end_execution(ds)
        # Whatever was written before an interruption is committed, so resume skips it.
        if packer is not None:
            pending[METADATA_PREFIX].append(packer.close())
        flush()
    return parts


def _end_execution(ds: Any) -> None:
    """Stop a dataset's execution now (its render actors and tasks), from the driver thread.

    The helper thread may be blocked waiting for the next block, so it cannot close its
    iterator; meanwhile the abandoned execution keeps its actors and wants CPUs for its
    write tasks, and a job resumed in the same Ray (a library caller, a test) can deadlock
    against it (seen: a stopped SDXL job's actor holding one of 2 CPUs, the resumed job's
    actor the other, neither's write task scheduled). Ray Data keeps the running executor
    on the dataset (`_current_executor`, what its own cleanup at GC uses).
    """
    executor = getattr(ds, "_current_executor", None)
    if executor is not None:
        with contextlib.suppress(Exception):
            executor.shutdown(force=True)


def _stall_report(seconds: float) -> str:
    lines = [f"no image finished in {seconds:g} s (execution.watchdog_seconds); stopping."]
    try:
        # GCS's actor table: works without the dashboard (which sdbatch leaves off).
        from ray._private.state import actors as actor_table

        actors = [a for a in actor_table().values() if "Renderer" in a.get("ActorClassName", "")]
        for a in actors:
            host = a.get("Address", {}).get("IPAddress", "?")
            lines.append(
                f"  render actor {a['ActorID'][:12]} pid {a.get('Pid')} on {host}: {a['State']}"
                f" ({a.get('NumRestarts', 0)} restarts)"
            )
        alive = [a for a in actors if a["State"] == "ALIVE"]
        if alive:
            lines.append(
                f"  {len(alive)} actor(s) alive but not finishing: stuck in a pipeline call "
                "(hung GPU/driver, deadlock) or starved of CPU."
            )
    except Exception as err:  # noqa: BLE001 - the report must not hide the stall
        lines.append(f"  (could not list actors: {err})")
    lines.append("Committed images are kept; the same command resumes.")
    return "\n".join(lines)

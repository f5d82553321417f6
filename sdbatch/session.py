"""The Ray session of a job: connecting, placing the actor pool, Ray Data's settings,
and what the driver says when Ray misbehaves (a stall, a dead actor).

Nothing here knows about items or outputs; `runner` builds the job on top of it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .spec import JobSpec
from .store import AWS_ENV_VARS
from .stream import ROW_PER_BLOCK

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


@dataclass
class Placement:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    device: str


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
        with contextlib.suppress(ImportError):
            _raylet_messages_to_log()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    target = address or os.environ.get("RAY_ADDRESS")
    where = f"{target} ({'--address' if address else 'RAY_ADDRESS'})" if target else "a local Ray"
    if target:
        _check_reachable(target, where)
    try:
        with contextlib.nullcontext() if verbose else _without_log_level_line():
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.ERROR,
                runtime_env=runtime_env(),
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
        raise UserError(f"could not start or connect to {where}: {first}{hint}") from None
    return True


@contextlib.contextmanager
def _without_log_level_line() -> Iterator[None]:
    """Ray's C++ logging prints `logging.cc:303: Set ray log level from environment
    variable RAY_BACKEND_LOG_LEVEL to 3` to the driver's stderr (fd 2, not sys.stderr)
    when ray.init starts the driver's core worker: it logs that at INFO before applying
    the level, whatever the level (Ray 2.60). Setting no level brings back the error line
    above instead. So stderr goes to a file while ray.init runs, then comes back without
    that line; anything else written meanwhile is shown, only later."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to keep clean
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            rest = b"".join(
                line
                for line in held.read().splitlines(keepends=True)
                if b"Set ray log level from environment variable" not in line
            )
            with open(2, "wb", closefd=False) as stderr:
                stderr.write(rest)


def _raylet_messages_to_log() -> None:
    """Ray's driver prints every error message the cluster publishes — a task retried
    after its actor died, a raylet that went away — as `(raylet) ...` lines on stdout,
    whatever log_to_driver says. On a lost node that is a screen of retry lines around
    the one line sdbatch prints; they go to the `sdbatch.ray` logger instead (DEBUG),
    and --verbose keeps Ray's own printing. Uses Ray's private printer (the listener
    thread looks it up at each message); without it, nothing changes."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_sdbatch_quiet", False):
        return
    log = logging.getLogger("sdbatch.ray")

    def quiet(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            for line in data.get("lines", []):
                log.debug("raylet: %s", line)
            return
        printer(data, ignore_prefix)

    quiet._sdbatch_quiet = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = quiet


def _check_reachable(target: str, where: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, on a cluster address nothing listens at (ray.init
    retries a dead GCS address for minutes, printing a warning every few seconds)."""
    if target in ("auto", "local") or "://" in target:
        return  # found on this machine, or a Ray Client address (ray.init reports those)
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout).close()
    except ValueError:
        raise UserError(f"Ray address {where}: expected HOST:PORT, auto or ray://…") from None
    except OSError as err:
        raise UserError(
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


def runtime_env() -> dict[str, Any]:
    """What every sdbatch task and actor runs with (the same one, so idle workers are reused)."""
    return {"env_vars": _forwarded_env()}


def _forwarded_env() -> dict[str, str]:
    names = (
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "HF_HUB_CACHE",
        "TRANSFORMERS_OFFLINE",
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
                raise UserError(
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
        # Off the console: execution notes, and the traceback Ray Data logs for a failed
        # task before it raises the same error here (the driver reports it in one line;
        # Ray Data's session log file keeps the traceback).
        _ray_data_console(logging.CRITICAL + 1)


# ---------------------------------------------------------------- the job


def explain_ray_error(err: Exception, spec: JobSpec) -> str:
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


def _import_stage_modules() -> None:
    from . import prepare, write  # noqa: F401 - the import is the point


def warm_stage_workers(count: int) -> None:
    """Start the CPU-stage worker processes now, while the render actors start up.

    A new Python worker that imports pyarrow, PIL and sdbatch costs 1-3 s of CPU; started
    on demand, the first write tasks pay it in the middle of rendering, on the cores the
    actors use. Fire and forget: Ray Data's tasks then reuse these idle workers (same
    runtime env).
    """
    import ray

    warm = ray.remote(num_cpus=CPU_STAGE_CPUS, max_retries=0)(_import_stage_modules)
    for _ in range(count):
        warm.options(runtime_env=runtime_env()).remote()


def end_execution(ds: Any) -> None:
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


def stall_report(seconds: float, actors: list[dict[str, Any]] | None) -> str:
    """The watchdog's message: `actors` are the run's render actors as GCS's actor table
    lists them (`capacity.LossWatch.render_actors`; None when it could not be read)."""
    lines = [f"no image finished in {seconds:g} s (execution.watchdog_seconds); stopping."]
    if actors is None:
        lines.append("  (could not list the render actors)")
    for a in actors or []:
        host = a.get("Address", {}).get("IPAddress", "?")
        lines.append(
            f"  render actor {a['ActorID'][:12]} pid {a.get('Pid')} on {host}: {a['State']}"
            f" ({a.get('NumRestarts', 0)} restarts)"
        )
    alive = [a for a in actors or [] if a["State"] == "ALIVE"]
    if alive:
        lines.append(
            f"  {len(alive)} actor(s) alive but not finishing: stuck in a pipeline call "
            "(hung GPU/driver, deadlock) or starved of CPU."
        )
    lines.append("Committed images are kept; the same command resumes.")
    return "\n".join(lines)

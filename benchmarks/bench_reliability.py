"""Reliability: each fault injected into a small job, and what it cost.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_reliability.py [--quick] [--items 64]

Every row is one job of tiny-model items (64², 2 steps) run the way a user runs it,
with one fault, until it is complete:

- worker node lost, replaced: a local `ray.cluster_utils` cluster (1-CPU head, a 2-CPU
  render node holding both actors); after AFTER images are stored the render node is
  removed without warning and a new one joins 3 s later. One `run_job`.
- worker node lost, not replaced: the same, no new node; the run stops after
  `execution.capacity_wait_seconds` (8 s), then the same job runs again on a cluster
  that has its render node (what a user's rerun or the restart loop does).
- render actor SIGKILL: `sdbatch run` (its own local Ray, 1 actor); the render actor's
  process is SIGKILLed once after AFTER images; Ray restarts it.
- driver SIGKILL + rerun: `sdbatch run` SIGKILLed (with its local Ray) once AFTER items
  are committed, then the same command again.
- S3 fault proxy 20 %: output on moto's S3 (127.0.0.1) behind `tests.s3server`'s fault
  proxy: 20 % of all requests get 503, 500, a dropped connection or a dropped response.
- disk full: the output folder is a tmpfs too small for the job; the run stops, the
  tmpfs is made larger, the same command resumes.

Outcome per row, read from the output at the end: lost = manifest items with no
committed image; duplicated = items with more than one metadata row (across all parts
and runs); bits differ = committed images whose sha256 differs from the undisturbed
run's; re-rendered = items rendered again (sdbatch's count in each run's `_RUN.json`;
for a run that cannot count — killed, or stopped by its storage — the images stored
without a committed row, a lower bound: its in-flight items are not known); wall-time
cost = the runs' time minus the undisturbed run of the same kind (cluster `run_job`,
`sdbatch run` to a folder, `sdbatch run` to S3 through the proxy at 0 %).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import harness as h

BENCH = "reliability"
SDBATCH = [sys.executable, "-m", "sdbatch.cli"]


# ---------------------------------------------------------------- the job


def job_spec(
    work: Path, name: str, args: argparse.Namespace, output: str | None = None, **extra: Any
) -> Path:
    manifest = work / "manifest.parquet"
    if not manifest.exists():
        h.manifest(manifest, h.rows(args.items))
    execution = {"commit_rows": 8, "commit_seconds": 1, **extra.pop("execution", {})}
    return h.job(work / f"{name}.yaml", manifest, output or work / name, {"base": args.model},
                 size=64, steps=2, actors=1, execution=execution, **extra)  # fmt: skip


# ---------------------------------------------------------------- `sdbatch run`


class Cli:
    """One `sdbatch run` in its own process group (its local Ray dies with it)."""

    def __init__(self, spec: Path):
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*SDBATCH, "run", str(spec), "--progress", "none"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=h.ray_env(),
            cwd=h.ROOT,
            start_new_session=True,
        )

    def wait(self, timeout: float = 900) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        wall = time.perf_counter() - self.started
        self.kill()  # whatever of its Ray is left
        return {"rc": self.proc.returncode, "wall": wall, "out": out, "err": err}

    def kill(self) -> float:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return time.perf_counter() - self.started

    def renderer_pid(self) -> int | None:
        """The render actor's process in this run's process group."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.getsid(int(proc.name)) != self.proc.pid:
                    continue
                if b"BlockRenderer" in (proc / "cmdline").read_bytes():
                    return int(proc.name)
        return None


def stored(output: Path) -> int:
    images = output / "images"
    return len(list(images.glob("*/*.png"))) if images.exists() else 0


def committed(output: Path) -> int:
    from sdbatch.status import job_status

    return job_status(str(output)).done


def wait_for(count: Any, at_least: int, cli: Cli, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while count() < at_least:
        if cli.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run ended or stalled before {at_least}: {cli.wait()}")
        time.sleep(0.1)


def finished(run: dict[str, Any], expect_rc: int = 0) -> dict[str, Any]:
    if run["rc"] != expect_rc:
        raise RuntimeError(f"sdbatch run exited {run['rc']}, not {expect_rc}: {run['err'][-3000:]}")
    return run


# ---------------------------------------------------------------- cluster (child)


def cluster_child(spec_path: str, after: int, replace: bool, lose: bool) -> None:
    """In a child process: the job on a local cluster whose render node goes after
    `after` stored images (test_node_loss's set-up); report run_job's wall time."""
    from sdbatch.errors import UserError
    from sdbatch.runner import run_job

    spec = h.load(spec_path)
    report: dict[str, Any] = {"notes": []}
    with h.local_cluster(nodes=1, cpus=2) as (cluster, (node,)):

        def run() -> None:
            t = h.timer()
            try:
                result = run_job(spec, address=cluster.address, on_note=report["notes"].append)
                report.update(done=result.done, failed=result.failed)
            except UserError as err:
                report.update(error=str(err))
            report["wall"] = t()

        job = threading.Thread(target=run, daemon=True)  # Ray adds nodes from the main thread
        job.start()
        while lose and job.is_alive() and stored(Path(spec.output)) < after:
            time.sleep(0.05)
        if lose and job.is_alive():
            report["removed_at"] = stored(Path(spec.output))
            cluster.remove_node(node, allow_graceful=False)
            if replace:
                time.sleep(3)
                cluster.add_node(num_cpus=2, resources={"render_node": 2})
        job.join()
    h.child_report(report)


def on_cluster(spec: Path, after: int, *flags: str) -> dict[str, Any]:
    args = [str(Path(__file__)), "--cluster-child", str(spec), str(after), *flags]
    return h.run_child(args, timeout=900, env=h.ray_env())


def cluster_spec(work: Path, name: str, args: argparse.Namespace, **execution: Any) -> Path:
    compute = {"actors": 2, "cpus_per_actor": 1, "resources": {"render_node": 1}}
    return job_spec(work, name, args, compute=compute, execution=execution)


# ---------------------------------------------------------------- outcome


def run_events(output: str, storage: dict | None = None) -> dict[str, int]:
    from sdbatch.output import RUN_KEY
    from sdbatch.store import open_store

    store = open_store(output, storage)
    if not store.exists(RUN_KEY):
        return {}
    return dict(json.loads(store.read_bytes(RUN_KEY)).get("events") or {})


def uncommitted_images(output: Path) -> int:
    """Images a stopped run stored without committing their rows: they render again."""
    from sdbatch.output import read_metadata

    keys = set(read_metadata(str(output)).column("key").to_pylist())
    images = output / "images"
    return sum(
        1
        for path in (images.glob("*/*.png") if images.exists() else ())
        if str(path.relative_to(output)) not in keys
    )


def audit(
    output: str, expected: set, reference: dict | None, storage: dict | None = None
) -> dict[str, Any]:
    """Lost, duplicated and changed items of a finished output; the sha256 of each image's
    bytes as stored."""
    from sdbatch.output import SUCCESS_KEY, read_metadata
    from sdbatch.store import open_store

    store = open_store(output, storage)
    meta = read_metadata(output, storage).to_pandas()
    ok = meta[meta["status"] == "ok"]
    rows = ok.groupby(["id", "image_index"]).size()
    shas = {}
    for row in ok.drop_duplicates(["id", "image_index"]).itertuples():
        if store.exists(row.key):
            shas[(row.id, int(row.image_index))] = hashlib.sha256(
                store.read_bytes(row.key)
            ).hexdigest()
    return {
        "lost": len(expected - set(shas)),
        "duplicated": int((rows > 1).sum()),
        "failed_rows": int((meta["status"] != "ok").sum()),
        "bits_differ": (
            None if reference is None else sum(shas[k] != reference.get(k) for k in shas)
        ),
        "complete": store.exists(SUCCESS_KEY),
        "shas": shas,
    }


def row(
    fault: str,
    kind: str,
    walls: list[float],
    outcome: dict[str, Any],
    rerendered: int,
    at_least: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "fault": fault,
        "baseline": kind,
        "walls": walls,
        "rerendered": rerendered,
        "rerendered_lower_bound": at_least,
        **{k: v for k, v in outcome.items() if k != "shas"},
        **extra,
    }


# ---------------------------------------------------------------- the faults


def fault_node_lost(work: Path, args, expected, ref, replace: bool) -> dict:
    name = "node-replaced" if replace else "node-gone"
    # With a replacement, the default wait (600 s): a new node's actor takes more than a
    # few seconds to load its model on a busy machine.
    spec = cluster_spec(work, name, args, **({} if replace else {"capacity_wait_seconds": 8}))
    output = str(work / name)
    first = on_cluster(spec, args.after, *(["--replace"] if replace else []))
    events = run_events(output)
    walls = [first["wall"]]
    rerendered = events.get("items_rerendered", 0)
    notes = list(first["notes"]) + ([first["error"]] if "error" in first else [])
    if not replace:
        if "error" not in first:
            raise RuntimeError(f"the run without a render node did not stop: {first}")
        again = on_cluster(spec, 0, "--no-loss")  # the same job, the node back
        if "error" in again:
            raise RuntimeError(f"the rerun failed: {again['error']}")
        walls.append(again["wall"])
        rerendered += run_events(output).get("items_rerendered", 0)
    elif "error" in first:
        raise RuntimeError(f"the run with a replacement failed: {first['error']}")
    fault = f"worker node lost, {'replaced after 3 s' if replace else 'no replacement, rerun'}"
    return row(fault, "cluster", walls, audit(output, expected, ref), rerendered, notes=notes,
               removed_at=first.get("removed_at"), events=events)  # fmt: skip


def fault_actor_killed(work: Path, args, expected, ref) -> dict:
    spec = job_spec(work, "actor-killed", args)
    output = work / "actor-killed"
    cli = Cli(spec)
    wait_for(lambda: stored(output), args.after, cli)
    pid = None
    deadline = time.monotonic() + 60
    while pid is None and time.monotonic() < deadline:
        pid = cli.renderer_pid()
        time.sleep(0.05)
    if pid is None:
        raise RuntimeError("no render actor process found")
    os.kill(pid, signal.SIGKILL)
    run = finished(cli.wait())
    events = run_events(str(output))
    return row("render actor SIGKILL", "local", [run["wall"]], audit(str(output), expected, ref),
               events.get("items_rerendered", 0),
               actors_restarted=events.get("actors_restarted"))  # fmt: skip


def fault_driver_killed(work: Path, args, expected, ref) -> dict:
    spec = job_spec(work, "driver-killed", args)
    output = work / "driver-killed"
    cli = Cli(spec)
    wait_for(lambda: committed(output), args.after, cli)
    first = cli.kill()
    lower_bound = uncommitted_images(output)
    again = finished(Cli(spec).wait())
    rerendered = lower_bound + run_events(str(output)).get("items_rerendered", 0)
    return row("driver SIGKILL + rerun", "local", [first, again["wall"]],
               audit(str(output), expected, ref), rerendered, at_least=True,
               found_by_rerun=rerun_found(again))  # fmt: skip


def rerun_found(rerun: dict[str, Any]) -> str:
    """The rerun's own start line: what it found done."""
    return next((ln for ln in rerun["err"].splitlines() if "already done" in ln), "?")


def fault_s3(work: Path, args, expected, ref, rate: float) -> dict:
    from tests.s3server import FaultPlan, FaultProxy, S3Server, use_fake_aws_env

    use_fake_aws_env()  # before the runs start: their local Ray workers inherit it
    server = S3Server(process=True)
    try:
        bucket = server.bucket("rel")
        plan = FaultPlan(rate=rate, seed=15)
        with FaultProxy(server.port, plan) as proxy:
            storage = server.storage(proxy.endpoint_url)
            name = f"s3-{int(rate * 100)}"
            output = f"s3://{bucket}/{name}"
            spec = job_spec(work, name, args, output=output, storage=storage)
            run = finished(Cli(spec).wait())
            events = run_events(output, server.storage())
            outcome = audit(output, expected, ref, server.storage())
            faults = dict(plan.counts)
    finally:
        server.stop()
    fault = f"S3 fault proxy {rate:.0%}" if rate else "S3, proxy at 0 % (baseline)"
    return row(fault, "s3", [run["wall"]], outcome, events.get("items_rerendered", 0),
               faults=faults)  # fmt: skip


@contextlib.contextmanager
def tiny_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (root only): a disk that fills up."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        raise PermissionError(mounted.stderr.decode().strip() or "mount failed")
    try:
        yield lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(path)],
                                         check=True)  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fault_disk_full(work: Path, args, expected, ref) -> dict:
    spec = job_spec(work, "disk-full", args)
    output = work / "disk-full"
    # ~13 KB per 64² PNG: room for about a third of the job's images.
    with tiny_disk(output, f"{max(200, args.items * 13 // 3)}k") as resize:
        first = finished(Cli(spec).wait(), expect_rc=1)
        if "No space left on device" not in first["err"]:
            raise RuntimeError(f"the first run did not stop on a full disk: {first['err']}")
        lower_bound = uncommitted_images(output)
        kept = committed(output)
        resize("256m")
        again = finished(Cli(spec).wait())
        rerendered = lower_bound + run_events(str(output)).get("items_rerendered", 0)
        outcome = audit(str(output), expected, ref)
    return row("disk full (tmpfs), then resumed", "local", [first["wall"], again["wall"]],
               outcome, rerendered, at_least=True, committed_before_full=kept,
               message=next(ln for ln in first["err"].splitlines() if ln.startswith("error:")),
               )  # fmt: skip


# ---------------------------------------------------------------- main


def baselines(work: Path, args: argparse.Namespace, expected: set) -> tuple[dict, dict]:
    """The undisturbed runs each fault is compared with (wall s by kind), and the first
    one's image sha256s, which every fault's images must equal."""
    local = finished(Cli(job_spec(work, "undisturbed", args)).wait())
    reference = audit(str(work / "undisturbed"), expected, None)
    assert reference["lost"] == 0 and reference["duplicated"] == 0, reference
    print(f"   undisturbed `sdbatch run`: {local['wall']:.1f} s", flush=True)
    cluster = on_cluster(cluster_spec(work, "cluster-undisturbed", args), 0, "--no-loss")
    print(f"   undisturbed cluster run_job: {cluster['wall']:.1f} s", flush=True)
    baseline = {"local": local["wall"], "cluster": cluster["wall"]}
    if "s3_20" in args.only:
        baseline["s3"] = fault_s3(work, args, expected, reference["shas"], 0.0)["walls"][0]
        print(f"   undisturbed `sdbatch run` to S3 (proxy 0 %): {baseline['s3']:.1f} s", flush=True)
    return baseline, reference["shas"]


def report(rows: list[dict[str, Any]], baseline: dict[str, float]) -> bool:
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["fault"], "ERROR", "", "", "", "", r["error"][:60]])
            continue
        wall = sum(r["walls"])
        cost = wall - baseline[r["baseline"]]
        table.append([
            r["fault"], r["lost"], r["duplicated"], r["bits_differ"],
            ("≥" if r["rerendered_lower_bound"] else "") + str(r["rerendered"]),
            f"{wall:.1f} ({' + '.join(f'{w:.1f}' for w in r['walls'])})",
            f"{cost:+.1f} s ({cost / baseline[r['baseline']]:+.0%} of {r['baseline']})",
        ])  # fmt: skip
    print()
    h.table(["fault", "lost", "duplicated", "bits differ", "re-rendered", "wall s (runs)", "cost"],
            table)  # fmt: skip
    print(
        "   baselines (undisturbed): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in baseline.items())
        + "; every row ran to a complete output (_SUCCESS): "
        + str(all(r.get("complete") for r in rows))
    )
    clean = all(r.get("lost") == 0 and r.get("duplicated") == 0 for r in rows)
    print(f"   0 lost and 0 duplicated on every row: {clean}")
    return clean


def main() -> int:
    if sys.argv[1:2] == ["--cluster-child"]:  # SPEC AFTER [--replace] [--no-loss]
        spec, after, *flags = sys.argv[2:]
        cluster_child(spec, int(after), "--replace" in flags, "--no-loss" not in flags)
        return 0
    p = h.parser(__doc__, job=False, quick_help="32 items (a smoke test)")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--only", default="", help="comma-separated fault names")
    args = h.parse(p, items=32)
    args.after = args.items // 3
    config = {"items": args.items, "fault_after": args.after, "size": 64, "steps": 2,
              "batch": 4, "scheduler": "ddim"}  # fmt: skip
    h.header("reliability: faults injected × outcome", config)
    work = h.workdir(BENCH)
    args.model = h.tiny_models(["base"])["base"]
    expected = {(r["id"], 0) for r in h.rows(args.items)}
    faults = {
        "node_replaced": lambda: fault_node_lost(work, args, expected, ref, replace=True),
        "node_gone": lambda: fault_node_lost(work, args, expected, ref, replace=False),
        "actor_kill": lambda: fault_actor_killed(work, args, expected, ref),
        "driver_kill": lambda: fault_driver_killed(work, args, expected, ref),
        "s3_20": lambda: fault_s3(work, args, expected, ref, 0.2),
        "disk_full": lambda: fault_disk_full(work, args, expected, ref),
    }
    args.only = [f for f in args.only.split(",") if f] or list(faults)

    # 1. The undisturbed runs, then each fault (one that goes wrong is a row too).
    baseline, ref = baselines(work, args, expected)
    rows: list[dict[str, Any]] = []
    for name in args.only:
        try:
            result = faults[name]()
        except Exception as err:  # noqa: BLE001
            result = {"fault": name, "error": f"{type(err).__name__}: {err}"[:2000]}
        print(f"   {name}: {json.dumps(result, default=str)[:1500]}", flush=True)
        rows.append(result)

    # 2. The table.
    clean = report(rows, baseline)
    headline = {f"{r['fault']}: lost, duplicated": f"{r.get('lost')}, {r.get('duplicated')}"
                for r in rows}  # fmt: skip
    figures = {"baseline": baseline, "rows": rows, "clean": clean}
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

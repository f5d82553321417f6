"""Steady-state and in-call rates of a finished job, from sdbatch's own metadata.

Figures come from what a user's job wrote, not from a re-implementation:

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

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import harness as h

# A render call in Ray's task timeline: the actor class is BlockRenderer since the plan
# streams (Renderer before); matching only the old name left every figure on the
# write-time fallback.
RENDER_CALLS = tuple(
    f"task::MapWorker(MapBatches({c})).submit" for c in ("BlockRenderer", "Renderer")
)


def job_figures(run: dict[str, Any], output: str | Path) -> dict[str, Any]:
    """A finished harness.run_timed() run, summarised: timings, steady-state and in-call
    rates."""
    meta = h.metadata(output)
    steady = steady_state(meta, render_calls(run["since"]))
    result = run["result"]
    return {
        "images": result.done,
        "skipped": result.skipped,
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
        if event.get("ph") != "X" or event.get("cat") not in RENDER_CALLS:
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
    return {
        "ips": sum(rates) if rates else None,
        "in_call_ips": sum(in_call) if rates else None,
        # share of the window spent inside pipeline calls
        "busy": sum(busy) / len(busy) if rates else None,
        "counted": counted,
        "counted_by_mode": by_mode,
        "actors": len(rates),
        "blocks": blocks,
        "source": "+".join(sorted(sources)) if rates else None,
    }

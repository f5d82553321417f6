"""What an output holds right now: done / failed / remaining, speed, top failure reasons.

Reads only committed files (metadata and failure parts, `_RUN.json`, `_SUCCESS`), so it
works while a job is running, after it finished, and after it crashed.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from .compact import read_live, repair
from .errors import StoreError
from .lease import describe, live_lease
from .output import (
    FAILURES_PREFIX,
    METADATA_PREFIX,
    RUN_EVENTS,
    RUN_KEY,
    SUCCESS_KEY,
    done_table,
    unresolved_failures,
)
from .store import open_store


@dataclass
class JobStatus:
    output: str
    total: int | None
    done: int
    failed: int
    complete: bool
    images_per_second: float | None
    top_failures: list[tuple[str, int]] = field(default_factory=list)
    lease: str | None = None  # who is writing this output now, if a run holds a live lease
    lease_taken_over_from: str | None = None  # the stale holder the latest run replaced
    # What the latest run lived through: `output.RUN_EVENTS`, 0 where not counted.
    events: dict[str, int] = field(default_factory=dict)

    @property
    def remaining(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.done - self.failed)

    def events_line(self) -> str | None:
        """The latest run's losses in words, or None when it lost nothing."""
        e = self.events
        if not any(e.values()):
            return None
        return (
            f"{e['nodes_lost']} node(s) lost, {e['actors_restarted']} render actor "
            f"restart(s), {e['items_rerendered']} item(s) rendered again, re-planned "
            f"{e['replans']} time(s)"
            + (
                f", {e['items_failed_by_crashes']} item(s) failed by killing their actor"
                if e["items_failed_by_crashes"]
                else ""
            )
        )


def job_status(output: str, storage: dict[str, Any] | None = None, top: int = 5) -> JobStatus:
    store = open_store(output, storage)
    holder = live_lease(store)
    if holder is None:  # no run is writing: finish what an interrupted compaction left
        for prefix in (METADATA_PREFIX, FAILURES_PREFIX):
            with contextlib.suppress(StoreError, OSError):  # read-only credentials: fine
                repair(store, prefix)
    done = done_table(store)
    failed = unresolved_failures(store, done, ["error_type", "error_message"])
    reasons: Counter[str] = Counter(
        f"{kind}: {(message or '')[:100]}"
        for kind, message in zip(
            failed["error_type"].to_pylist(), failed["error_message"].to_pylist(), strict=True
        )
    )
    run = json.loads(store.read_bytes(RUN_KEY)) if store.exists(RUN_KEY) else {}
    return JobStatus(
        output=store.uri,
        total=run.get("total"),
        done=done.num_rows,
        failed=failed.num_rows,
        complete=store.exists(SUCCESS_KEY),
        images_per_second=_latest_rate(store, run),
        top_failures=reasons.most_common(top),
        lease=describe(holder) if holder else None,
        lease_taken_over_from=run.get("lease_taken_over_from"),
        events=_events(run.get("events") or {}),
    )


def _events(recorded: dict[str, int]) -> dict[str, int]:
    """Every `RUN_EVENTS` counter of a run record; an older record's "capacity_lost"
    always equalled its "replans" and is dropped."""
    return {name: int(recorded.get(name) or 0) for name in RUN_EVENTS}


def _latest_rate(store: Any, run: dict[str, Any]) -> float | None:
    """Images per second of the latest run, from its committed rows' timestamps."""
    run_id, started = run.get("run_id"), run.get("started_at")
    if not run_id or not started:
        return None
    count, latest = 0, None
    read = lambda key: pq.read_table(store.open_input(key), columns=["created_at"])  # noqa: E731
    for table in read_live(store, METADATA_PREFIX, read, keep=lambda key: run_id in key):
        stamp = pc.max(table["created_at"]).as_py()
        count += table.num_rows
        latest = stamp if latest is None or (stamp and stamp > latest) else latest
    if not count or latest is None:  # compacted (a finished job): the run's own figure
        if store.exists(SUCCESS_KEY):
            with contextlib.suppress(ValueError):
                return json.loads(store.read_bytes(SUCCESS_KEY)).get("images_per_second")
        return None
    seconds = (latest - datetime.fromisoformat(started)).total_seconds()
    return count / seconds if seconds > 0 else None

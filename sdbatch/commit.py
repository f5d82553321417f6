"""Commit: written blocks in, metadata and failure parts out.

The job's last stage runs in the driver. `Committer` takes the written blocks as they
stream back (packed rows, `stream.unpack`) and appends their rows to Parquet parts under
`metadata/` and `failures/` every `commit_rows` rows or `commit_seconds`; a row is
committed once its image is stored, so resume skips exactly what a part records.
`watched` feeds it from Ray Data on a helper thread, so the driver can notice a stall,
a stop request or an idle stream while no block arrives. Neither needs Ray.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import StoreError
from .output import FAILURES_PREFIX, METADATA_PREFIX
from .store import Store, unwrap_task_error
from .stream import unpack
from .write import UNSTORED


class Stalled(Exception):
    """No item finished within the watchdog interval."""


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    committed: int = 0  # done items whose metadata rows are written (resume skips them)
    actor_seconds: float = 0.0  # time inside pipeline calls, summed over images
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


class Committer:
    """Appends written rows to metadata (status ok) and failure parts.

    check_lease is called before every part is written: a run that lost the output's
    lease commits nothing more (its error propagates).
    """

    def __init__(
        self,
        store: Store,
        run_id: str,
        progress: Progress,
        *,
        commit_rows: int,
        commit_seconds: float,
        check_lease: Callable[[], None] = lambda: None,
        failed_keys: list[pa.Table] | None = None,
    ):
        self.store, self.run_id, self.progress = store, run_id, progress
        # (id, image_index, row_id) of each failure row taken, appended here.
        self.failed_keys = failed_keys if failed_keys is not None else []
        self.commit_rows, self.commit_seconds = commit_rows, commit_seconds
        self.check_lease = check_lease
        self.parts: list[str] = []
        self.skipped = 0  # items the plan found done, from its count rows
        self._pending: dict[str, list[pa.Table]] = {METADATA_PREFIX: [], FAILURES_PREFIX: []}
        self._rows = 0
        self._last_flush = time.monotonic()

    def add(self, batch: pa.Table) -> None:
        """One batch of packed rows from the write stage; flushes when a part is due.

        Rows the write stage could not store (the output failed) are not committed: what
        was stored is, at once, then StoreError stops the job with the store's message.
        """
        unstored: list[str] = []
        for block, skipped in unpack(batch):
            if block is None:
                self.skipped += skipped
                continue
            lost = pc.equal(block["status"], UNSTORED)
            if pc.any(lost).as_py():
                unstored += block.filter(lost)["error_message"].to_pylist()
                block = block.filter(pc.invert(lost))
            self._take(block)
        if unstored:
            self.flush()
            raise StoreError(unstored[0])
        if self._rows >= self.commit_rows or self.due():
            self.flush()

    def add_rows(self, table: pa.Table) -> None:
        """Written rows from outside the stream (the last WebDataset shard's)."""
        if table.num_rows:
            self._take(table)

    def _take(self, block: pa.Table) -> None:
        if "encoded" in block.column_names:  # never in a part (a shard holds the bytes)
            block = block.drop_columns(["encoded"])
        ok_mask = pc.equal(block["status"], "ok")
        ok, bad = block.filter(ok_mask), block.filter(pc.invert(ok_mask))
        self._pending[METADATA_PREFIX].append(ok)
        self._pending[FAILURES_PREFIX].append(bad)
        if bad.num_rows:
            self.failed_keys.append(bad.select(["id", "image_index", "row_id"]))
        self._rows += block.num_rows
        self.progress.done += ok.num_rows
        self.progress.failed += bad.num_rows
        self.progress.actor_seconds += pc.sum(ok["render_seconds"]).as_py() or 0.0

    def due(self) -> bool:
        """Whether uncommitted rows have waited commit_seconds."""
        return bool(self._rows) and time.monotonic() - self._last_flush > self.commit_seconds

    def flush(self) -> None:
        """Write what is pending as one part per prefix."""
        if self._rows:
            self.check_lease()
        for prefix, tables in self._pending.items():
            tables = [t for t in tables if t.num_rows]
            if tables:
                key = f"{prefix}part-{self.run_id}-{len(self.parts):05d}.parquet"
                buf = io.BytesIO()
                pq.write_table(pa.concat_tables(tables, promote_options="default"), buf)
                self.store.write_bytes(
                    key, buf.getvalue(), content_type="application/vnd.apache.parquet"
                )
                self.parts.append(key)
                if prefix == METADATA_PREFIX:
                    self.progress.committed += sum(t.num_rows for t in tables)
            self._pending[prefix] = []
        self._rows = 0
        self._last_flush = time.monotonic()


def watched(
    batches: Callable[[], Iterable[Any]],
    *,
    watchdog_seconds: float,
    on_idle: Callable[[], None] = lambda: None,
    check_stop: Callable[[], None] = lambda: None,
    stall_report: Callable[[float], str] = lambda s: f"no image finished in {s:g} s",
    on_abandon: Callable[[], None] = lambda: None,
) -> Iterator[Any]:
    """The items of `batches()`, consumed on a helper thread.

    While none arrives the driver thread stays free: it calls `check_stop` (which may
    raise KeyboardInterrupt) and `on_idle` about every second, and raises Stalled (with
    `stall_report`'s text) when nothing arrived for `watchdog_seconds` (0: never). An
    exception raised while consuming is re-raised here (a store error as its one line).
    However iteration ends early, the helper stops taking items and `on_abandon` is
    called (to end the execution behind `batches`, whose iterator the blocked helper
    thread cannot close).
    """
    results: queue.Queue = queue.Queue(maxsize=64)
    end = object()
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
        it = iter(batches())
        try:
            for item in it:
                if not hand_over(item):
                    with contextlib.suppress(Exception):
                        it.close()  # type: ignore[attr-defined]
                    return
            hand_over(end)
        except BaseException as err:  # noqa: BLE001 - handed to the driver thread
            hand_over(err)

    threading.Thread(target=consume, name="sdbatch-consume", daemon=True).start()
    watchdog = watchdog_seconds or None
    last_item = time.monotonic()
    finished = False
    try:
        while True:
            check_stop()
            try:
                got = results.get(timeout=1.0)
            except queue.Empty:
                if watchdog and time.monotonic() - last_item > watchdog:
                    raise Stalled(stall_report(watchdog)) from None
                on_idle()
                continue
            if got is end:
                finished = True
                return
            if isinstance(got, BaseException):
                raise unwrap_task_error(got)
            last_item = time.monotonic()
            yield got
    finally:
        abandoned.set()
        if not finished:
            on_abandon()

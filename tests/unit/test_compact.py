"""Metadata compaction: every row exactly once, whatever point a crash interrupts it at."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdbatch.compact import RECORD, compact, live_files, repair
from sdbatch.output import read_parts
from sdbatch.store import LocalStore

PREFIX = "metadata/"


class Crash(Exception):
    pass


class CrashingStore(LocalStore):
    """A local store whose `crash_at`-th write, upload or delete raises instead."""

    def __init__(self, root, crash_at: int | None = None):
        super().__init__(str(root))
        self.crash_at, self.ops = crash_at, 0

    def _op(self) -> None:
        self.ops += 1
        if self.crash_at is not None and self.ops == self.crash_at:
            raise Crash(f"crash at operation {self.ops}")

    def write_bytes(self, key, data, content_type=None):
        self._op()
        super().write_bytes(key, data, content_type)

    def write_file(self, key, path, content_type=None):
        self._op()
        super().write_file(key, path, content_type)

    def delete(self, key):
        self._op()
        super().delete(key)


def write_part(store, name: str, ids: range, extra: bool = False) -> None:
    columns = {"id": [f"item-{i:05d}" for i in ids], "image_index": [0] * len(ids)}
    if extra:  # a later sdbatch added a column: older parts lack it
        columns["notes"] = ["n"] * len(ids)
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    store.write_bytes(f"{PREFIX}{name}", buf.getvalue())


def make_output(root) -> LocalStore:
    store = LocalStore(str(root))
    for n in range(7):  # 7 parts of 3 rows: 21 rows
        write_part(store, f"part-run1-{n:05d}.parquet", range(3 * n, 3 * n + 3), extra=n >= 5)
    return store


def rows(store) -> list[str]:
    return [i for t in read_parts(store, PREFIX, ["id"]) for i in t["id"].to_pylist()]


EXPECTED = [f"item-{i:05d}" for i in range(21)]


def test_compaction_bounds_rows_per_file_and_keeps_order_and_schema(tmp_path) -> None:
    store = make_output(tmp_path)
    files = compact(store, PREFIX, rows_per_file=5)
    assert len(files) == 5 and live_files(store, PREFIX) == files  # ceil(21 / 5)
    assert rows(store) == EXPECTED
    parquet = sorted(k for k in store.list(PREFIX) if k.endswith(".parquet"))
    assert parquet == files  # the parts are gone
    tables = [pq.read_table(tmp_path / f) for f in files]
    assert {t.schema for t in tables} == {tables[0].schema}
    assert "notes" in tables[0].column_names and max(t.num_rows for t in tables) == 5
    assert json.loads((tmp_path / PREFIX / RECORD).read_text())["replaces"] == []
    # Readable as is by another tool: one dataset, every row once.
    assert pq.read_table(tmp_path / "metadata").num_rows == 21
    # Again: nothing to do.
    assert compact(store, PREFIX, rows_per_file=5) == files


def test_a_crash_at_any_point_loses_nothing_and_counts_nothing_twice(tmp_path) -> None:
    total = None
    crash_at = 1
    while True:
        root = tmp_path / f"run-{crash_at}"
        make_output(root)
        store = CrashingStore(root, crash_at)
        try:
            compact(store, PREFIX, rows_per_file=4)
        except Crash:
            # What every sdbatch reader sees right after the crash ...
            assert rows(LocalStore(str(root))) == EXPECTED, f"crash at op {crash_at}"
            # ... and after the next run repairs and compacts.
            again = LocalStore(str(root))
            repair(again, PREFIX)
            assert rows(again) == EXPECTED
            files = compact(again, PREFIX, rows_per_file=4)
            assert rows(again) == EXPECTED and len(files) == 6
            leftovers = {k for k in again.list(PREFIX) if k.endswith(".parquet")} - set(files)
            assert not leftovers, f"crash at op {crash_at}: {leftovers}"
            crash_at += 1
            continue
        total = store.ops
        break
    assert crash_at > 10 and total == crash_at - 1  # every operation was a crash point


def test_parts_written_after_a_compaction_are_read_and_folded_in(tmp_path) -> None:
    store = make_output(tmp_path)
    compact(store, PREFIX, rows_per_file=10)
    write_part(store, "part-run2-00000.parquet", range(21, 25))  # a resumed, extended job
    write_part(store, "part-rerun-abc.parquet", range(25, 26))
    expected = [f"item-{i:05d}" for i in range(26)]
    assert sorted(rows(store)) == expected and len(rows(store)) == 26
    files = compact(store, PREFIX, rows_per_file=10)
    assert len(files) == 3 and sorted(rows(store)) == expected and len(rows(store)) == 26


def test_uncommitted_compaction_files_are_ignored_then_removed(tmp_path) -> None:
    store = make_output(tmp_path)
    write_part(store, "compact-deadbeef0000-00000.parquet", range(0, 21))  # never committed
    assert rows(store) == EXPECTED
    assert repair(store, PREFIX) == 1
    assert not store.exists(f"{PREFIX}compact-deadbeef0000-00000.parquet")


def test_compaction_on_s3(s3_server) -> None:
    from sdbatch.store import open_store

    bucket = s3_server.bucket("compact")
    store = open_store(f"s3://{bucket}/job", s3_server.storage())
    for n in range(4):
        write_part(store, f"part-run1-{n:05d}.parquet", range(3 * n, 3 * n + 3))
    files = compact(store, PREFIX, rows_per_file=5)
    assert len(files) == 3
    assert rows(store) == [f"item-{i:05d}" for i in range(12)]


@pytest.mark.parametrize("prefix", ["failures/"])
def test_prefixes_are_independent(tmp_path, prefix) -> None:
    store = make_output(tmp_path)
    compact(store, PREFIX, rows_per_file=100)
    assert live_files(store, prefix) == []


class CompactedMeanwhile(LocalStore):
    """A reader's view of an output that another process compacts (up to its `steps`-th
    write or delete) just before the reader's `at`-th read or listing."""

    def __init__(self, root, at: int, steps: int | None):
        super().__init__(str(root))
        self.root, self.at, self.steps, self.reads = root, at, steps, 0

    def _read(self) -> None:
        self.reads += 1
        if self.reads == self.at:
            try:
                compact(CrashingStore(self.root, self.steps), PREFIX, rows_per_file=4)
            except Crash:
                pass

    def read_bytes(self, key):
        self._read()
        return super().read_bytes(key)

    def open_input(self, key):
        self._read()
        return super().open_input(key)

    def list(self, prefix=""):
        self._read()
        return super().list(prefix)


def test_a_reader_beside_a_running_compaction_reads_every_row_once(tmp_path) -> None:
    """`status` or the gallery read while a finishing run compacts: whichever read the
    compaction lands before, and however far it gets, the reader sees each row once."""
    for steps in (1, 2, 4, 6, 7, 8, 10, None):  # None: the compaction completes
        for at in range(1, 12):
            root = tmp_path / f"s{steps}-a{at}"
            make_output(root)
            store = CompactedMeanwhile(root, at, steps)
            assert rows(store) == EXPECTED, f"compaction up to op {steps} before read {at}"

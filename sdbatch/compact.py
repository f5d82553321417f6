"""Metadata compaction: a finished job's rows in at most one Parquet file per 10⁶ rows.

During a run every commit writes a part (`metadata/part-<run>-NNNNN.parquet`, likewise
`failures/`): cheap and crash-safe, but a 10⁷-image job leaves ~40,000 small files that
pandas, DuckDB and `datasets` then open one by one. When a job completes, `compact`
rewrites the live files of a prefix, in order, into `compact-<token>-NNNNN.parquet` files
of at most ROWS_PER_FILE rows each (one schema, the union of the parts'), streaming one
part at a time, and then:

1. writes the record `<prefix>_COMPACTED.json` {token, files, replaces}: the commit point;
2. deletes the files it replaces;
3. rewrites the record with an empty `replaces`.

Which files hold the rows (`live_files`, used by every sdbatch reader): each `.parquet`
under the prefix, minus those the record says it replaces, minus `compact-*` files the
record does not list (a compaction that never reached step 1). So a crash at any point
leaves every row in exactly one live file: before step 1 the old files are live and the
new ones ignored, after it the reverse. `repair` (at the start of the next `run`, or
`status` while no run holds the lease) deletes what a crash left behind. Parts written
after a compaction (a resumed and extended job, `rerun`) are live beside its files and
folded in by the next one. Other tools see one consistent set once step 2 is done, as
`_SUCCESS` (written after compaction) lists the files.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from .store import Store

T = TypeVar("T")

RECORD = "_COMPACTED.json"
ROWS_PER_FILE = 1_000_000
ROW_GROUP_ROWS = 100_000  # rows per row group of a compacted file
READERS = 8
_PARQUET = "application/vnd.apache.parquet"


def _record(store: Store, prefix: str) -> dict[str, Any]:
    try:
        data = json.loads(store.read_bytes(prefix + RECORD))
    except FileNotFoundError:
        return {"files": [], "replaces": []}
    except ValueError as err:
        raise ValueError(f"{store.uri_of(prefix + RECORD)}: unreadable ({err})") from None
    return {"files": list(data.get("files", [])), "replaces": list(data.get("replaces", []))}


def live_files(store: Store, prefix: str) -> list[str]:
    """The Parquet files that hold `prefix`'s rows, each row in exactly one, in order."""
    record = _record(store, prefix)
    listed, gone = set(record["files"]), set(record["replaces"])
    live = []
    for key in sorted(store.list(prefix)):
        name = key[len(prefix) :]
        if not key.endswith(".parquet") or key in gone or "/" in name:
            continue
        if name.startswith("compact-") and key not in listed:
            continue  # written by a compaction that never committed
        live.append(key)
    return live


def read_live(
    store: Store, prefix: str, read: Callable[[str], T], keep: Callable[[str], bool] | None = None
) -> list[T]:
    """`read(key)` of each of `prefix`'s live files (those `keep` accepts), as one
    consistent set while a compaction may be running (`status` or the gallery beside a
    run that is finishing): when a file vanishes between the listing and its read, or the
    record changed meanwhile (the listing may mix both sides of step 1), read again from
    a fresh listing."""
    for _ in range(10):
        record = _record(store, prefix)
        try:
            results = [read(k) for k in live_files(store, prefix) if keep is None or keep(k)]
        except FileNotFoundError:
            continue
        if _record(store, prefix) == record:
            return results
    raise RuntimeError(f"{store.uri_of(prefix)}: files kept changing while being read")


def repair(store: Store, prefix: str) -> int:
    """Delete what an interrupted compaction left (uncommitted or replaced files); the
    number of files removed. Only while no other process may be compacting."""
    record = _record(store, prefix)
    live = set(live_files(store, prefix))
    stale = [
        k
        for k in store.list(prefix)
        if k.endswith(".parquet") and k not in live and "/" not in k[len(prefix) :]
    ]
    for key in stale:
        store.delete(key)
    if record["replaces"]:
        _write_record(store, prefix, record["files"], [])
    return len(stale)


def compact(store: Store, prefix: str, rows_per_file: int = ROWS_PER_FILE) -> list[str]:
    """Rewrite `prefix`'s live files into files of at most `rows_per_file` rows (see the
    module docstring); the live files after. Nothing to do when they are already the
    record's own."""
    repair(store, prefix)
    live = live_files(store, prefix)
    record = _record(store, prefix)
    if not live or set(live) <= set(record["files"]):
        return live
    schema = pa.unify_schemas(
        list(_in_order(lambda k: pq.read_schema(store.open_input(k)), live)),
        promote_options="default",
    )
    token = uuid.uuid4().hex[:12]
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sdbatch-compact-") as tmp:
        writer: pq.ParquetWriter | None = None
        rows_in_file = 0
        pending: list[pa.Table] = []  # one row group's worth, not a part's 250 rows
        path = os.path.join(tmp, "file.parquet")

        def write_group() -> None:
            nonlocal writer
            if not pending:
                return
            if writer is None:
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(pa.concat_tables(pending))
            pending.clear()

        def finish() -> None:
            nonlocal writer
            write_group()
            if writer is None:
                return
            writer.close()
            writer = None
            key = f"{prefix}compact-{token}-{len(written):05d}.parquet"
            store.write_file(key, path, content_type=_PARQUET)
            written.append(key)

        read = lambda k: _conform(pq.read_table(store.open_input(k)), schema)  # noqa: E731
        for table in _in_order(read, live):
            start = 0
            while start < table.num_rows:
                take = min(rows_per_file - rows_in_file, table.num_rows - start)
                pending.append(table.slice(start, take))
                rows_in_file += take
                start += take
                if rows_in_file >= rows_per_file:
                    finish()
                    rows_in_file = 0
                elif sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                    write_group()
        finish()
    _write_record(store, prefix, written, live)  # 1. the commit point
    for key in live:  # 2.
        store.delete(key)
    _write_record(store, prefix, written, [])  # 3.
    return written


def _in_order(fn: Callable[[str], Any], keys: list[str]) -> Iterator[Any]:
    """fn(key) for each key, in order, READERS at a time (a part is one small request:
    one after the other, 4,000 parts took 40 s locally, more on S3), at most 2 × READERS
    results held at once."""
    with ThreadPoolExecutor(READERS) as pool:
        for start in range(0, len(keys), 2 * READERS):
            yield from pool.map(fn, keys[start : start + 2 * READERS])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order (missing ones as nulls)."""
    columns = [
        table[f.name].cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _write_record(store: Store, prefix: str, files: list[str], replaces: list[str]) -> None:
    body = json.dumps({"files": files, "replaces": replaces}, indent=1).encode()
    store.write_bytes(prefix + RECORD, body, content_type="application/json")

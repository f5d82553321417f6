"""The commit stage without Ray: written blocks in, parts out; the watched stream; the
WebDataset shard packer."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdbatch.commit import Committer, Progress, Stalled, watched
from sdbatch.errors import StoreError
from sdbatch.output import FAILURES_PREFIX, METADATA_PREFIX
from sdbatch.store import LocalStore
from sdbatch.stream import pack, skipped_row
from sdbatch.write import METADATA_SCHEMA, UNSTORED, ShardPacker


def written(ids: list[int], failed: tuple[int, ...] = (), encoded: bool = False) -> pa.Table:
    """Rows as the write stage returns them."""
    rows = [
        {
            "id": f"item-{i:04d}",
            "row_id": f"item-{i:04d}",
            "image_index": 0,
            "key": f"images/item-{i:04d}_0.png",
            "status": "failed" if i in failed else "ok",
            "error": "boom" if i in failed else None,
            "render_seconds": 0.5,
            "sha256": f"{i:064x}",
            "width": 8,
            "height": 8,
            "created_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
        }
        for i in ids
    ]
    table = pa.Table.from_pylist(
        [{n: r.get(n) for n in METADATA_SCHEMA.names} for r in rows], schema=METADATA_SCHEMA
    )
    if encoded:
        table = table.append_column(
            "encoded", pa.array([None if i in failed else b"img%d" % i for i in ids], pa.binary())
        )
    return table


def rows_of(store: LocalStore, prefix: str) -> list[str]:
    ids: list[str] = []
    for key in sorted(store.list(prefix)):
        ids += pq.read_table(io.BytesIO(store.read_bytes(key)))["id"].to_pylist()
    return ids


def committer(store, progress=None, rows=1000, seconds=3600.0, lease=lambda: None) -> Committer:
    return Committer(
        store,
        "run1",
        progress or Progress(total=100),
        commit_rows=rows,
        commit_seconds=seconds,
        check_lease=lease,
    )


def test_committer_splits_ok_and_failed_rows_into_parts(tmp_path) -> None:
    store = LocalStore(str(tmp_path))
    progress = Progress(total=10)
    c = committer(store, progress, rows=4)
    c.add(pa.concat_tables([pack(written([0, 1, 2], failed=(1,))), skipped_row(3)]))
    assert not c.parts  # 3 rows < commit_rows
    c.add(pack(written([3, 4])))
    assert len(c.parts) == 2  # a metadata and a failures part, as soon as 4 rows waited
    c.add(skipped_row(2))
    c.flush()
    assert rows_of(store, METADATA_PREFIX) == ["item-0000", "item-0002", "item-0003", "item-0004"]
    assert rows_of(store, FAILURES_PREFIX) == ["item-0001"]
    assert (progress.done, progress.failed, c.skipped, progress.committed) == (4, 1, 5, 4)
    assert progress.actor_seconds == pytest.approx(2.0)


def test_committer_never_writes_encoded_bytes_and_flushes_when_due(tmp_path) -> None:
    store = LocalStore(str(tmp_path))
    c = committer(store, seconds=0.05)
    c.add(pack(written([0, 1], failed=(0,), encoded=True)))
    assert not c.due() or not c.parts
    time.sleep(0.1)
    assert c.due()
    c.flush()
    assert not c.due()
    for key in store.list(METADATA_PREFIX):
        assert "encoded" not in pq.read_table(io.BytesIO(store.read_bytes(key))).column_names
    c.flush()  # nothing pending: no empty part
    assert len(c.parts) == 2


def test_committer_checks_the_lease_before_every_part(tmp_path) -> None:
    store = LocalStore(str(tmp_path))

    def lost() -> None:
        raise RuntimeError("lease lost")

    c = committer(store, lease=lost)
    c.flush()  # nothing to commit: the lease is not needed
    c.add(pack(written([0])))
    with pytest.raises(RuntimeError, match="lease lost"):
        c.flush()
    assert not list(store.list(METADATA_PREFIX))


def test_watched_yields_everything_then_ends() -> None:
    assert list(watched(lambda: iter(range(5)), watchdog_seconds=10)) == list(range(5))


def test_watched_raises_stalled_and_abandons_the_stream() -> None:
    release = threading.Event()
    abandoned = []

    def slow():
        yield 1
        release.wait(10)
        yield 2

    got = []
    with pytest.raises(Stalled, match="nothing for 1 s"):
        for item in watched(
            slow,
            watchdog_seconds=1,
            stall_report=lambda s: f"nothing for {s:g} s",
            on_abandon=lambda: abandoned.append(True),
        ):
            got.append(item)
    release.set()
    assert got == [1] and abandoned == [True]


def test_watched_calls_idle_and_stop_while_waiting() -> None:
    idle = []
    stop = threading.Event()

    def never():
        stop.wait(10)
        yield from ()

    def check_stop() -> None:
        if len(idle) >= 2:
            stop.set()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(
            watched(
                never, watchdog_seconds=0, on_idle=lambda: idle.append(1), check_stop=check_stop
            )
        )
    assert len(idle) == 2


def test_watched_reraises_a_store_error_as_its_one_line() -> None:
    def failing():
        yield 1
        raise StoreError("/out/images/x.png: cannot write: No space left on device")

    it = watched(failing, watchdog_seconds=10)
    assert next(it) == 1
    with pytest.raises(StoreError, match="No space left"):
        next(it)


def members(store: LocalStore, key: str) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(key))) as tar:
        return tar.getnames()


def test_shard_packer_closes_full_shards_and_packs_each_item_once(tmp_path) -> None:
    store = LocalStore(str(tmp_path / "out"))
    packer = ShardPacker(str(tmp_path / "out"), None, "run1", 3, "png")
    closed = packer.add(written([0, 1], encoded=True))
    assert closed == []
    # A retried write task hands item 1 again: packed once.
    closed = packer.add(written([1, 2, 3], encoded=True))
    assert [t["id"].to_pylist() for t in closed] == [["item-0000", "item-0001", "item-0002"]]
    assert closed[0]["image_uri"][0].as_py().endswith("shards/run1-00000.tar#item-0000_0.png")
    assert members(store, "shards/run1-00000.tar") == [
        "item-0000_0.png",
        "item-0000_0.json",
        "item-0001_0.png",
        "item-0001_0.json",
        "item-0002_0.png",
        "item-0002_0.json",
    ]
    open_shard = packer.path
    last = packer.close()
    assert last["id"].to_pylist() == ["item-0003"]
    assert packer.close().num_rows == 0
    assert sorted(store.list("shards/")) == ["shards/run1-00000.tar", "shards/run1-00001.tar"]
    # The open shard lived in a temporary file (not in memory), gone once uploaded.
    assert open_shard.endswith(".tar") and not os.path.exists(open_shard)


def test_rows_the_output_could_not_store_stop_the_job_after_committing_the_rest(
    tmp_path,
) -> None:
    store = LocalStore(str(tmp_path))
    progress = Progress(total=10)
    c = committer(store, progress)
    block = written([0, 1, 2, 3], failed=(1,))
    status = block["status"].to_pylist()
    status[2:] = [UNSTORED, UNSTORED]
    messages = [None, "boom", "/out/images/x.png: cannot write: No space left on device", "same"]
    block = block.set_column(block.schema.get_field_index("status"), "status", pa.array(status))
    block = block.set_column(
        block.schema.get_field_index("error_message"), "error_message", pa.array(messages)
    )
    with pytest.raises(StoreError, match="x.png: cannot write: No space left on device"):
        c.add(pack(block))
    # What was stored is committed at once; the unstored items are neither done nor
    # failures (they render again on resume).
    assert rows_of(store, METADATA_PREFIX) == ["item-0000"]
    assert rows_of(store, FAILURES_PREFIX) == ["item-0001"]
    assert (progress.done, progress.failed, progress.committed) == (1, 1, 1)

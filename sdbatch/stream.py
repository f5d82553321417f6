"""The streaming plan: manifest fragments become planned blocks inside Ray Data tasks.

The driver never materialises the plan. It cuts the manifest into fragments (runs of
Parquet row groups, from the file's footer) and hands Ray Data one row per fragment;
a CPU task per fragment reads only its rows, expands them into items (`plan.expand_row`:
seeds and keys as ever), drops what is done and cuts homogeneous blocks as they fill
(`plan.homogeneous_blocks`), so rendering starts as soon as the first block is cut,
whatever the manifest's size. The done set travels as one Arrow table (id, image_index,
row_id) in the object store; each task keeps only its own fragment's rows of it.

A planned block is one Ray Data *row* from there on (`pack`: the block's Arrow IPC bytes
in a `block` column): Ray Data coalesces and splits blocks by bytes, which would mix
batch keys and hand a small job's whole plan to one actor, but it never splits a row.
With `ROW_PER_BLOCK` bytes as its target block size every row is its own Ray block, so
each stage (prepare, render, write) gets exactly one planned block per call, and the
actor pool balances block by block as before. A plan task ends its fragment with a row
whose `skipped` says how many of its items were already done.
"""

from __future__ import annotations

import io
import pickle
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .plan import ITEM_SCHEMA, expand_row, homogeneous_blocks, manifest_base

# Manifest rows per planning task (whole row groups: a larger row group is one fragment).
FRAGMENT_ROWS = 50_000
READ_ROWS = 4096
# DataContext.target_max_block_size for a job: every row (a planned block) its own block.
ROW_PER_BLOCK = 1
BLOCK_SCHEMA = pa.schema([("block", pa.binary()), ("skipped", pa.int64())])
DONE_SCHEMA = pa.schema([("id", pa.string()), ("image_index", pa.int32()), ("row_id", pa.string())])


def fragments(pf: pq.ParquetFile, target_rows: int = FRAGMENT_ROWS) -> list[dict[str, Any]]:
    """Runs of consecutive row groups of about `target_rows` rows: one planning task each."""
    out: list[dict[str, Any]] = []
    groups: list[int] = []
    rows = 0
    for i in range(pf.metadata.num_row_groups):
        groups.append(i)
        rows += pf.metadata.row_group(i).num_rows
        if rows >= target_rows:
            out.append({"fragment": len(out), "row_groups": groups})
            groups, rows = [], 0
    if groups:
        out.append({"fragment": len(out), "row_groups": groups})
    return out


def pack(table: pa.Table) -> pa.Table:
    """One planned (or prepared, rendered, written) block as a one-row table."""
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.table({"block": [sink.getvalue()], "skipped": [0]}, schema=BLOCK_SCHEMA)


def skipped_row(count: int) -> pa.Table:
    return pa.table({"block": [None], "skipped": [count]}, schema=BLOCK_SCHEMA)


def unpack(batch: pa.Table) -> Iterator[tuple[pa.Table | None, int]]:
    """(block, skipped) per row of a batch of packed rows; block is None on a count row."""
    for data, skipped in zip(batch["block"].to_pylist(), batch["skipped"].to_pylist(), strict=True):
        if data is None:
            yield None, int(skipped or 0)
        else:
            yield pa.ipc.open_stream(data).read_all(), 0


def per_block(fn: Callable[[pa.Table], pa.Table], batch: pa.Table) -> pa.Table:
    """Apply a stage's function (a table of items in, a table out) to each packed block;
    count rows pass through unchanged."""
    rows = []
    for block, skipped in unpack(batch):
        rows.append(skipped_row(skipped) if block is None else pack(fn(block)))
    return pa.concat_tables(rows) if rows else BLOCK_SCHEMA.empty_table()


def prepare_blocks(batch: pa.Table, **kwargs: Any) -> pa.Table:
    from .prepare import prepare_batch

    return per_block(lambda t: prepare_batch(t, **kwargs), batch)


def write_blocks(
    batch: pa.Table, *, packer: Any = None, gate: Any = None, **kwargs: Any
) -> pa.Table:
    """The write stage. With a `packer` (the job's `write.ShardPacker` actor) finished
    images go into its shards, and the rows of shards it closes come back instead. With
    a `gate` (the job's PlanGate), each block written lets the plan go on."""
    from .write import write_batch

    def write(block: pa.Table) -> pa.Table:
        table = write_batch(block, **kwargs)
        if gate is not None:
            call_actor(gate.received, block.num_rows)
        if packer is None:
            return table
        ok = pc.equal(table["status"], "ok")
        closed = call_actor(packer.add, table.filter(ok))
        failed = table.filter(pc.invert(ok)).drop_columns(["encoded"])
        return pa.concat_tables([failed, *closed])

    return per_block(write, batch)


def call_actor(method: Any, *args: Any) -> Any:
    """`ray.get(method.remote(*args))`; a StoreError raised in the actor as itself (one
    line), not wrapped in Ray's traceback."""
    import ray

    from .store import unwrap_task_error

    try:
        return ray.get(method.remote(*args))
    except ray.exceptions.RayTaskError as err:
        raise unwrap_task_error(err) from None


class PlanGate:
    """Keeps the streamed plan at most `ahead` items in front of what the driver has
    received (a Ray actor; one per job).

    Ray Data throttles a stage by the bytes it has queued, and planned blocks are a few
    KB: unthrottled, the plan task ran thousands of blocks ahead of the actors (measured:
    166 blocks queued within 40 s on 2 cores), taking a core from rendering on CPU nodes
    and, at 10⁷ items, filling the object store with plan. A plan task asks `admit`
    before each block it emits; the write stage reports each block it wrote (`received`;
    not the driver, which sees a WebDataset shard's rows only when the shard closes).
    """

    def __init__(self, ahead: int):
        import asyncio

        self.ahead, self.planned, self.back = ahead, 0, 0
        self.moved = asyncio.Condition()

    async def admit(self, items: int) -> None:
        async with self.moved:
            await self.moved.wait_for(lambda: self.planned - self.back < self.ahead)
            self.planned += items

    async def received(self, items: int) -> None:
        async with self.moved:
            self.back += items
            self.moved.notify_all()


class RayKV:
    """Ray's key-value store in the GCS (where Ray's own libraries keep small shared
    state): the driver and every actor on every node reach it, and it needs no process of
    its own. Keys live under the `sdbatch` namespace."""

    NAMESPACE = "sdbatch"

    def get(self, key: str) -> bytes | None:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(key, namespace=self.NAMESPACE)

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, value, overwrite=True, namespace=self.NAMESPACE)

    def delete(self, key: str, *, prefix: bool = False) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(key, del_by_prefix=prefix, namespace=self.NAMESPACE)

    def keys(self, prefix: str) -> list[str]:
        from ray.experimental.internal_kv import _internal_kv_list

        return sorted(k.decode() for k in _internal_kv_list(prefix, namespace=self.NAMESPACE))


def begin_block(prefix: str, actor: str, items: list[dict[str, Any]], kv: Any = None) -> None:
    """A render actor takes a block (`InFlight`). A block of this actor still open means
    the previous one never ended: it died with the process (Ray restarts an actor under
    the same id), so it is kept as a dead block."""
    kv = kv or RayKV()
    held = kv.get(f"{prefix}open/{actor}")
    if held is not None:
        kv.put(f"{prefix}dead/{actor}/{uuid.uuid4().hex}", held)
    kv.put(f"{prefix}open/{actor}", pickle.dumps(items))
    begun = kv.get(f"{prefix}begun/{actor}")  # this actor id is its only writer
    kv.put(f"{prefix}begun/{actor}", str(int(begun or 0) + len(items)).encode())


def end_block(prefix: str, actor: str, kv: Any = None) -> None:
    """The render actor's block is done (its rows go back to the driver)."""
    (kv or RayKV()).delete(f"{prefix}open/{actor}")


class InFlight:
    """Which items each render actor has in hand, and how often items were in hand when
    their actor's process died (one per run, in the driver).

    A render actor calls `begin_block` before each block and `end_block` after it; both
    write to Ray's key-value store under this run's `prefix` (no actor of its own: one
    process less per job). `crashed`, called by the driver when a pass was lost, counts
    the blocks that died with their actor, and those still open then. An item that keeps
    killing its actor is found this way, rendered alone, and then failed (`runner`).

    It also counts the items handed to render actors between two `tally` calls (one per
    pass): what a pass handed out and did not commit was rendered for nothing and renders
    again.
    """

    def __init__(self, run_id: str, kv: Any = None) -> None:
        self.prefix = f"in-flight/{run_id}/"
        self.kv = kv or RayKV()
        # (id, image_index) -> [crashes, crashes while alone in its block, the item]
        self.crashes: dict[tuple[str, int], list[Any]] = {}
        self.counted = 0  # items begun up to the last tally

    def tally(self) -> int:
        """Items begun since the last call."""
        keys = self.kv.keys(f"{self.prefix}begun/")
        begun = sum(int(self.kv.get(key) or 0) for key in keys)
        since, self.counted = begun - self.counted, begun
        return since

    def crashed(self) -> dict[tuple[str, int], list[Any]]:
        for key in self.kv.keys(f"{self.prefix}dead/") + self.kv.keys(f"{self.prefix}open/"):
            held = self.kv.get(key)
            if held is not None:
                self._count(pickle.loads(held))
            self.kv.delete(key)
        return self.crashes

    def forget(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            self.crashes.pop(key, None)

    def close(self) -> None:
        """Drop this run's keys (the run is over)."""
        self.kv.delete(self.prefix, prefix=True)

    def _count(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            entry = self.crashes.setdefault((item["id"], item["image_index"]), [0, 0, item])
            entry[0] += 1
            entry[1] += len(items) == 1


def fragment_done(done: pa.Table | None, row_ids: pa.Array) -> set[tuple[str, int]]:
    """The (id, image_index) pairs of `done` whose manifest row is one of `row_ids`."""
    if done is None or not done.num_rows:
        return set()
    mine = done.filter(pc.is_in(done["row_id"], value_set=row_ids))
    return set(zip(mine["id"].to_pylist(), mine["image_index"].to_pylist(), strict=True))


def plan_fragment(
    batch: pa.Table,
    *,
    spec: Any,
    columns: list[str],
    storage: dict[str, Any] | None,
    families: dict[str, str | None],
    block_rows: int,
    done: Any = None,
    only: Any = None,
    gate: Any = None,
    first_blocks: int = 0,
    alone: list[tuple[str, int]] | None = None,
) -> Iterator[pa.Table]:
    """The planned blocks of the manifest fragments in `batch` (rows of `fragments`), as
    packed rows; then one count row per fragment. `done` / `only`: object refs (or
    tables) of DONE_SCHEMA: skip the former; with `only`, plan nothing else. `gate`: the
    job's PlanGate actor, asked before each block. The first fragment's first
    `first_blocks` blocks hold one pipeline call (`batch_size` items) each; each item of
    `alone` (id, image_index) is a block of its own."""
    import ray

    from .manifest import _open

    done_table = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    only_table = ray.get(only) if isinstance(only, ray.ObjectRef) else only
    pf = _open(spec.manifest, storage)
    base = manifest_base(spec.manifest)
    suspects = {(str(i), int(k)) for i, k in alone or ()}

    def by_itself(item: dict[str, Any]) -> bool:
        return bool(suspects) and (item["id"], item["image_index"]) in suspects

    for fragment, groups in zip(
        batch["fragment"].to_pylist(), batch["row_groups"].to_pylist(), strict=True
    ):
        row_ids = pf.read_row_groups(groups, columns=["id"])["id"].combine_chunks()
        skip = fragment_done(done_table, row_ids)
        keep = None if only_table is None else fragment_done(only_table, row_ids) - skip
        del row_ids
        skipped = [0]
        rows = (
            row
            for record in pf.iter_batches(batch_size=READ_ROWS, row_groups=groups, columns=columns)
            for row in record.to_pylist()
        )
        items = _wanted(rows, spec, base, families, skip, keep, skipped)
        first = (first_blocks, spec.batch_size) if fragment == 0 else (0, 0)
        for block in homogeneous_blocks(items, block_rows, first, by_itself):
            if gate is not None:
                ray.get(gate.admit.remote(len(block)))
            yield pack(pa.Table.from_pylist(block, schema=ITEM_SCHEMA))
        yield skipped_row(skipped[0])


def _wanted(
    rows: Iterator[dict[str, Any]],
    spec: Any,
    base: str,
    families: dict[str, str | None],
    skip: set[tuple[str, int]],
    keep: set[tuple[str, int]] | None,
    skipped: list[int],
) -> Iterator[dict[str, Any]]:
    """The items of `rows` to render: not in `skip`, and in `keep` unless it is None;
    `skipped[0]` counts the others."""
    # A row whose every image is done is counted without expanding it (seeds, keys):
    # resuming after a long done prefix spent ~1.5 s per done fragment expanding items
    # only to drop them (a sweep's items have other ids: those rows are expanded).
    fast = bool(skip) and not spec.sweep
    default_n = spec.defaults.num_images
    for row in rows:
        if fast:
            row_id, n = str(row["id"]), int(row.get("num_images") or default_n)
            if all((row_id, k) in skip for k in range(n)):
                skipped[0] += n
                continue
        for item in expand_row(row, spec, base, families.get):
            key = (item["id"], item["image_index"])
            if key in skip or (keep is not None and key not in keep):
                skipped[0] += 1
            else:
                yield item


def done_table(store: Any, metadata_prefix: str, listed: tuple[str, ...]) -> pa.Table:
    """(id, image_index, row_id) of every item with a metadata row whose image exists,
    once each, as Arrow: one listing of `listed` prefixes, no Python object per item."""
    from .compact import read_live

    chunks: list[pa.Array] = []
    names: list[str] = []
    for prefix in listed:
        for key in store.list(prefix):
            names.append(key)
            if len(names) >= 100_000:
                chunks.append(pa.array(names, pa.string()))
                names = []
    chunks.append(pa.array(names, pa.string()))
    stored = pa.chunked_array(chunks, pa.string()).combine_chunks()
    del chunks, names

    def read(key: str) -> pa.Table:
        t = pq.read_table(store.open_input(key), columns=["id", "image_index", "row_id", "key"])
        t = t.filter(pc.is_in(t["key"], value_set=stored))
        return t.select(["id", "image_index", "row_id"]).cast(DONE_SCHEMA)

    parts = read_live(store, metadata_prefix, read)
    if not parts:
        return DONE_SCHEMA.empty_table()
    return unique(pa.concat_tables(parts))


def unique(table: pa.Table) -> pa.Table:
    return table.group_by(list(table.column_names), use_threads=False).aggregate([])


def anti_join(left: pa.Table, right: pa.Table) -> pa.Table:
    """Rows of `left` whose (id, image_index) is not in `right`."""
    if not right.num_rows or not left.num_rows:
        return left
    return left.join(
        right.select(["id", "image_index"]), ["id", "image_index"], join_type="left anti"
    )

"""The streaming plan's pieces without Ray: fragments, packed blocks, planning one
fragment, the Arrow done set."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdbatch.plan import plan_items
from sdbatch.spec import parse_spec
from sdbatch.store import open_store
from sdbatch.stream import (
    BLOCK_SCHEMA,
    DONE_SCHEMA,
    anti_join,
    done_table,
    fragments,
    pack,
    per_block,
    plan_fragment,
    skipped_row,
    unpack,
)

COLUMNS = ["id", "prompt", "num_images", "steps", "width"]


def manifest(tmp_path, rows: int, row_group: int) -> str:
    path = tmp_path / "m.parquet"
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "prompt": [f"prompt {i}" for i in range(rows)],
            "num_images": [1 + i % 3 for i in range(rows)],
            # Three batch keys, interleaved: blocks must still be homogeneous.
            "steps": [2 + i % 3 for i in range(rows)],
            "width": [64] * rows,
        }
    )
    pq.write_table(table, path, row_group_size=row_group)
    return str(path)


def job(path: str, **kw):
    return parse_spec(
        {"name": "t", "manifest": path, "output": "/o", "model": "/m", "seed": 7, **kw}
    )


def plan_all(spec, done=None, only=None, block_rows=4, target_rows=25):
    pf = pq.ParquetFile(spec.manifest)
    blocks, skipped = [], 0
    for part in fragments(pf, target_rows):
        batch = pa.Table.from_pylist([part])
        for row in plan_fragment(
            batch, spec=spec, columns=COLUMNS, storage=None, families={},
            block_rows=block_rows, done=done, only=only,
        ):  # fmt: skip
            for block, count in unpack(row):
                if block is None:
                    skipped += count
                else:
                    blocks.append(block)
    return blocks, skipped


def items_of(blocks) -> dict[tuple[str, int], dict]:
    out = {}
    for block in blocks:
        for item in block.to_pylist():
            key = (item["id"], item["image_index"])
            assert key not in out, f"{key} planned twice"
            out[key] = item
    return out


def test_fragments_are_runs_of_whole_row_groups(tmp_path) -> None:
    pf = pq.ParquetFile(manifest(tmp_path, 100, 10))
    parts = fragments(pf, 25)
    assert [p["row_groups"] for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [p["fragment"] for p in parts] == [0, 1, 2, 3]
    # A row group larger than the target is a fragment of its own, never split.
    assert [p["row_groups"] for p in fragments(pf, 1)] == [[i] for i in range(10)]


def test_pack_unpack_round_trip_and_count_rows_pass_through() -> None:
    table = pa.table({"id": ["a", "b"], "image_index": pa.array([0, 1], pa.int32())})
    batch = pa.concat_tables([pack(table), skipped_row(5), pack(table.slice(1))])
    assert batch.schema == BLOCK_SCHEMA
    got = list(unpack(batch))
    assert got[0][0].equals(table) and got[0][1] == 0
    assert got[1] == (None, 5)
    assert got[2][0].equals(table.slice(1))
    doubled = per_block(lambda t: t.append_column("x", pa.array([1] * t.num_rows)), batch)
    blocks = list(unpack(doubled))
    assert blocks[1] == (None, 5)
    assert blocks[0][0].column_names == ["id", "image_index", "x"]
    assert per_block(lambda t: t, BLOCK_SCHEMA.empty_table()).num_rows == 0


def test_fragment_plan_equals_the_whole_manifest_plan(tmp_path) -> None:
    spec = job(manifest(tmp_path, 100, 10))
    blocks, skipped = plan_all(spec)
    assert skipped == 0
    whole = {
        (it["id"], it["image_index"]): it
        for it in plan_items(pq.read_table(spec.manifest).to_pylist(), spec)
    }
    got = items_of(blocks)
    assert set(got) == set(whole)
    for key, item in whole.items():
        assert got[key]["seed"] == item["seed"] and got[key]["key"] == item["key"], key
        assert got[key]["batch_key"] == item["batch_key"]
    for block in blocks:
        assert len(set(block["batch_key"].to_pylist())) == 1
        assert block.num_rows <= 4


def test_done_items_are_skipped_and_counted(tmp_path) -> None:
    spec = job(manifest(tmp_path, 60, 7))
    everything = items_of(plan_all(spec)[0])
    done_keys = sorted(everything)[::3]
    done = pa.table(
        {
            "id": [k[0] for k in done_keys],
            "image_index": pa.array([k[1] for k in done_keys], pa.int32()),
            "row_id": [k[0] for k in done_keys],
        },
        schema=DONE_SCHEMA,
    )
    blocks, skipped = plan_all(spec, done=done)
    assert skipped == len(done_keys)
    assert set(items_of(blocks)) == set(everything) - set(done_keys)
    # only: exactly the asked items that are not done.
    asked = sorted(everything)[:10]
    only = pa.table(
        {
            "id": [k[0] for k in asked],
            "image_index": pa.array([k[1] for k in asked], pa.int32()),
            "row_id": [k[0] for k in asked],
        },
        schema=DONE_SCHEMA,
    )
    blocks, skipped = plan_all(spec, done=done, only=only)
    assert set(items_of(blocks)) == set(asked) - set(done_keys)
    assert skipped == len(everything) - len(items_of(blocks))


def test_done_table_needs_the_image_and_counts_each_item_once(tmp_path) -> None:
    store = open_store(str(tmp_path / "out"))
    rows = {
        "id": ["a", "a", "b", "c", "a"],
        "image_index": pa.array([0, 1, 0, 0, 0], pa.int32()),
        "row_id": ["a", "a", "b", "c", "a"],
        "key": [
            "images/a-0.png",
            "images/a-1.png",
            "images/b-0.png",
            "images/c-0.png",
            "images/a-0.png",
        ],
    }
    table = pa.table(rows)
    for i, part in enumerate((table.slice(0, 3), table.slice(3))):
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        store.write_bytes(f"metadata/part-x-{i:05d}.parquet", sink.getvalue().to_pybytes())
    for key in ("images/a-0.png", "images/b-0.png", "images/c-0.png"):
        store.write_bytes(key, b"png")
    done = done_table(store, "metadata/", ("images/",))
    assert done.schema == DONE_SCHEMA
    assert sorted(zip(done["id"].to_pylist(), done["image_index"].to_pylist(), strict=True)) == [
        ("a", 0),
        ("b", 0),
        ("c", 0),
    ]
    assert done_table(open_store(str(tmp_path / "empty")), "metadata/", ("images/",)).num_rows == 0


@pytest.mark.parametrize("right_rows", [0, 2])
def test_anti_join(right_rows) -> None:
    left = pa.table(
        {
            "id": ["a", "b", "c"],
            "image_index": pa.array([0, 0, 1], pa.int32()),
            "row_id": ["a", "b", "c"],
        },
        schema=DONE_SCHEMA,
    )
    right = left.slice(0, right_rows)
    kept = anti_join(left, right)
    assert sorted(kept["id"].to_pylist()) == ["a", "b", "c"][right_rows:]


def _peak_python_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_planning_memory_is_per_fragment_not_per_manifest(tmp_path) -> None:
    """A plan task's Python memory depends on its fragment, not on the manifest or on the
    whole job's done set: planning 2,000 rows of a 40,000-row manifest with half of the
    job done costs about what it costs in a 4,000-row one."""

    def peak(rows: int) -> int:
        folder = tmp_path / str(rows)
        folder.mkdir()
        spec = job(manifest(folder, rows, 2000))
        done = pa.table(
            {
                "id": [f"r{i}" for i in range(0, rows, 2)],
                "image_index": pa.array([0] * (rows // 2), pa.int32()),
                "row_id": [f"r{i}" for i in range(0, rows, 2)],
            }
        )
        fragment = pa.Table.from_pylist([fragments(pq.ParquetFile(spec.manifest), 2000)[1]])

        def plan_one() -> None:
            for _ in plan_fragment(
                fragment, spec=spec, columns=COLUMNS, storage=None, families={},
                block_rows=8, done=done,
            ):  # fmt: skip
                pass

        plan_one()  # imports and caches first
        return _peak_python_bytes(plan_one)

    small, large = peak(4_000), peak(40_000)
    assert large < 1.3 * small + 200_000, (small, large)


def test_the_first_block_comes_before_the_fragment_is_expanded(tmp_path) -> None:
    """Within a fragment too, blocks stream out as they fill: taking the first block of a
    50,000-row fragment costs about what it costs in a 5,000-row one (both read READ_ROWS
    rows at a time)."""

    def first_block_peak(rows: int) -> int:
        folder = tmp_path / f"f{rows}"
        folder.mkdir()
        spec = job(manifest(folder, rows, rows))
        fragment = pa.Table.from_pylist(fragments(pq.ParquetFile(spec.manifest), rows))

        def first() -> None:
            gen = plan_fragment(
                fragment, spec=spec, columns=COLUMNS, storage=None, families={}, block_rows=8
            )
            next(gen)
            gen.close()

        first()
        # The lower of two: a test run before this one in the same process can leave
        # work (a lazy import, a cache filling) to land inside one measurement.
        return min(_peak_python_bytes(first) for _ in range(2))

    small, large = first_block_peak(5_000), first_block_peak(50_000)
    assert large < 1.5 * small + 200_000, (small, large)


class DictKV:
    """Ray's key-value store as a dict (`stream.RayKV`'s four calls), for tests without
    Ray; the jobs in tests/integration use the real one."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: str, *, prefix: bool = False) -> None:
        for k in [k for k in self.data if k == key or (prefix and k.startswith(key))]:
            del self.data[k]

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


def test_in_flight_counts_what_each_pass_handed_out() -> None:
    """A pass hands out 4 blocks; actor a dies with its block and Ray restarts it (the
    same id begins again), b's second block is in hand when the pass is lost. The driver commits
    4 of the 7 items handed out: 3 render again (`runner._tally`)."""
    from sdbatch.stream import InFlight, begin_block, end_block

    def items(*ids: str) -> list[dict]:
        return [{"id": i, "image_index": 0} for i in ids]

    kv = DictKV()
    in_flight = InFlight("run-1", kv)
    other_run = InFlight("run-2", kv)  # another run on the same Ray: its own keys
    begin_block(other_run.prefix, "a", items("q1"), kv)

    def begin(actor: str, block: list[dict]) -> None:
        begin_block(in_flight.prefix, actor, block, kv)

    begin("a", items("x1", "x2"))
    begin("b", items("y1", "y2"))
    end_block(in_flight.prefix, "b", kv)
    begin("a", items("x1", "x2"))  # a's process died: Ray retried its block
    end_block(in_flight.prefix, "a", kv)
    begin("b", items("z1"))  # in hand when the node goes
    begun = in_flight.tally()
    assert begun == 7
    assert max(0, begun - 4) == 3  # x1, x2 once more; z1
    crashes = in_flight.crashed()
    assert {key: entry[:2] for key, entry in crashes.items()} == {
        ("x1", 0): [1, 0],
        ("x2", 0): [1, 0],
        ("z1", 0): [1, 1],
    }
    assert in_flight.tally() == 0  # per pass
    assert in_flight.crashed() == crashes  # counted once
    in_flight.forget([("z1", 0)])
    assert set(in_flight.crashed()) == {("x1", 0), ("x2", 0)}
    in_flight.close()  # the run is over: its keys go, the other run's stay
    assert kv.keys("") == kv.keys(other_run.prefix) != []

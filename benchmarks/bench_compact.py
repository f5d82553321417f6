"""Metadata compaction (issue 14 §2): seconds per 10⁶ rows, files left, driver memory.

    .venv/bin/python benchmarks/bench_compact.py [--quick] [--rows 1000000] [--part-rows 250]

Synthetic metadata: parts of `--part-rows` rows (what a run commits with the default
commit settings, ~250 items per part) in the real metadata schema
(`write.METADATA_SCHEMA`), every string column filled with 40-80 characters of text (a
prompt-sized value), numbers and timestamps set, the rest null; written into a local
output's `metadata/` with pyarrow. Then `compact.compact` runs on it and is timed, with
the process's peak RSS before and after (compaction streams one part at a time, so its
memory must not grow with the row count). Read back with `read_parts` to check every row
is there exactly once.
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import time

import _common as c

BENCH = "compact"


def synthetic_part(schema, rows: int, start: int):
    import pyarrow as pa

    columns = []
    for f in schema:
        t = f.type
        if f.name == "id":
            columns.append(pa.array([f"item-{start + i:09d}" for i in range(rows)], t))
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            text = [
                f"a photo of subject {start + i}, detailed, style {i % 97}" for i in range(rows)
            ]
            columns.append(pa.array(text, t))
        elif pa.types.is_integer(t):
            columns.append(pa.array([(start + i) % 1000 for i in range(rows)], t))
        elif pa.types.is_floating(t):
            columns.append(pa.array([0.5 + i % 7 for i in range(rows)], t))
        else:
            columns.append(pa.nulls(rows, t))
    return pa.Table.from_arrays(columns, schema=schema)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--part-rows", type=int, default=250)
    args = parser.parse_args()
    if args.quick:
        args.rows = 20_000
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdbatch.compact import compact, live_files
    from sdbatch.output import METADATA_PREFIX, read_parts
    from sdbatch.store import LocalStore
    from sdbatch.write import METADATA_SCHEMA

    config = {"rows": args.rows, "part_rows": args.part_rows}
    c.header(f"{BENCH}: metadata compaction", config)
    work = c.workdir(BENCH)
    store = LocalStore(str(work / "out"))
    t0 = time.perf_counter()
    template = synthetic_part(METADATA_SCHEMA, args.part_rows, 0)
    id_column = METADATA_SCHEMA.get_field_index("id")
    parts = 0
    for start in range(0, args.rows, args.part_rows):
        n = min(args.part_rows, args.rows - start)
        ids = pa.array([f"item-{start + i:09d}" for i in range(n)], pa.string())
        table = template.slice(0, n).set_column(id_column, "id", ids)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_bytes(f"{METADATA_PREFIX}part-bench-{parts:06d}.parquet", buf.getvalue())
        parts += 1
    made = time.perf_counter() - t0
    before = peak_rss_mib()
    t1 = time.perf_counter()
    files = compact(store, METADATA_PREFIX)
    seconds = time.perf_counter() - t1
    after = peak_rss_mib()
    counted = sum(t.num_rows for t in read_parts(store, METADATA_PREFIX, ["id"]))
    per_million = seconds / args.rows * 1e6
    c.table(
        ["parts before", "files after", "rows read back", "compact s", "s per 10⁶ rows",
         "peak RSS before MiB", "peak RSS after MiB"],
        [[parts, len(live_files(store, METADATA_PREFIX)), counted, seconds, per_million,
          before, after]],
    )  # fmt: skip
    print(
        f"   synthetic parts written in {made:.1f} s; every row once: {counted == args.rows}; "
        f"goal ≤ 1 file per 10⁶ rows: {c.verdict(len(files) / max(1, args.rows / 1e6), 1.0, False)}"
    )
    c.emit(
        BENCH,
        args.quick,
        config,
        {
            "parts": parts,
            "files": len(files),
            "seconds": seconds,
            "seconds_per_million": per_million,
            "peak_rss_mib_before": before,
            "peak_rss_mib_after": after,
            "rows_ok": counted == args.rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

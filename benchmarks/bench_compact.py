"""Metadata compaction: seconds per 10⁶ rows, files left, driver memory.

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

import io
import sys

import harness as h

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


def write_parts(store, rows: int, part_rows: int) -> int:
    """`rows` synthetic rows in parts of `part_rows` into the store's metadata/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdbatch.output import METADATA_PREFIX
    from sdbatch.write import METADATA_SCHEMA

    template = synthetic_part(METADATA_SCHEMA, part_rows, 0)
    id_column = METADATA_SCHEMA.get_field_index("id")
    parts = 0
    for start in range(0, rows, part_rows):
        n = min(part_rows, rows - start)
        ids = pa.array([f"item-{start + i:09d}" for i in range(n)], pa.string())
        buf = io.BytesIO()
        pq.write_table(template.slice(0, n).set_column(id_column, "id", ids), buf)
        store.write_bytes(f"{METADATA_PREFIX}part-bench-{parts:06d}.parquet", buf.getvalue())
        parts += 1
    return parts


def main() -> int:
    p = h.parser(__doc__, job=False, quick_help="20,000 rows")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--part-rows", type=int, default=250)
    args = h.parse(p, rows=20_000)
    from sdbatch.compact import compact, live_files
    from sdbatch.output import METADATA_PREFIX, read_parts
    from sdbatch.store import LocalStore

    config = {"rows": args.rows, "part_rows": args.part_rows}
    h.header(f"{BENCH}: metadata compaction", config)
    store = LocalStore(str(h.workdir(BENCH) / "out"))
    t = h.timer()
    parts = write_parts(store, args.rows, args.part_rows)
    made, before, t = t(), h.ru_maxrss_mib(), h.timer()
    files = compact(store, METADATA_PREFIX)
    seconds, after = t(), h.ru_maxrss_mib()
    counted = sum(t.num_rows for t in read_parts(store, METADATA_PREFIX, ["id"]))
    per_million = seconds / args.rows * 1e6
    h.table(
        ["parts before", "files after", "rows read back", "compact s", "s per 10⁶ rows",
         "peak RSS before MiB", "peak RSS after MiB"],
        [[parts, len(live_files(store, METADATA_PREFIX)), counted, seconds, per_million,
          before, after]],
    )  # fmt: skip
    print(f"   synthetic parts written in {made:.1f} s; every row once: {counted == args.rows}")
    figures = {"parts": parts, "files": len(files), "seconds": seconds,
               "seconds_per_million": per_million, "peak_rss_mib_before": before,
               "peak_rss_mib_after": after, "rows_ok": counted == args.rows}  # fmt: skip
    headline = {"s per 10⁶ rows": per_million, "files per 10⁶ rows": len(files) / max(1, args.rows / 1e6),
                "peak RSS growth MiB": after - before, "every row once": counted == args.rows}  # fmt: skip
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

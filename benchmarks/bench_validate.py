"""Manifest validation at 10⁷ rows: wall seconds and the validating process's peak RSS.

    .venv/bin/python benchmarks/bench_validate.py [--quick] [--rows 10000000] [--reference]

A manifest of ROWS rows (id, prompt, seed, steps; row groups of 100,000, written chunk by
chunk so the builder stays small) in a temporary folder; then `validate_manifest` runs
in a child process, as `sdbatch validate` and `sdbatch run` do on the driver, and
reports its wall time (the call only, imports excluded), its peak RSS (VmHWM) and its
RSS before the call (Python, pyarrow, sdbatch: what any command holds anyway).
Goals: ≤ 10 s and peak RSS ≤ 600 MiB at 10⁷ rows.

--reference also runs the row-by-row validator used before (a Python dict and a
set entry per row; kept in tests/unit/test_manifest_scale.py as `reference_validate`)
on the same manifest, in its own child, for the before/after figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common as c

BENCH = "validate"
ROW_GROUP = 100_000


def write_manifest(path: Path, rows: int) -> None:
    """id, prompt, seed, steps in row groups of ROW_GROUP rows, one chunk at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("steps", pa.int64())]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            index = range(start, min(start + ROW_GROUP, rows))
            chunk = {
                "id": [f"row-{i:08d}" for i in index],
                "prompt": [f"{c.SUBJECTS[i % 4]}, style {i}" for i in index],
                "seed": [1000 + i for i in index],
                "steps": [20 + i % 30 for i in index],
            }
            writer.write_table(pa.table(chunk, schema=schema))


def rss_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, in MiB; ru_maxrss where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(manifest: str, reference: bool) -> None:
    """Validate `manifest` once and print the figures as a CHILD line."""
    t = c.timer()
    from sdbatch.manifest import validate_manifest
    from sdbatch.spec import parse_spec

    validate = validate_manifest
    if reference:
        from tests.unit.test_manifest_scale import reference_validate as validate
    spec = parse_spec({"name": "bench", "manifest": manifest, "output": "/unused", "model": "/m"})
    imports = t()
    before = rss_mib("VmRSS")
    calls: list[int] = []
    kwargs: dict[str, Any] = {} if reference else {"on_progress": calls.append}
    t = c.timer()
    info = validate(manifest, spec, **kwargs)
    seconds = t()
    c.child_report(
        {
            "seconds": seconds,
            "imports_s": imports,
            "rows": info.num_rows,
            "items": info.total_items,
            "rss_before_mib": before,
            "peak_rss_mib": rss_mib("VmHWM"),
            "progress_calls": len(calls),
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10⁵ rows")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--reference", action="store_true", help="also time the old validator")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per child")
    parser.add_argument("--child", metavar="MANIFEST", help=argparse.SUPPRESS)
    parser.add_argument("--child-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_reference)
        return 0
    if args.quick:
        args.rows = 100_000
    config = {"rows": args.rows, "row_group": ROW_GROUP, "columns": "id,prompt,seed,steps"}
    c.header(f"{BENCH}: validate_manifest, seconds and peak RSS", config)
    with tempfile.TemporaryDirectory(prefix="sdbatch-bench-validate-") as tmp:
        manifest = Path(tmp) / "manifest.parquet"
        t = c.timer()
        write_manifest(manifest, args.rows)
        if hasattr(os, "sync"):
            os.sync()  # the file's writeback would otherwise overlap the measured call
        size = manifest.stat().st_size / 2**20
        print(
            f"   manifest: {args.rows:,} rows, {size:.0f} MiB, written in {t():.1f} s", flush=True
        )
        cases: dict[str, list[str]] = {"batch-wise": []}
        if args.reference:
            cases["row-by-row (before)"] = ["--child-reference"]
        figures: dict[str, Any] = {}
        for case, extra in cases.items():
            script = str(Path(__file__).resolve())
            report = c.run_child([script, "--child", str(manifest), *extra], args.timeout)
            assert report["rows"] == args.rows, report
            figures[case] = report
        children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    at_size = args.rows >= 10_000_000  # the goals are set for 10⁷ rows
    rows = [
        [
            case,
            c.fmt(f["seconds"], ".2f"),
            c.fmt(f["seconds"] / args.rows * 1e6, ".2f"),
            c.fmt(f["rss_before_mib"], ".0f"),
            c.fmt(f["peak_rss_mib"], ".0f"),
            c.verdict(f["seconds"] if at_size else None, 10.0, higher_is_better=False),
            c.verdict(f["peak_rss_mib"] if at_size else None, 600, higher_is_better=False),
        ]
        for case, f in figures.items()
    ]
    c.table(
        ["validator", "seconds", "s per 10⁶ rows", "RSS before MiB", "peak RSS MiB",
         "≤ 10 s at 10⁷", "≤ 600 MiB at 10⁷"],
        rows,
    )  # fmt: skip
    print(f"   largest child peak RSS (getrusage RUSAGE_CHILDREN): {children_peak:.0f} MiB")
    c.emit(BENCH, args.quick, config, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())

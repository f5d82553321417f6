"""Manifest validation at 10⁷ rows: wall seconds and the validating process's peak RSS.

    .venv/bin/python benchmarks/bench_validate.py [--quick] [--rows 10000000] [--reference]

A manifest of ROWS rows (id, prompt, seed, steps; row groups of 100,000, written chunk by
chunk so the builder stays small) in a temporary folder; then `validate_manifest` runs
in a child process, as `sdbatch validate` and `sdbatch run` do on the driver, and
reports its wall time (the call only, imports excluded), its peak RSS (VmHWM) and its
RSS before the call (Python, pyarrow, sdbatch: what any command holds anyway).

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

import harness as h

BENCH = "validate"


def child(manifest: str, reference: bool) -> None:
    """Validate `manifest` once and print the figures as a CHILD line."""
    t = h.timer()
    from sdbatch.manifest import validate_manifest
    from sdbatch.spec import parse_spec

    validate = validate_manifest
    if reference:
        from tests.unit.test_manifest_scale import reference_validate as validate
    spec = parse_spec({"name": "bench", "manifest": manifest, "output": "/unused", "model": "/m"})
    imports, before = t(), h.vm_mib("VmRSS")
    calls: list[int] = []
    kwargs: dict[str, Any] = {} if reference else {"on_progress": calls.append}
    t = h.timer()
    info = validate(manifest, spec, **kwargs)
    h.child_report({"seconds": t(), "imports_s": imports, "rows": info.num_rows,
                    "items": info.total_items, "rss_before_mib": before,
                    "peak_rss_mib": h.vm_mib(), "progress_calls": len(calls)})  # fmt: skip


def main() -> int:
    p = h.parser(__doc__, job=False, quick_help="10⁵ rows")
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--reference", action="store_true", help="also time the old validator")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per child")
    p.add_argument("--child", metavar="MANIFEST", help=argparse.SUPPRESS)
    p.add_argument("--child-reference", action="store_true", help=argparse.SUPPRESS)
    args = h.parse(p, rows=100_000)
    if args.child:
        return child(args.child, args.child_reference) or 0
    config = {"rows": args.rows, "row_group": 100_000, "columns": "id,prompt,seed,steps"}
    h.header(f"{BENCH}: validate_manifest, seconds and peak RSS", config)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sdbatch-bench-validate-") as tmp:
        t = h.timer()
        manifest = h.big_manifest(Path(tmp) / "manifest.parquet", args.rows, seeds_and_steps=True)
        os.sync()  # the file's writeback would otherwise overlap the measured call
        size = manifest.stat().st_size / 2**20
        print(f"   manifest: {args.rows:,} rows, {size:.0f} MiB, written in {t():.1f} s")
        cases = {"batch-wise": []} | ({"row-by-row (before)": ["--child-reference"]}
                                      if args.reference else {})  # fmt: skip
        for case, extra in cases.items():
            figures[case] = h.run_child([__file__, "--child", str(manifest), *extra], args.timeout)
            assert figures[case]["rows"] == args.rows, figures[case]
    h.table(["validator", "seconds", "s per 10⁶ rows", "RSS before MiB", "peak RSS MiB"],
            [[case, h.fmt(f["seconds"], ".2f"), h.fmt(f["seconds"] / args.rows * 1e6, ".2f"),
              h.fmt(f["rss_before_mib"], ".0f"), h.fmt(f["peak_rss_mib"], ".0f")]
             for case, f in figures.items()])  # fmt: skip
    children_peak = h.ru_maxrss_mib(resource.RUSAGE_CHILDREN)
    print(f"   largest child peak RSS (getrusage RUSAGE_CHILDREN): {children_peak:.0f} MiB")
    headline = {f"{case} {k}": figures[case][v] for case in figures
                for k, v in (("seconds", "seconds"), ("peak RSS MiB", "peak_rss_mib"))}  # fmt: skip
    headline["rows"] = args.rows
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

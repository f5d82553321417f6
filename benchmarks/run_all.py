"""Run every benchmark, one at a time, each in its own process (its own Ray); summarise.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only overhead,modes] [--skip s3_write]

Each script's output streams through as it runs and is also kept in
benchmarks/out/logs/<name>.log; the `RESULT {...}` lines are collected into
benchmarks/out/results.json, and each script's headline figures are printed at the end
with the machine they were measured on (the goals they are read against are in
benchmarks/RESULTS.md). Scripts never run concurrently (they would share the CPUs and
skew each other's figures). `make bench` runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness as h

HERE = Path(__file__).resolve().parent

# name → script and its arguments; every script takes --quick.
BENCHES: dict[str, str] = {
    "overhead": "bench_overhead.py",
    "overhead_sdxl": "bench_overhead.py --family sdxl --shapes 1x2",
    "families": "bench_families.py",
    "model_sources": "bench_model_sources.py",
    "scaling": "bench_scaling.py",
    "actors": "bench_actors.py",
    "modes": "bench_modes.py",
    "resume": "bench_resume.py",
    "validate": "bench_validate.py",
    "stream": "bench_stream.py",
    "compact": "bench_compact.py",
    "adapters": "bench_adapters.py",
    "reliability": "bench_reliability.py",
    "s3_write": "bench_s3_write.py",
}


def run_one(name: str, quick: bool, log_dir: Path) -> dict[str, Any]:
    script, *args = BENCHES[name].split()
    cmd = [sys.executable, str(HERE / script), *args, *(["--quick"] if quick else [])]
    print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
    started = time.time()
    lines: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=h.ROOT, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not line.startswith(("RESULT ", "[20")):  # Ray's C++ log lines
                print(line, end="", flush=True)
        rc = proc.wait()
    (log_dir / f"{name}.log").write_text("".join(lines))
    record: dict[str, Any] = {"name": name, "rc": rc, "seconds": time.time() - started}
    result = next((ln for ln in lines if ln.startswith("RESULT ")), None)
    if result:
        record["result"] = json.loads(result.removeprefix("RESULT "))
    return record


def summary(records: list[dict[str, Any]]) -> list[list[Any]]:
    """(bench, figure, value): each script's headline figures, or why there are none."""
    rows: list[list[Any]] = []
    for rec in records:
        headline = (rec.get("result") or {}).get("headline")
        if rec["rc"] != 0 or headline is None:
            rows.append(
                [rec["name"], f"FAILED (exit {rec['rc']}), see logs/{rec['name']}.log", None]
            )
        else:
            rows.extend([rec["name"], figure, value] for figure, value in headline.items())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    parser.add_argument("--skip", default="", help="comma-separated names to leave out")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    names = [n for n in names if n not in args.skip.split(",")]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCHES)}")

    machine = h.machine_info()
    log_dir = h.OUT / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records = [run_one(name, args.quick, log_dir) for name in names]

    print("\n" + "=" * 100)
    print(f"sdbatch benchmarks{' (QUICK mode: smoke test, not results)' if args.quick else ''}")
    print(f"  {h.machine_line(machine)}\n  sdbatch {machine['sdbatch']} · transformers "
          f"{machine['transformers']} · python {machine['python']} · load average at end "
          f"{[round(x, 2) for x in os.getloadavg()]}")  # fmt: skip
    h.table(["bench", "figure", "value"], summary(records))
    h.table(
        ["bench", "seconds", "exit"], [[r["name"], f"{r['seconds']:.0f}", r["rc"]] for r in records]
    )
    out = h.OUT / "results.json"
    record = {"machine": machine, "quick": args.quick, "benchmarks": records}
    out.write_text(json.dumps(record, indent=2, default=str))
    print(f"  goals: benchmarks/RESULTS.md; RESULT records in {out}; logs in {log_dir}; "
          f"total {time.time() - started:.0f} s")  # fmt: skip
    sys.exit(0 if all(r["rc"] == 0 for r in records) else 1)


if __name__ == "__main__":
    main()

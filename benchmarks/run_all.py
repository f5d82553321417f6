"""Run every benchmark, one at a time, each in its own process (its own Ray); summarise.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only overhead,modes] [--skip s3_write]

Each script's output streams through as it runs and is also kept in
benchmarks/out/logs/<name>.log; the `RESULT {...}` lines are collected into
benchmarks/out/results.json, and a summary of the figures that the issues set goals
for is printed at the end with the machine they were measured on. Scripts never run
concurrently (they would share the CPUs and skew each other's figures). `make bench`
runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

HERE = Path(__file__).resolve().parent

# name → (script, extra arguments in quick mode). bench_s3_write.py predates --quick.
BENCHES: dict[str, tuple[str, list[str]]] = {
    "overhead": ("bench_overhead.py", ["--quick"]),
    "overhead_sdxl": ("bench_overhead.py --family sdxl --shapes 1x2", ["--quick"]),
    "families": ("bench_families.py", ["--quick"]),
    "model_sources": ("bench_model_sources.py", ["--quick"]),
    "scaling": ("bench_scaling.py", ["--quick"]),
    "actors": ("bench_actors.py", ["--quick"]),
    "modes": ("bench_modes.py", ["--quick"]),
    "resume": ("bench_resume.py", ["--quick"]),
    "validate": ("bench_validate.py", ["--quick"]),
    "stream": ("bench_stream.py", ["--quick"]),
    "compact": ("bench_compact.py", ["--quick"]),
    "adapters": ("bench_adapters.py", ["--quick"]),
    "reliability": ("bench_reliability.py", ["--quick"]),
    "s3_write": (
        "bench_s3_write.py",
        ["--objects", "50", "--items", "16", "--size", "64", "--steps", "2"],
    ),
}


def run_one(name: str, quick: bool, log_dir: Path) -> dict[str, Any]:
    script, quick_args = BENCHES[name]
    script, *args = script.split()
    cmd = [sys.executable, str(HERE / script), *args, *(quick_args if quick else [])]
    print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
    started = time.time()
    lines: list[str] = []
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=c.ROOT,
        bufsize=1,
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
    elif name == "s3_write":
        record["result"] = {"figures": parse_s3_write("".join(lines))}
    return record


def parse_s3_write(text: str) -> dict[str, Any]:
    """bench_s3_write.py prints prose, not a RESULT line; pick its figures out of it."""
    figures: dict[str, Any] = {}
    for threads, rate in re.findall(r"with (\d+) thread\(s\): ([\d,.]+) objects/s", text):
        figures[f"objects_per_s_{threads}_threads"] = float(rate.replace(",", ""))
    for label, wall, ips in re.findall(
        r"(S3 output|local output): wall ([\d.]+) s, ([\d.]+) images/s", text
    ):
        key = label.split()[0].lower()
        figures[f"{key}_wall_s"], figures[f"{key}_images_per_s"] = float(wall), float(ips)
    busy = re.findall(r"render actors busy ([\d.]+)% of their span", text)
    if busy:
        figures["render_busy_in_span"] = [float(b) / 100 for b in busy]
    return figures


def get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summary_rows(name: str, f: dict[str, Any]) -> list[list[Any]]:
    """(bench, figure, value, goal, verdict) for the figures the issues name."""
    v = c.verdict
    if name in ("overhead", "overhead_sdxl"):
        rows = []
        for shape in ("sdbatch_1x2", "sdbatch_2x1"):
            if shape not in f:
                continue
            s, e = get(f, shape, "steady_ratio"), get(f, shape, "e2e_ratio")
            rows.append([name, f"{shape} steady img/s ÷ loop", s, "≥ 0.95", v(s, 0.95)])
            rows.append([name, f"{shape} end-to-end ÷ loop", e, "≥ 0.8", v(e, 0.8)])
        rows.append(
            [name, "pixel max diff 1x2 vs loop", f.get("pixel_max_diff_1x2_vs_loop"), "0", ""]
        )
        return rows
    if name == "model_sources":
        return [
            [name, f"{m} S3 warm ÷ local start-up", get(f, m, "warm_over_local"), "≤ 1.1",
             v(get(f, m, "warm_over_local"), 1.1, False)]
            for m in f
        ]  # fmt: skip
    if name == "families":
        return [
            [name, f"{label} peak RSS MiB", get(f, label, "peak_mib"), "report", ""] for label in f
        ]
    if name == "scaling":
        spread = f.get("steady_spread")
        peak = get(f, "planning", "peak_mib")
        rows_n = get(f, "planning", "rows")
        plan_s = (get(f, "planning", "validate_s") or 0) + (get(f, "planning", "plan_s") or 0)
        return [
            [name, "steady s/img spread vs median", spread, "≤ ±0.10", v(spread, 0.10, False)],
            [
                name,
                f"planning peak RSS MiB ({rows_n:,} rows)" if rows_n else "planning peak RSS MiB",
                peak,
                "≤ 1024",
                v(peak, 1024, False),
            ],
            [name, "planning wall s (validate + plan)", plan_s, "", ""],
        ]
    if name == "actors":
        two, cl = "2 actors x 1 thread", "cluster 2 nodes x 1 actor x 1 thread"
        return [
            [
                name,
                "2x1 ÷ 1x2 steady (same 2 cores)",
                get(f, two, "steady_speedup_vs_1x2"),
                "report",
                "",
            ],
            [name, "2x1 ÷ 1x2 end to end", get(f, two, "e2e_speedup_vs_1x2"), "report", ""],
            [
                name,
                "2x1 ÷ 1x1 steady (actor scaling)",
                get(f, two, "steady_speedup_vs_1x1"),
                "report",
                "",
            ],
            [name, "cluster ÷ 1x2 steady", get(f, cl, "steady_speedup_vs_1x2"), "report", ""],
            [
                name,
                "cluster ÷ 2x1 on one node, steady",
                c.ratio(get(f, cl, "steady_ips"), get(f, two, "steady_ips")),
                "report",
                "",
            ],
        ]
    if name == "modes":
        s = f.get("steady_vs_expected")
        return [
            [name, "mixed ÷ predicted mix, steady", s, "≥ 0.9", v(s, 0.9)],
            [name, "mixed ÷ predicted mix, end to end", f.get("e2e_vs_expected"), "", ""],
            [
                name,
                "mixed ÷ txt2img-only, steady",
                f.get("steady_vs_txt2img"),
                "(not like for like)",
                "",
            ],
        ]
    if name == "resume":
        r = f.get("resume_ratio")
        return [
            [name, "resume after 50 % ÷ full run (wall)", r, "≤ 0.55", v(r, 0.55, False)],
            [name, "same, Ray start-up in both", f.get("resume_ratio_with_ray_start"), "", ""],
            [
                name,
                "resume planning s (scan + plan)",
                (get(f, "resume_planning", "done_scan_s") or 0)
                + (get(f, "resume_planning", "plan_s") or 0),
                "",
                "",
            ],
            [
                name,
                "exactly once, identical bytes",
                f"{f.get('exactly_once')}, {f.get('identical_to_full')}",
                "True, True",
                "",
            ],
        ]
    if name == "s3_write":
        return [[name, k, val, "", ""] for k, val in f.items() if not isinstance(val, list)]
    if name == "reliability":
        return [
            [name, f"{r['fault']}: lost, duplicated", f"{r.get('lost')}, {r.get('duplicated')}",
             "0, 0", "meets goal" if r.get("lost") == r.get("duplicated") == 0 else "MISSES goal"]
            for r in f.get("rows", [])
        ]  # fmt: skip
    return []


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

    machine = c.machine_info()
    log_dir = c.OUT / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records = [run_one(name, args.quick, log_dir) for name in names]

    print("\n" + "=" * 100)
    print(f"sdbatch benchmarks{' (QUICK mode: smoke test, not results)' if args.quick else ''}")
    print(
        f"  {machine['date']} · {machine['cpu']} · {machine['cores']} cores · "
        f"{machine['ram_gib']} GiB RAM · python {machine['python']}\n"
        f"  sdbatch {machine['sdbatch']} · torch {machine['torch']} · diffusers "
        f"{machine['diffusers']} · transformers {machine['transformers']} · ray {machine['ray']}"
        f"\n  load average at start {machine['load_avg']}, at end "
        f"{[round(x, 2) for x in os.getloadavg()]}"
    )
    rows: list[list[Any]] = []
    for rec in records:
        figures = get(rec, "result", "figures") or {}
        if rec["rc"] != 0 or not figures:
            rows.append(
                [
                    rec["name"],
                    f"FAILED (exit {rec['rc']}), see logs/{rec['name']}.log",
                    None,
                    "",
                    "",
                ]
            )
            continue
        rows.extend(summary_rows(rec["name"], figures))
    c.table(["bench", "figure", "value", "goal", "verdict"], rows)
    c.table(
        ["bench", "seconds", "exit"],
        [[r["name"], f"{r['seconds']:.0f}", r["rc"]] for r in records],
    )
    out = c.OUT / "results.json"
    out.write_text(
        json.dumps(
            {"machine": machine, "quick": args.quick, "benchmarks": records},
            indent=2,
            default=str,
        )
    )
    print(f"  total {time.time() - started:.0f} s; RESULT records in {out}; logs in {log_dir}")
    sys.exit(0 if all(r["rc"] == 0 for r in records) else 1)


if __name__ == "__main__":
    main()

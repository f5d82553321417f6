"""Jobs of 10⁷ images (issue 14 §1): time to the first stored image and the driver's
peak memory, fresh and resuming an output with 10⁶ items done.

    .venv/bin/python benchmarks/bench_stream.py [--quick] [--rows 10000000] [--done 1000000]

A manifest of ROWS rows (id + prompt, row groups of 100,000) and a tiny model; each case
runs `sdbatch run JOB --progress plain --every 0` in a child process, exactly as a user
does (it starts its own local Ray), and stops it with SIGINT SETTLE seconds after the
first image (the CLI commits what is finished and exits 130):

1. fresh: an empty output.
2. resume: the same output after DONE more items are made done, as an interrupted
   10⁷ job leaves it: one metadata part with DONE rows for the manifest's first DONE
   items (the fresh run's first metadata row with id, row_id, seed and key replaced,
   so every column is a real one) and their image files (hard links to a few copies
   of one real image). The driver scans them (`done_table`: one listing of images/, one read of
   four metadata columns) and the planning tasks skip them fragment by fragment.

Per case: seconds from the command's start to the first stored image (the first progress
line with an item done: its image is written and its metadata row reached the driver),
of which before rendering could start (the CLI's "N images, ... to render" line), and
the driver process's peak RSS (VmHWM of the `sdbatch run` process; Ray's own processes
are not the driver). Goals: peak RSS ≤ 1 GiB in both cases; first image within seconds,
the same for 10³ and 10⁷ rows (run with `--rows 1000` to see the small job's figure).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _common as c

BENCH = "stream"
SETTLE = 10.0
START = re.compile(r"^(\d+) images, (\d+) already done")
PROGRESS = re.compile(r"^progress: (\d+)/(\d+) done, (\d+) failed")


def write_manifest(path: Path, rows: int) -> None:
    """id + prompt in row groups of 100,000, written chunk by chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    chunk = 100_000
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            ids = [f"row-{i:08d}" for i in range(start, start + n)]
            prompts = [f"{c.SUBJECTS[i % 4]}, style {i}" for i in range(start, start + n)]
            writer.write_table(pa.table({"id": ids, "prompt": prompts}, schema=schema))


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_until_first_image(job: Path, timeout: float) -> dict[str, Any]:
    """`sdbatch run JOB` until SETTLE s after its first stored image, then SIGINT."""
    cmd = [sys.executable, "-m", "sdbatch.cli", "run", str(job), "--progress", "plain"]
    started = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--every", "0"], cwd=c.ROOT, stderr=subprocess.PIPE, text=True)
    marks: dict[str, Any] = {}
    lines: list[str] = []
    first = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip())
            now = time.perf_counter() - started
            if m := START.match(line):
                marks.update(start_s=now, total=int(m[1]), skipped=int(m[2]))
            elif (m := PROGRESS.match(line)) and "start_s" in marks:
                if int(m[1]) + int(m[3]) > marks["skipped"] and not first.is_set():
                    marks["first_image_s"] = now
                    first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = 0.0
    deadline = time.monotonic() + timeout
    settle_until = None
    while proc.poll() is None and time.monotonic() < deadline:
        peak = max(peak, peak_rss_mib(proc.pid) or 0.0)
        if first.is_set() and settle_until is None:
            settle_until = time.monotonic() + SETTLE
        if settle_until is not None and time.monotonic() >= settle_until:
            break
        time.sleep(0.1)
    peak = max(peak, peak_rss_mib(proc.pid) or 0.0)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    if "first_image_s" not in marks:
        tail = "\n".join(lines[-30:])
        raise RuntimeError(f"no image within {timeout:.0f} s (exit {proc.returncode}):\n{tail}")
    return {**marks, "peak_rss_mib": peak, "exit": proc.returncode}


def add_done_items(output: Path, count: int) -> int:
    """Make the manifest's first `count` items done (see the module docstring); returns
    how many were added (those the fresh run had rendered are left as they are)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sdbatch.compact import live_files
    from sdbatch.output import METADATA_PREFIX
    from sdbatch.plan import image_key, item_seed
    from sdbatch.store import open_store

    store = open_store(str(output))
    parts = [pq.read_table(store.open_input(k)) for k in live_files(store, METADATA_PREFIX)]
    real = pa.concat_tables(parts, promote_options="permissive")
    have = set(real["id"].to_pylist())
    template = real.slice(0, 1)
    image = output / template["key"][0].as_py()
    ids = [f"row-{i:08d}" for i in range(count) if f"row-{i:08d}" not in have]
    keys = [image_key(i, 0, image.suffix[1:]) for i in ids]
    table = pa.table({name: pa.repeat(template[name][0], len(ids)) for name in real.column_names})
    table = table.cast(real.schema)
    for name, values in (
        ("id", ids),
        ("row_id", ids),
        ("key", keys),
        ("seed", [item_seed(1, i, 0) for i in ids]),
    ):
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.array(values, real.schema.field(name).type)
        )
    table = table.set_column(
        table.schema.get_field_index("image_index"),
        "image_index",
        pa.array(np.zeros(len(ids), dtype=np.int32)),
    )
    pq.write_table(table, output / METADATA_PREFIX / "part-synthetic-00000.parquet")
    source, links = image, 0
    for key in keys:
        path = output / key
        path.parent.mkdir(exist_ok=True)
        if path.exists():  # an image the stopped run wrote but did not commit
            continue
        if links >= 60_000:  # ext4 allows 65,000 links per inode: start a new source
            shutil.copyfile(image, path)
            source, links = path, 0
        else:
            os.link(source, path)
            links += 1
    assert pc.count_distinct(table["id"]).as_py() == len(ids)
    return len(ids)


def main() -> None:
    parser = c.job_parser(
        __doc__, size=64, steps=2, actors=2, threads=1, with_items=False, quick_help="10⁵ rows"
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="manifest rows")
    parser.add_argument("--done", type=int, default=1_000_000, help="done items when resuming")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per case")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.done = 100_000, 20_000
    config = c.job_config(args, rows=args.rows, done=args.done)
    c.header("streaming plan: first image and driver memory, fresh and resuming", config)
    work = c.workdir(BENCH)
    models = {"base": c.tiny_models(["base"])["base"]}
    t = c.timer()
    manifest = work / "manifest.parquet"
    write_manifest(manifest, args.rows)
    print(f"   manifest: {args.rows:,} rows written in {t():.1f} s", flush=True)
    output = work / "out"
    spec = c.spec_dict(
        "stream", manifest, output, models, size=args.size, steps=args.steps,
        batch_size=args.batch, actors=args.actors, threads=args.threads,
    )  # fmt: skip
    job = c.write_spec(work / "job.yaml", spec)
    figures: dict[str, Any] = {}
    figures["fresh"] = run_until_first_image(job, args.timeout)
    t = c.timer()
    added = add_done_items(output, args.done)
    print(f"   resume state: {added:,} done items added in {t():.1f} s", flush=True)
    figures["resume"] = {**run_until_first_image(job, args.timeout), "done_added": added}
    rows = []
    for case, f in figures.items():
        rows.append(
            [
                case,
                f"{f['skipped']:,}",
                c.fmt(f["start_s"], ".1f"),
                c.fmt(f["first_image_s"], ".1f"),
                c.fmt(f["peak_rss_mib"], ".0f"),
                c.verdict(f["peak_rss_mib"], 1024, higher_is_better=False),
            ]
        )
    c.table(
        ["case", "already done", "render start s", "first image s", "driver peak MiB", "≤ 1 GiB"],
        rows,
    )
    c.emit(BENCH, args.quick, config, figures)


if __name__ == "__main__":
    main()

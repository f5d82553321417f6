"""Jobs of 10⁷ images: time to the first stored image and the driver's
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
are not the driver). Run with `--rows 1000` to see the small job's figures.
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

import harness as h

BENCH = "stream"
SETTLE = 10.0
START = re.compile(r"^(\d+) images, (\d+) already done")
PROGRESS = re.compile(r"^progress: (\d+)/(\d+) done, (\d+) failed")


def run_until_first_image(job: Path, timeout: float) -> dict[str, Any]:
    """`sdbatch run JOB` until SETTLE s after its first stored image, then SIGINT."""
    cmd = [sys.executable, "-m", "sdbatch.cli", "run", str(job), "--progress", "plain"]
    started = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--every", "0"], cwd=h.ROOT, stderr=subprocess.PIPE, text=True)
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
        peak = max(peak, h.vm_mib(pid=proc.pid) or 0.0)
        if first.is_set() and settle_until is None:
            settle_until = time.monotonic() + SETTLE
        if settle_until is not None and time.monotonic() >= settle_until:
            break
        time.sleep(0.1)
    peak = max(peak, h.vm_mib(pid=proc.pid) or 0.0)
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


def main() -> int:
    p = h.parser(__doc__, size=64, steps=2, actors=2, threads=1, with_items=False,
                 quick_help="10⁵ rows")  # fmt: skip
    p.add_argument("--rows", type=int, default=10_000_000, help="manifest rows")
    p.add_argument("--done", type=int, default=1_000_000, help="done items when resuming")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per case")
    args = h.parse(p, rows=100_000, done=20_000)
    config = h.job_config(args, rows=args.rows, done=args.done)
    h.header("streaming plan: first image and driver memory, fresh and resuming", config)

    # 1. The manifest and the job.
    work = h.workdir(BENCH)
    models = {"base": h.tiny_models(["base"])["base"]}
    t = h.timer()
    manifest = h.big_manifest(work / "manifest.parquet", args.rows)
    print(f"   manifest: {args.rows:,} rows written in {t():.1f} s", flush=True)
    output = work / "out"
    job = h.job(work / "job.yaml", manifest, output, models, size=args.size, steps=args.steps,
                batch=args.batch, actors=args.actors, threads=args.threads)  # fmt: skip

    # 2. Fresh, then resuming with --done items done.
    figures: dict[str, Any] = {"fresh": run_until_first_image(job, args.timeout)}
    t = h.timer()
    added = add_done_items(output, args.done)
    print(f"   resume state: {added:,} done items added in {t():.1f} s", flush=True)
    figures["resume"] = {**run_until_first_image(job, args.timeout), "done_added": added}

    # 3. Report.
    h.table(["case", "already done", "render start s", "first image s", "driver peak MiB"],
            [[case, f"{f['skipped']:,}", h.fmt(f["start_s"], ".1f"),
              h.fmt(f["first_image_s"], ".1f"), h.fmt(f["peak_rss_mib"], ".0f")]
             for case, f in figures.items()])  # fmt: skip
    headline = {}
    for case, f in figures.items():
        headline[f"{case}: first image s"] = f["first_image_s"]
        headline[f"{case}: driver peak RSS MiB"] = f["peak_rss_mib"]
    return h.finish(BENCH, args, config, figures, headline)


if __name__ == "__main__":
    sys.exit(main())

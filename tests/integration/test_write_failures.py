"""The output fails mid-job (a full disk): one clear message, what was stored is kept, and
the same command resumes to exactly once."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from sdbatch.runner import run_job
from sdbatch.spec import load_spec
from tests.helpers import SDBATCH, local_ray, write_job

pytestmark = [pytest.mark.integration, pytest.mark.own_ray, pytest.mark.timeout(600)]


@contextlib.contextmanager
def tiny_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (root only): a disk that fills up."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if os.geteuid() != 0 or mounted.returncode != 0:
        pytest.skip(f"needs root to mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield lambda new_size: subprocess.run(
            ["mount", "-o", f"remount,size={new_size}", str(path)], check=True
        )
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_stops_with_one_message_then_resumes_exactly_once(tmp_path, tiny_models) -> None:
    out = tmp_path / "out"
    spec = write_job(
        tmp_path,
        tiny_models["base"],
        96,
        output=str(out),
        steps=2,
        execution={"commit_rows": 4, "commit_seconds": 1},
    )
    run = [*SDBATCH, "run", str(spec), "--progress", "none"]
    # ~13 KB per 64² PNG: room for some of the 96 images and their metadata parts.
    with tiny_disk(out, "700k") as resize:
        first = subprocess.run(run, capture_output=True, text=True, timeout=300)
        assert first.returncode == 1, first.stderr
        lines = [ln for ln in first.stderr.splitlines() if ln.startswith("error:")]
        assert "No space left on device" in lines[0] and str(out) in lines[0], first.stderr
        assert "run the same command to resume" in first.stderr
        assert "Traceback" not in first.stderr and "RayTaskError" not in first.stderr
        assert len(first.stderr.strip().splitlines()) <= 5, first.stderr
        committed = pd.read_parquet(out / "metadata") if (out / "metadata").exists() else None
        kept = 0 if committed is None else len(committed)
        assert kept < 96

        resize("64m")
        with local_ray():  # the resume, in this process (the CLI's exit was checked above)
            second = run_job(load_spec(spec))
        assert (second.skipped, second.done, second.failed) == (kept, 96 - kept, 0)
        meta = pd.read_parquet(out / "metadata")
        assert len(meta) == 96 and not meta.duplicated(["id", "image_index"]).any()
        assert all((out / key).is_file() for key in meta["key"])
        assert not (out / "failures").exists() or pd.read_parquet(out / "failures").empty
        assert (out / "_SUCCESS").is_file()

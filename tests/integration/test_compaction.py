"""A completed job's metadata is compacted; resumed and extended, it stays exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdbatch.runner import read_metadata, run_job
from sdbatch.status import job_status
from tests.helpers import prompts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def parquet_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.parquet"))


def test_completed_job_is_compacted_then_extended_exactly_once(make_job, tmp_path) -> None:
    out = tmp_path / "out"
    rows = prompts(10)
    missing = str(tmp_path / "missing.png")
    rows[3].update(mode="img2img", init_image=missing)  # a failure row: compacted too
    _, spec = make_job(rows, output=str(out), execution={"commit_rows": 2}, batch_size=2)
    result = run_job(spec)
    assert len(result.metadata_parts) >= 4  # many parts while running ...
    files = parquet_files(out / "metadata")
    assert len(files) == 1 and files[0].startswith("compact-")  # ... one file when done
    assert len(parquet_files(out / "failures")) == 1
    assert not (out / "_SUCCESS").exists()  # one item failed: finished, not complete
    # As is, for other tools: the folder is one dataset with every row once.
    assert pq.read_table(out / "metadata").num_rows == 9

    # The manifest grows; the same command renders only the new rows, then compacts again.
    more = prompts(14)
    more[3].update(mode="img2img", init_image=missing)
    _, spec = make_job(more, output=str(out), execution={"commit_rows": 2}, batch_size=2)
    again = run_job(spec)  # a plain resume tries the failed item again (it fails again)
    assert (again.done, again.failed, again.skipped) == (4, 1, 9)
    meta = read_metadata(spec.output).to_pandas()
    assert len(meta) == 13 and not meta.duplicated(["id", "image_index"]).any()
    assert len(parquet_files(out / "metadata")) == 1
    status = job_status(str(out))
    assert (status.done, status.failed, status.complete) == (13, 1, False)

    # The missing image appears: --retry-failed completes the job; _SUCCESS names the files.
    Image.new("RGB", (64, 64), (120, 90, 60)).save(missing)
    run_job(spec, retry_failed=True)
    success = json.loads((out / "_SUCCESS").read_text())
    (name,) = parquet_files(out / "metadata")
    assert success["files"]["metadata"] == [f"metadata/{name}"]
    status = job_status(str(out))
    assert (status.done, status.failed, status.complete) == (14, 0, True)

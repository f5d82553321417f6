"""The streamed plan (Ray Data tasks over manifest fragments, held back by the PlanGate)
renders the same bits as the plan the driver makes for a one-fragment manifest, and
resumes exactly once after a library caller's stop."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdbatch import pipeline, stream
from sdbatch.runner import run_job
from sdbatch.spec import load_spec
from tests.helpers import prompts, sha_by_item, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_streamed_plan_renders_like_the_driver_plan_and_resumes_exactly_once(
    tmp_path, tiny_models, ray_session, monkeypatch
) -> None:
    rows = prompts(48)
    for i, row in enumerate(rows):
        row["num_images"] = 1 + i % 2  # 72 items
        row["steps"] = 2 + i % 2  # two batch keys, interleaved
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest, row_group_size=8)  # 6 row groups

    def spec_for(name: str):
        path = write_spec(
            tmp_path / f"{name}.yaml",
            manifest=str(manifest),
            output=str(tmp_path / name),
            model=str(tiny_models["base"]),
            execution={"commit_rows": 4, "commit_seconds": 1},
        )
        return load_spec(path)

    # Driver-planned: one fragment of 48 rows.
    reference = run_job(spec_for("driver"))
    assert reference.done == 72

    # Streamed: fragments of 16 rows (3 plan tasks), the plan one block ahead per actor.
    monkeypatch.setattr(stream, "FRAGMENT_ROWS", 16)
    monkeypatch.setattr(pipeline, "AHEAD_BLOCKS", 1)
    spec = spec_for("streamed")
    stop = threading.Event()

    def stop_early(progress) -> None:
        if progress.done >= 12:
            stop.set()

    # run_job(stop=...) as a library: commits, raises KeyboardInterrupt, keeps the caller's
    # Ray (and releases this job's actors, so the resume gets the CPUs).
    with pytest.raises(KeyboardInterrupt):
        run_job(spec, on_progress=stop_early, stop=stop)
    assert ray_session.is_initialized()
    partial = sha_by_item(spec.output)
    assert 12 <= len(partial) < 72

    resumed = run_job(spec)
    assert (resumed.skipped, resumed.done, resumed.failed) == (len(partial), 72 - len(partial), 0)
    assert sha_by_item(spec.output) == sha_by_item(reference.output)

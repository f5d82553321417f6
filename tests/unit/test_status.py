"""`sdbatch status` on outputs written by hand (no Ray): counts, failures, rate, and the
run record's events."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from sdbatch.status import job_status
from tests.helpers import T0, failure, fake_output, item


def status_with(tmp_path, events: dict) -> object:
    out = tmp_path / "out"
    out.mkdir()
    record = {"run_id": "r1", "total": 10, "planned": 10, "started_at": None, "events": events}
    (out / "_RUN.json").write_text(json.dumps(record))
    return job_status(str(out))


def test_events_of_a_run_that_lost_a_node(tmp_path) -> None:
    st = status_with(
        tmp_path,
        {
            "replans": 1,
            "nodes_lost": 1,
            "actors_restarted": 0,
            "items_rerendered": 6,
            "items_failed_by_crashes": 0,
        },
    )
    assert st.events["items_rerendered"] == 6
    assert st.events_line() == (
        "1 node(s) lost, 0 render actor restart(s), 6 item(s) rendered again, re-planned 1 time(s)"
    )


def test_an_older_run_record_still_reads(tmp_path) -> None:
    """Before items were counted, a record had capacity_lost (always equal to replans)."""
    st = status_with(tmp_path, {"capacity_lost": 2, "replans": 2, "items_failed_by_crashes": 1})
    assert st.events == {
        "replans": 2,
        "nodes_lost": 0,
        "actors_restarted": 0,
        "items_rerendered": 0,
        "items_failed_by_crashes": 1,
    }
    assert "re-planned 2 time(s), 1 item(s) failed by killing their actor" in st.events_line()


def test_a_run_that_lost_nothing_says_nothing(tmp_path) -> None:
    assert status_with(tmp_path, {}).events_line() is None


def test_counts_failures_once_each_and_only_while_unresolved(tmp_path) -> None:
    """Each item counts once: done if it has an image, else failed with its newest reason
    (output.unresolved_failures, the rule rerun --failed and the gallery use too); the
    rate is the latest run's rows over its time so far."""
    # fake_output deals rows to its parts in turn: part-run0 holds a and e, part-run1 b.
    images = [item("a"), item("b"), item("e")]
    failures = [
        failure("a"),  # failed, then rendered on a retry: resolved
        failure("d", error="CorruptImage"),
        failure("c"),
        failure("d", error="FlatDepthMap"),  # a later attempt: its reason is shown
    ]
    output = fake_output(str(tmp_path / "out"), images, failures)
    started = T0 - timedelta(seconds=10)
    run = {"run_id": "run1", "total": 6, "started_at": started.isoformat(), "events": {}}
    (Path(output) / "_RUN.json").write_text(json.dumps(run))
    st = job_status(output)
    assert (st.done, st.failed, st.remaining, st.complete) == (3, 2, 1, False)
    assert sorted(st.top_failures) == [
        ("FlatDepthMap: d: init image not found", 1),
        ("MissingInput: c: init image not found", 1),
    ]
    assert st.images_per_second == pytest.approx(0.1)  # part-run1: 1 row in 10 s
    assert st.lease is None and st.events_line() is None

    (Path(output) / "_SUCCESS").write_text(json.dumps({"images_per_second": 2.5}))
    assert job_status(output).complete


def test_an_output_with_no_run_record_yet(tmp_path) -> None:
    st = job_status(fake_output(str(tmp_path / "out"), [item("a")]))
    assert (st.total, st.remaining, st.done, st.failed) == (None, None, 1, 0)
    assert st.images_per_second is None

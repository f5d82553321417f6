"""`sdbatch status` on outputs written by hand (no Ray): the run record's events."""

from __future__ import annotations

import json

from sdbatch.status import job_status


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

"""Which rows `sdbatch rerun` takes from an output (no Ray, no rendering)."""

from __future__ import annotations

import pytest

from sdbatch.errors import UserError
from sdbatch.rerun import select_rows
from sdbatch.store import open_store
from tests.helpers import failure, fake_output, item


@pytest.fixture
def store(tmp_path):
    images = [item("a"), item("a", 1), item("b"), item("c", 1)]
    failures = [
        failure("c"),
        failure("b"),  # failed once, rendered since: not to rerun
        failure("c", error="CorruptImage"),  # the latest failure of c
        failure("d", 2),
    ]
    return open_store(fake_output(str(tmp_path / "out"), images, failures))


def keys(rows) -> list[tuple[str, int]]:
    return sorted((r["id"], r["image_index"]) for r in rows)


def test_by_id_takes_every_image_of_the_item(store) -> None:
    assert keys(select_rows(store, ["a"], failed=False)) == [("a", 0), ("a", 1)]
    assert keys(select_rows(store, None, failed=False)) == [("a", 0), ("a", 1), ("b", 0), ("c", 1)]


def test_an_unknown_id_is_named(store) -> None:
    with pytest.raises(UserError, match=r"no metadata for id\(s\) x, zz$"):
        select_rows(store, ["a", "zz", "x"], failed=False)


def test_failed_takes_the_latest_failure_of_each_unresolved_item(store) -> None:
    rows = select_rows(store, None, failed=True)
    assert keys(rows) == [("c", 0), ("d", 2)]
    assert {r["id"]: r["error_type"] for r in rows}["c"] == "CorruptImage"


def test_nothing_to_rerun_says_so(tmp_path) -> None:
    clean = open_store(fake_output(str(tmp_path / "out"), [item("a")]))
    with pytest.raises(UserError, match="nothing to rerun"):
        select_rows(clean, None, failed=True)

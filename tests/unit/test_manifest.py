"""Manifest checks: every problem named before any rendering, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from sdbatch.errors import UserError
from sdbatch.manifest import iter_rows, validate_manifest
from sdbatch.spec import parse_spec
from tests.helpers import write_manifest

SPEC = parse_spec({"name": "t", "manifest": "/m", "output": "/o", "model": "/m"})


def problems(tmp_path: Path, rows, schema=None) -> list[str]:
    path = write_manifest(tmp_path / "m.parquet", rows, schema)
    with pytest.raises(UserError) as info:
        validate_manifest(str(path), SPEC)
    return info.value.problems


def test_valid_manifest_counts_items(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "m.parquet",
        [
            {"id": "a", "prompt": "p", "num_images": 3},
            {"id": "b", "prompt": "q", "num_images": None},
        ],
    )
    info = validate_manifest(str(path), SPEC)
    assert (info.num_rows, info.total_items, info.modes) == (2, 4, {"txt2img"})
    assert [r["id"] for r in iter_rows(str(path), info.columns)] == ["a", "b"]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q"}], "row 1 (id 'a'): duplicate id"),
        ([{"id": "", "prompt": "p"}], "row 0: id is empty"),
        ([{"id": "../..", "prompt": "p"}], "row 0: id '../..' is only dots/slashes"),
        ([{"id": None, "prompt": "p"}, {"id": "b", "prompt": "p"}], "row 0: id is null"),
        (
            [{"id": "a", "prompt": None}, {"id": "b", "prompt": "p"}],
            "row 0 (id 'a'): prompt is null",
        ),
        ([{"id": "a", "prompt": "p", "steps": 0}], "row 0 (id 'a'): steps must be 1..500, got 0"),
        (
            [{"id": "a", "prompt": "p", "width": 100}],
            "width must be a multiple of 8 in 8..4096, got 100",
        ),
        ([{"id": "a", "prompt": "p", "seed": -3}], "seed must be 0..9.22337e+18, got -3"),
        ([{"id": "a", "prompt": "p", "num_images": 0}], "num_images must be 1..10000, got 0"),
        (
            [{"id": "a", "prompt": "p", "mode": "paint"}],
            "mode must be one of txt2img, img2img, inpaint, depth2img, got 'paint'",
        ),
        (
            [{"id": "a", "prompt": "p", "scheduler": "warp"}],
            "scheduler must be one of default, ddim",
        ),
        ([{"id": "a", "prompt": "p", "strength": 1.5}], "strength must be 0..1, got 1.5"),
        (
            [{"id": "a", "prompt": "p", "guidance_scale": float("nan")}],
            "guidance_scale must be a finite number",
        ),
        ([{"id": "a", "prompt": "p", "mode": "img2img"}], "mode img2img needs an init_image"),
    ],
)
def test_bad_values(tmp_path: Path, rows, expected: str) -> None:
    found = problems(tmp_path, rows)
    assert any(expected in p for p in found), found
    assert all(str(tmp_path / "m.parquet") in p for p in found)


def test_problems_carry_file_field_and_value(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        [{"id": "a", "prompt": "p", "strength": 1.5}, {"id": "a", "prompt": None, "strength": 0.5}],
    )
    assert {(p.field, p.value) for p in found} == {("strength", 1.5), ("prompt", None), ("id", "a")}
    assert {p.file for p in found} == {str(tmp_path / "m.parquet")}
    typed = problems(tmp_path, [{"id": "a", "prompt": "p", "steps": "many"}])
    assert [(p.field, p.value) for p in typed] == [("steps", "string")]


def test_missing_prompt_column(tmp_path: Path) -> None:
    found = problems(tmp_path, [{"id": "a", "text": "p"}])
    assert found == [
        f"{tmp_path / 'm.parquet'}: missing required column 'prompt' (columns: id, text)"
    ]


def test_wrong_column_types(tmp_path: Path) -> None:
    found = problems(tmp_path, [{"id": 1, "prompt": "p", "steps": "many"}])
    assert any("column 'id' must be string, got int64" in p for p in found)
    assert any("column 'steps' must be integer, got string" in p for p in found)


def test_no_rows(tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    assert "manifest has no rows" in problems(tmp_path, [], schema)[0]


def test_not_parquet_and_missing(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        validate_manifest(str(tmp_path / "bad.parquet"), SPEC)
    with pytest.raises(UserError, match="manifest not found"):
        validate_manifest(str(tmp_path / "nope.parquet"), SPEC)


def test_problem_list_is_capped(tmp_path: Path) -> None:
    found = problems(tmp_path, [{"id": "", "prompt": "p"}] * 50)
    assert len(found) == 21 and "and 30 more problems" in found[-1]


def test_million_rows_stream(tmp_path: Path) -> None:
    n = 1_000_000
    table = pa.table({"id": [f"r{i}" for i in range(n)], "prompt": ["a cat"] * n})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "big.parquet", row_group_size=65536)
    info = validate_manifest(str(tmp_path / "big.parquet"), SPEC)
    assert info.total_items == n


def test_sweep_beyond_the_limit_is_refused_with_the_count(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "name": "t",
            "manifest": "/m",
            "output": "/o",
            "model": "/m",
            "sweep": {"guidance_scale": [1, 2, 3], "steps": [1, 2], "max_items": 50},
        }
    )
    path = write_manifest(
        tmp_path / "m.parquet", [{"id": str(i), "prompt": "p"} for i in range(10)]
    )
    with pytest.raises(
        UserError, match=r"10 rows × 6 grid cells into 60 items, over sweep.max_items=50"
    ):
        validate_manifest(str(path), spec)

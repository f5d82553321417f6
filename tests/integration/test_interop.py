"""The metadata Parquet of a real tiny job, read by the tools users already have: pandas,
pyarrow (table and dataset), DuckDB and Hugging Face `datasets` (the last two when
installed). Several parts (one per commit) must read as one table everywhere."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from sdbatch.runner import read_metadata, run_job
from sdbatch.write import METADATA_SCHEMA

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_models, ray_session) -> tuple[Path, list[dict]]:
    from tests.helpers import load_job, prompts

    root = tmp_path_factory.mktemp("interop")
    rows = prompts(4)
    rows[0]["num_images"] = 2
    spec = load_job(
        root,
        tiny_models["base"],
        rows,
        output=str(root / "out"),
        steps=2,
        batch_size=2,
        execution={"commit_rows": 2},  # several parts, as any long job has, ...
    )
    result = run_job(spec)
    assert (result.done, result.failed) == (5, 0)
    out = Path(spec.output)
    # ... compacted into one file when the job is done, beside _COMPACTED.json (which
    # pandas, pyarrow, DuckDB and datasets skip or never match).
    (compacted,) = (out / "metadata").glob("*.parquet")
    assert compacted.name.startswith("compact-") and (out / "metadata" / "_COMPACTED.json").exists()
    expected = sorted(read_metadata(spec.output).to_pylist(), key=_key)
    return out, expected


def _key(row) -> tuple[str, int]:
    return (row["id"], row["image_index"])


def _same_rows(rows: list[dict], expected: list[dict], columns=("id", "image_index", "seed")):
    got = sorted(([r[c] for c in columns] for r in rows), key=lambda r: (r[0], r[1]))
    assert got == [[r[c] for c in columns] for r in expected]


def test_pandas(output) -> None:
    import pandas as pd

    out, expected = output
    df = pd.read_parquet(out / "metadata")
    _same_rows(df.to_dict("records"), expected)
    assert str(df["seed"].dtype) == "int64" and str(df["image_index"].dtype) == "int32"
    assert str(df["created_at"].dt.tz) == "UTC"
    assert all(Path(uri).is_file() for uri in df["image_uri"])
    two = pd.read_parquet(out / "metadata", filters=[("image_index", "==", 1)])
    assert list(two["id"]) == ["item-000"]


def test_pyarrow_table_and_dataset(output) -> None:
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    out, expected = output
    table = pq.read_table(out / "metadata")
    assert table.schema.remove_metadata() == METADATA_SCHEMA
    _same_rows(table.to_pylist(), expected)
    dataset = ds.dataset(out / "metadata", format="parquet")
    assert dataset.schema.remove_metadata() == METADATA_SCHEMA
    picked = dataset.to_table(
        columns=["id", "image_index", "seed"], filter=ds.field("mode") == "txt2img"
    )
    _same_rows(picked.to_pylist(), expected)
    assert picked["seed"].type == pa.int64()


def test_duckdb(output) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb not installed")
    out, expected = output
    con = duckdb.connect()
    rows = con.execute(
        "SELECT id, image_index, seed FROM read_parquet(?) ORDER BY id, image_index",
        [str(out / "metadata" / "*.parquet")],
    ).fetchall()
    assert [list(r) for r in rows] == [[r["id"], r["image_index"], r["seed"]] for r in expected]
    (count,) = con.execute(
        "SELECT count(*) FROM read_parquet(?) WHERE mode = 'txt2img' AND steps = 2",
        [str(out / "metadata" / "*.parquet")],
    ).fetchone()
    assert count == len(expected)


def test_hf_datasets(output, tmp_path) -> None:
    datasets = pytest.importorskip("datasets", reason="HF datasets not installed")
    out, expected = output
    data = datasets.load_dataset(
        "parquet",
        data_files=str(out / "metadata" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert data.num_rows == len(expected)
    assert set(data.column_names) == set(METADATA_SCHEMA.names)
    _same_rows(list(data.select_columns(["id", "image_index", "seed"])), expected)

"""Small builders shared by tests: manifests and specs on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml


def write_manifest(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is None:  # from_pylist would take the columns of the first row only
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = pa.table({c: [row.get(c) for row in rows] for c in columns})
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return path


def prompts(n: int, prefix: str = "item") -> list[dict[str, Any]]:
    subjects = ["a cat", "a lighthouse at dusk", "a bowl of fruit", "a mountain lake"]
    return [
        {"id": f"{prefix}-{i:03d}", "prompt": f"{subjects[i % 4]}, style {i}"} for i in range(n)
    ]


def write_spec(path: Path, **fields: Any) -> Path:
    spec = {
        "name": "test",
        "seed": 7,
        "batch_size": 4,
        "defaults": {
            "steps": 3,
            "width": 64,
            "height": 64,
            "scheduler": "ddim",
            "guidance_scale": 7.5,
        },
        "compute": {"actors": 1, "cpus_per_actor": 1},
    }
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path.write_text(yaml.safe_dump(spec))
    return path


def work_item(model: str, **fields: Any) -> dict[str, Any]:
    """A planned txt2img work item, for tests that drive a Renderer directly."""
    item = {
        "id": "a", "image_index": 0, "seed": 1, "prompt": "a cat", "negative_prompt": "",
        "mode": "txt2img", "model": str(model), "steps": 3, "guidance_scale": 7.5,
        "scheduler": "ddim", "width": 64, "height": 64, "strength": 1.0, "key": "k",
        "depth_source": None, "batch_key": "b",
    }  # fmt: skip
    return {**item, **fields}

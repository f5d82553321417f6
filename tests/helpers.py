"""Small builders shared by tests: manifests and specs on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image


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


def make_inputs(folder: Path) -> dict[str, Path]:
    """Init images, masks and a depth map with structure (not noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    gradient = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
    paths = {}
    Image.fromarray(gradient).save(paths.setdefault("init", folder / "init.png"))
    Image.fromarray(gradient[:, ::-1].copy()).save(
        paths.setdefault("init_jpg", folder / "init2.jpg"), quality=95
    )
    wide = np.concatenate([gradient, gradient[:, ::-1]], axis=1)[:, :96]
    Image.fromarray(wide).save(paths.setdefault("init_wide", folder / "wide.png"))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(paths.setdefault("mask", folder / "mask.png"))
    Image.fromarray(mask[:, :32].copy()).save(
        paths.setdefault("mask_small", folder / "mask_small.png")
    )
    soft = mask.copy()
    soft[20:44, 20:44] = 200
    Image.fromarray(soft).save(paths.setdefault("mask_soft", folder / "mask_soft.png"))
    depth = (np.hypot(xx - 32, yy - 32) * 500).astype(np.uint16)
    Image.fromarray(depth).save(paths.setdefault("depth", folder / "depth.png"))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    paths["corrupt"] = folder / "corrupt.png"
    return paths

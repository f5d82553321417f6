"""txt2img end to end through Ray Data on the tiny models: files, metadata, reruns."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sdbatch.runner import read_metadata, run_job
from tests.helpers import load_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

METADATA_COLUMNS = {
    "id",
    "image_index",
    "mode",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "scheduler",
    "width",
    "height",
    "model",
    "image_uri",
    "sha256",
    "batch_size",
    "render_seconds",
    "created_at",
    "model_sha256",
    "env",
    "torch_threads",
    "batch_position",
}


def rows_with_variety() -> list[dict]:
    rows = []
    for i in range(18):
        row = {"id": f"r{i:02d}", "prompt": f"a photo of a cat number {i}"}
        if i % 6 == 0:
            row["num_images"] = 2
        if i % 7 == 0:
            row["seed"] = 100 + i
        if i % 5 == 0:
            row["negative_prompt"] = "blurry"
        rows.append(row)
    # Ids users really write: paths, unicode, dots.
    rows += [
        {"id": "../escape", "prompt": "x"},
        {"id": "a/b", "prompt": "y"},
        {"id": "ünï ✨", "prompt": "z"},
    ]
    return rows


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models, ray_session):
    """rows_with_variety on two actors, rendered once for the module's tests."""
    root = tmp_path_factory.mktemp("txt2img")
    rows = rows_with_variety()
    # Two actors: images must not depend on which actor rendered them.
    spec = load_job(root, tiny_models["base"], rows, compute={"actors": 2, "cpus_per_actor": 1})
    return spec, rows, run_job(spec)


def test_job_end_to_end_and_rerun_identical(job, make_job) -> None:
    spec, rows, result = job
    expected = {(r["id"], k) for r in rows for k in range(r.get("num_images", 1))}
    assert (result.done, result.failed, result.total) == (len(expected), 0, len(expected))
    # Setup (checks, hashing, planning) is reported apart from rendering, never hidden.
    assert result.setup_seconds > 0 and result.wall_seconds > 0

    out = Path(spec.output)
    meta = read_metadata(spec.output).to_pandas()
    assert METADATA_COLUMNS <= set(meta.columns)
    assert set(zip(meta["id"], meta["image_index"], strict=True)) == expected
    assert not meta.duplicated(["id", "image_index"]).any()
    pngs = sorted(out.glob("images/*/*.png"))
    assert len(pngs) == len(expected)
    assert all(out.resolve() in p.resolve().parents for p in pngs)
    for row in meta.itertuples():
        data = Path(row.image_uri).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256
        with Image.open(Path(row.image_uri)) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
            assert np.asarray(im).std() > 1  # not a flat/black image
    pinned = meta[meta["id"] == "r07"].iloc[0]
    assert pinned.seed == 107
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["done"] == len(expected) and success["failed"] == 0
    assert (out / "job.yaml").is_file()

    # A second output from the same spec on one actor: every image byte-identical (which
    # actor rendered an item, and how many there were, changes nothing).
    _, spec2 = make_job(rows, name="again", compute={"actors": 1, "cpus_per_actor": 1})
    run_job(spec2)
    again = read_metadata(spec2.output).to_pandas()
    merged = meta.merge(again, on=["id", "image_index"], suffixes=("", "_2"))
    assert len(merged) == len(expected)
    assert (merged["sha256"] == merged["sha256_2"]).all()


def test_finished_job_is_not_rendered_again(job) -> None:
    spec, _, first = job
    parts = sorted(Path(spec.output, "metadata").iterdir())
    second = run_job(spec)
    assert (second.done, second.skipped) == (0, first.done)
    assert sorted(Path(spec.output, "metadata").iterdir()) == parts


def test_small_job_spreads_over_all_actors(job) -> None:
    spec, _, _ = job
    meta = pd.read_parquet(Path(spec.output, "metadata"))
    assert meta["worker"].nunique() == 2, meta["worker"].value_counts()

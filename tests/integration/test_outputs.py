"""Output formats and layouts: WebP/JPEG with embedded parameters, WebDataset shards
(readable by the webdataset library, exactly once across a crash), sweeps."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from sdbatch.runner import read_metadata, run_job
from sdbatch.spec import load_spec
from tests.helpers import COMMIT_OFTEN, local_ray, prompts, start_run, write_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def user_comment(image: Image.Image) -> str:
    raw = image.getexif().get_ifd(0x8769)[0x9286]
    assert raw.startswith(b"UNICODE\0")
    return raw[8:].decode("utf-16-be")


def test_webdataset_webp_sweep(make_job) -> None:
    import webdataset as wds

    rows = prompts(6)
    rows[0]["seed"] = 123
    _, spec = make_job(
        rows,
        name="wds",
        sweep={"guidance_scale": [3, 7.5], "same_seed": True},
        compute={"actors": 1, "cpus_per_actor": 1},
        defaults={"steps": 2},
    )
    spec = spec.model_copy(
        update={
            "output_options": spec.output_options.model_copy(
                update={"format": "webp", "lossless": True, "layout": "webdataset", "shard_size": 5}
            )
        }
    )
    result = run_job(spec)
    assert (result.done, result.failed) == (12, 0)
    meta = read_metadata(spec.output).to_pandas()
    shards = sorted(Path(spec.output, "shards").glob("*.tar"))
    assert [len(tarfile.open(s).getnames()) for s in shards] == [10, 10, 4]
    assert not Path(spec.output, "images").exists()
    # The webdataset library reads the shards: every sample once, image + json.
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil"))
    assert len(samples) == 12
    by_id = {s["json"]["id"]: s for s in samples}
    assert set(by_id) == set(meta["id"])
    first = meta[meta["id"] == "item-000@guidance_scale=3"].iloc[0]
    sample = by_id[first.id]
    assert sample["webp"].size == (64, 64) and sample["json"]["sha256"] == first.sha256
    # Lossless WebP: the pixels are exactly what was rendered; parameters ride in EXIF.
    with tarfile.open(first.image_uri.split("#")[0]) as tar:
        data = tar.extractfile(first.member).read()
    with Image.open(io.BytesIO(data)) as im:
        info = user_comment(im)
        assert "Seed: 123" in info and "CFG scale: 3" in info and "Steps: 2" in info
        record = json.loads(im.getexif()[0x010E])
        assert record["sweep"] == '{"guidance_scale": 3.0}'
    # same_seed: both cells of a row share its seed; the sweep is recorded per item.
    seeds = meta[meta["row_id"] == "item-000"]["seed"].tolist()
    assert seeds == [123, 123]
    assert sorted(meta["sweep"].unique()) == ['{"guidance_scale": 3.0}', '{"guidance_scale": 7.5}']
    again = run_job(spec)
    assert (again.done, again.skipped) == (0, 12)
    assert sorted(Path(spec.output, "shards").glob("*.tar")) == shards


def test_jpeg_files_carry_a1111_parameters(make_job) -> None:
    _, spec = make_job(prompts(4), name="jpeg", compute={"actors": 1, "cpus_per_actor": 1})
    spec = spec.model_copy(
        update={
            "output_options": spec.output_options.model_copy(
                update={"format": "jpeg", "quality": 90}
            )
        }
    )
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas()
    for row in meta.itertuples():
        assert row.key.endswith(".jpg")
        with Image.open(row.image_uri) as im:
            assert im.format == "JPEG" and im.size == (64, 64)
            assert f"Seed: {row.seed}" in user_comment(im)


@pytest.mark.own_ray
def test_webdataset_resume_after_kill_is_exactly_once(tmp_path, tiny_models) -> None:
    spec_path = write_job(
        tmp_path,
        tiny_models["base"],
        120,
        output={"uri": str(tmp_path / "out"), "layout": "webdataset", "shard_size": 8},
        steps=2,
        execution=COMMIT_OFTEN,
    )
    spec = load_spec(spec_path)
    shards = Path(spec.output, "shards")
    proc = start_run(spec_path)
    # Kill once a few shards exist (some committed, maybe one uploaded but not committed).
    t0 = time.monotonic()
    while time.monotonic() - t0 < 240 and len(list(shards.glob("*.tar"))) < 5:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    os.killpg(proc.pid, signal.SIGKILL)
    with local_ray():  # the resume, in this process: the killed run's Ray is gone
        resumed = run_job(spec)
    assert resumed.done + resumed.skipped == 120 and resumed.failed == 0
    meta = read_metadata(spec.output).to_pandas()
    assert len(meta) == 120 and not meta.duplicated(["id", "image_index"]).any()
    names = [
        n for s in shards.glob("*.tar") for n in tarfile.open(s).getnames() if n.endswith(".png")
    ]
    assert len(names) == 120 == len(set(names)), "a sample is in two shards, or missing"
    assert set(meta["key"]) == {f"shards/{s.name}" for s in shards.glob("*.tar")}
    assert (
        pd.Series(names).str.replace(".png", "").isin(meta["member"].str.replace(".png", "")).all()
    )

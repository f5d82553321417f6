"""The write stage without Ray: rendered rows in, stored images and metadata rows out;
the WebDataset packer as the pipeline starts and closes it."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sdbatch import pipeline, stream
from sdbatch.spec import parse_spec
from sdbatch.write import METADATA_SCHEMA, UNSTORED, write_batch
from tests.helpers import check_png, item


def rendered_rows(*ids: str, failed: tuple[str, ...] = ()) -> pa.Table:
    """Rows as the render stage hands them on: an image's raw pixels, or a failure."""
    rows = []
    for n, item_id in enumerate(ids):
        row = item(item_id, seed=1000 + n, key=f"images/{item_id}_0.png")
        row.pop("created_at")
        if item_id in failed:
            row.update(status="failed", error_type="RuntimeError", error_message="boom")
        else:
            pixels = np.full((row["height"], row["width"], 3), 40 * n, np.uint8)
            row["pixels"] = pixels.tobytes()
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({c: [row.get(c) for row in rows] for c in columns})


def test_images_are_stored_with_their_parameters_and_rows_describe_them(tmp_path) -> None:
    out = tmp_path / "out"
    meta = write_batch(rendered_rows("a", "b", "c", failed=("b",)), output=str(out), job_name="j")
    assert meta.schema == METADATA_SCHEMA
    rows = {r["id"]: r for r in meta.to_pylist()}
    for item_id in ("a", "c"):
        row = rows[item_id]
        data = (out / row["key"]).read_bytes()
        assert row["image_uri"] == str(out / row["key"]) and row["status"] == "ok"
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["job_name"] == "j" and row["created_at"] is not None
        check_png(data, row)  # the infotext and record in the PNG match the row
        with Image.open(io.BytesIO(data)) as im:
            assert np.asarray(im)[0, 0, 0] == (0 if item_id == "a" else 80)
    failed = rows["b"]
    assert (failed["status"], failed["error_type"], failed["error_message"]) == (
        "failed",
        "RuntimeError",
        "boom",
    )
    assert failed["image_uri"] is None and failed["sha256"] is None
    assert not (out / "images" / "b_0.png").exists()


def test_jpeg_and_webdataset_options(tmp_path) -> None:
    out = tmp_path / "out"
    jpeg = write_batch(
        rendered_rows("a"), output=str(out), job_name="j", image_options={"format": "jpeg"}
    )
    with Image.open(jpeg["image_uri"][0].as_py()) as im:
        assert im.format == "JPEG"
    # WebDataset: nothing stored here; the encoded bytes ride on to the shard packer.
    shards = write_batch(
        rendered_rows("x", "y", failed=("y",)),
        output=str(tmp_path / "wds"),
        job_name="j",
        image_options={"layout": "webdataset"},
    )
    assert shards.column_names == [*METADATA_SCHEMA.names, "encoded"]
    encoded = shards["encoded"].to_pylist()
    assert (
        encoded[1] is None and hashlib.sha256(encoded[0]).hexdigest() == shards["sha256"][0].as_py()
    )
    assert shards["image_uri"].to_pylist() == [None, None]
    assert not (tmp_path / "wds").exists() or not any((tmp_path / "wds").rglob("*.png"))


def test_an_output_that_cannot_be_written_marks_the_rest_of_the_block_unstored(
    tmp_path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").write_text("a file where the images folder goes")
    meta = write_batch(rendered_rows("a", "b", "c", failed=("c",)), output=str(out), job_name="j")
    status = meta["status"].to_pylist()
    # Not the items' fault: neither done nor failures; the failure row is kept as it was.
    assert status == [UNSTORED, UNSTORED, "failed"]
    message = meta["error_message"][0].as_py()
    assert "cannot write" in message and str(out / "images") in message
    assert meta["error_message"][1].as_py() == message  # the second one was not tried
    assert meta["error_type"].to_pylist()[:2] == ["StoreError", "StoreError"]


def spec_with(tmp_path: Path, **output) -> object:
    return parse_spec(
        {
            "name": "t",
            "manifest": str(tmp_path / "m.parquet"),
            "output": {"uri": str(tmp_path / "out"), **output},
            "model": "/models/base",
        }
    )


def test_shard_packer_only_for_webdataset_with_the_jobs_settings(tmp_path, monkeypatch) -> None:
    assert pipeline.shard_packer(spec_with(tmp_path), "run1") is None
    started = []
    monkeypatch.setattr(pipeline, "on_head_node", lambda cls, *args: started.append((cls, args)))
    spec = spec_with(tmp_path, layout="webdataset", shard_size=5, format="webp")
    pipeline.shard_packer(spec, "run1")
    ((cls, args),) = started
    assert cls.__name__ == "ShardPacker"
    assert args == (spec.output, spec.storage.model_dump(), "run1", 5, "webp")


def test_close_packer_returns_the_last_shard_or_nothing_and_always_kills_it(
    tmp_path, monkeypatch
) -> None:
    import ray

    killed = []
    monkeypatch.setattr(ray, "kill", killed.append)
    last = METADATA_SCHEMA.empty_table()  # stands for the open shard's rows
    monkeypatch.setattr(stream, "call_actor", lambda method: method())
    packer = type("Packer", (), {"close": lambda self: last})()
    assert pipeline.close_packer(packer) is last and killed == [packer]

    def lost(method):  # the packer's node went away: its items render again on resume
        raise ray.exceptions.RayError("actor died")

    monkeypatch.setattr(stream, "call_actor", lost)
    gone = type("Packer", (), {"close": lambda self: None})()
    closed = pipeline.close_packer(gone)
    assert closed.num_rows == 0 and closed.schema == METADATA_SCHEMA and killed[-1] is gone


def test_packed_shard_members_are_the_encoded_images(tmp_path) -> None:
    """write_batch → ShardPacker: the tar holds each ok item's bytes and a JSON record."""
    from sdbatch.write import ShardPacker

    batch = write_batch(
        rendered_rows("a", "b"),
        output=str(tmp_path / "out"),
        job_name="j",
        image_options={"layout": "webdataset"},
    )
    packer = ShardPacker(str(tmp_path / "out"), None, "run1", 10, "png")
    assert packer.add(batch) == []
    rows = packer.close()
    shard = tmp_path / "out" / "shards" / "run1-00000.tar"
    with tarfile.open(shard) as tar:
        for row, data in zip(rows.to_pylist(), batch["encoded"].to_pylist(), strict=True):
            assert row["image_uri"] == f"{shard}#{row['member']}"
            assert tar.extractfile(row["member"]).read() == data
            check_png(data, row)


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_other_formats_keep_the_size(tmp_path, fmt) -> None:
    meta = write_batch(
        rendered_rows("a"), output=str(tmp_path), job_name="j", image_options={"format": fmt}
    )
    with Image.open(meta["image_uri"][0].as_py()) as im:
        assert im.size == (64, 64)

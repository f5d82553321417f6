"""The prepare stage without Ray: planned items in, decoded pixels (or a failure row per
bad input) out, every adaptation of an input written into the item's notes."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from sdbatch.plan import ITEM_SCHEMA
from sdbatch.prepare import PREPARED_SCHEMA, prepare_batch
from tests.helpers import make_inputs, work_item


def planned(*items: dict) -> pa.Table:
    rows = [{name: i.get(name) for name in ITEM_SCHEMA.names} for i in items]
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def prepared(*items: dict) -> dict[str, dict]:
    out = prepare_batch(planned(*items))
    assert out.schema == PREPARED_SCHEMA
    assert out["id"].to_pylist() == [i["id"] for i in items]  # one row per item, in order
    return {r["id"]: r for r in out.to_pylist()}


def test_inputs_are_decoded_at_the_item_size_and_hashed(tmp_path) -> None:
    img = make_inputs(tmp_path)
    wide = img["init_wide"].read_bytes()  # 96x64 for a 64x64 item: resized, noted
    rgba = png(Image.open(img["init"]).convert("RGBA"))
    out = prepared(
        work_item("m", id="txt"),
        work_item("m", id="same", mode="img2img", strength=0.6, init_image_uri=str(img["init"])),
        work_item("m", id="wide", mode="img2img", strength=0.6, init_image=wide),
        work_item("m", id="rgba", mode="img2img", strength=0.6, init_image=rgba),
    )
    assert out["txt"]["init_pixels"] is None and out["txt"]["status"] is None
    same = out["same"]
    assert same["status"] is None and same["notes"] is None  # nothing adapted
    assert same["init_pixels"] == Image.open(img["init"]).convert("RGB").tobytes()
    assert same["init_image_sha256"] == hashlib.sha256(img["init"].read_bytes()).hexdigest()
    assert out["wide"]["notes"] == "init_image resized from 96x64 to 64x64 (Lanczos)"
    assert len(out["wide"]["init_pixels"]) == 64 * 64 * 3
    assert out["wide"]["init_image_sha256"] == hashlib.sha256(wide).hexdigest()
    assert out["rgba"]["notes"] == "init_image converted from RGBA to RGB"


def test_inpaint_masks_are_checked_and_grey_values_noted(tmp_path) -> None:
    img = make_inputs(tmp_path)
    inpaint = {"mode": "inpaint", "strength": 0.8, "init_image_uri": str(img["init"])}
    out = prepared(
        work_item("m", id="hard", mask_image_uri=str(img["mask"]), **inpaint),
        work_item("m", id="soft", mask_image_uri=str(img["mask_soft"]), **inpaint),
        work_item("m", id="small", mask_image_uri=str(img["mask_small"]), **inpaint),
    )
    assert out["hard"]["notes"] is None
    assert out["hard"]["mask_pixels"] == Image.open(img["mask"]).convert("L").tobytes()
    assert "binarized at 128" in out["soft"]["notes"]
    assert out["soft"]["status"] is None and len(out["soft"]["mask_pixels"]) == 64 * 64
    small = out["small"]
    assert (small["status"], small["error_type"]) == ("failed", "MaskSizeMismatch")
    assert str(img["mask_small"]) in small["error_message"]
    assert "mask is 32x64, init_image is 64x64" in small["error_message"]


def test_a_bad_input_fails_its_item_only(tmp_path) -> None:
    img = make_inputs(tmp_path)
    img2img = {"mode": "img2img", "strength": 0.6}
    out = prepared(
        work_item("m", id="missing", init_image_uri=str(tmp_path / "nope.png"), **img2img),
        work_item("m", id="corrupt-file", init_image_uri=str(img["corrupt"]), **img2img),
        work_item("m", id="corrupt-bytes", init_image=b"garbage", **img2img),
        work_item("m", id="fine", init_image_uri=str(img["init"]), **img2img),
    )
    missing = out["missing"]
    assert (missing["status"], missing["error_type"]) == ("failed", "MissingInput")
    assert missing["error_message"] == f"init_image {tmp_path / 'nope.png'}: not found"
    assert out["corrupt-file"]["error_type"] == "CorruptImage"
    assert str(img["corrupt"]) in out["corrupt-file"]["error_message"]
    assert out["corrupt-bytes"]["error_type"] == "CorruptImage"
    assert "init_image (inline bytes): cannot decode image" in out["corrupt-bytes"]["error_message"]
    assert out["fine"]["status"] is None and out["fine"]["init_pixels"]


def test_depth_maps_are_resized_as_float_and_a_flat_one_fails(tmp_path) -> None:
    img = make_inputs(tmp_path)
    depth = {"mode": "depth2img", "strength": 0.7, "init_image_uri": str(img["init"])}
    small = np.asarray(Image.open(img["depth"]).resize((32, 32)), dtype=np.uint16)
    out = prepared(
        work_item("m", id="estimated", **depth),
        work_item("m", id="given", depth_map_uri=str(img["depth"]), **depth),
        work_item("m", id="small", depth_map=png(Image.fromarray(small)), **depth),
        work_item("m", id="flat", depth_map=png(Image.new("L", (64, 64), 7)), **depth),
    )
    assert out["estimated"]["depth_pixels"] is None and out["estimated"]["status"] is None
    given = np.frombuffer(out["given"]["depth_pixels"], np.float32)
    expected = np.asarray(Image.open(img["depth"]).convert("F"), np.float32).ravel()
    assert np.array_equal(given, expected) and out["given"]["notes"] is None
    assert out["given"]["depth_map_sha256"] == hashlib.sha256(img["depth"].read_bytes()).hexdigest()
    assert out["small"]["notes"] == "depth_map resized from 32x32 to 64x64 (bilinear)"
    assert len(out["small"]["depth_pixels"]) == 64 * 64 * 4
    flat = out["flat"]
    assert (flat["status"], flat["error_type"]) == ("failed", "FlatDepthMap")
    assert "depth_map (inline bytes): depth map is constant" in flat["error_message"]

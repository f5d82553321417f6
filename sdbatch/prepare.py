"""The prepare stage: fetch and decode input images on CPU, before the render actors.

Runs as plain Ray tasks between planning and rendering, so actors never wait on I/O or
PNG decoding. Every problem with one item's inputs (missing URI, corrupt bytes, a mask
that does not fit its image, a flat depth map) marks that item failed with a reason;
its neighbours go on. Inputs are brought to the item's width × height here, and every
such adaptation is written into the item's `notes`, never done silently.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import ItemFailure
from .plan import IMAGE_COLUMNS, ITEM_SCHEMA, schema

# Diffusers binarizes inpainting masks at 0.5; we document and record the same threshold.
MASK_THRESHOLD = 128

PREPARED_SCHEMA = schema(
    *(name for name in ITEM_SCHEMA.names if name not in IMAGE_COLUMNS),
    *(f"{c}_pixels" for c in ("init", "mask", "depth")),
    *(f"{c}_sha256" for c in IMAGE_COLUMNS),
    "notes",
    "status",
    "error_type",
    "error_message",
)


def _fetch(row: dict[str, Any], column: str, storage: dict[str, Any] | None) -> tuple[bytes, str]:
    """(bytes, where) of an image cell: inline bytes or a URI read through the store."""
    from .store import read_uri

    if row.get(column) is not None:
        return row[column], f"{column} (inline bytes)"
    uri = row.get(f"{column}_uri")
    where = f"{column} {uri}"
    try:
        return read_uri(uri, storage), where
    except FileNotFoundError:
        raise ItemFailure("MissingInput", f"{where}: not found") from None
    except Exception as err:  # noqa: BLE001 - storage errors become this item's failure
        raise ItemFailure("InputReadError", f"{where}: {err}") from None


def _decode(data: bytes, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ItemFailure("CorruptImage", f"{where}: cannot decode image: {err}") from None


def prepare_item(row: dict[str, Any], storage: dict[str, Any] | None) -> None:
    """Decode this item's inputs into raw pixels at the item's size (in place)."""
    from PIL import Image

    notes: list[str] = []
    size = (row["width"], row["height"])
    data, where = _fetch(row, "init_image", storage)
    row["init_image_sha256"] = hashlib.sha256(data).hexdigest()
    original = _decode(data, where)
    if original.mode != "RGB":
        notes.append(f"init_image converted from {original.mode} to RGB")
    init = original.convert("RGB")
    if init.size != size:
        notes.append(
            f"init_image resized from {init.width}x{init.height} to {size[0]}x{size[1]} (Lanczos)"
        )
        init = init.resize(size, Image.Resampling.LANCZOS)
    row["init_pixels"] = init.tobytes()

    if row["mode"] == "inpaint":
        data, where = _fetch(row, "mask_image", storage)
        row["mask_image_sha256"] = hashlib.sha256(data).hexdigest()
        mask = _decode(data, where).convert("L")
        if mask.size != original.size:
            raise ItemFailure(
                "MaskSizeMismatch",
                f"{where}: mask is {mask.width}x{mask.height}, init_image is "
                f"{original.width}x{original.height}; they must match",
            )
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.NEAREST)
        values = np.asarray(mask)
        if not np.isin(values, (0, 255)).all():
            notes.append(
                f"mask_image has grey values; binarized at {MASK_THRESHOLD} (>= repaints), as diffusers does"
            )
        row["mask_pixels"] = mask.tobytes()

    if row["mode"] == "depth2img" and (
        row.get("depth_map") is not None or row.get("depth_map_uri")
    ):
        data, where = _fetch(row, "depth_map", storage)
        row["depth_map_sha256"] = hashlib.sha256(data).hexdigest()
        depth = _decode(data, where)
        depth = depth.convert("F") if depth.mode not in ("F",) else depth
        if depth.size != size:
            notes.append(
                f"depth_map resized from {depth.width}x{depth.height} to {size[0]}x{size[1]} (bilinear)"
            )
            depth = depth.resize(size, Image.Resampling.BILINEAR)
        values = np.asarray(depth, dtype=np.float32)
        if not np.isfinite(values).all() or values.max() == values.min():
            raise ItemFailure(
                "FlatDepthMap",
                f"{where}: depth map is constant or not finite; nothing to condition on",
            )
        row["depth_pixels"] = values.tobytes()
    row["notes"] = "; ".join(notes) or None


def prepare_batch(batch: pa.Table, *, storage: dict[str, Any] | None = None) -> pa.Table:
    rows = batch.to_pylist()
    for row in rows:
        row.update(status=None, error_type=None, error_message=None, notes=None)
        if row["mode"] == "txt2img":
            continue
        try:
            prepare_item(row, storage)
        except ItemFailure as err:
            row.update(status="failed", error_type=err.error_type, error_message=str(err))
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)

"""The write stage and the one metadata schema.

`write_batch` runs as a plain Ray task after the render actors: it encodes each image as
PNG with A1111-style `parameters` infotext plus an `sdbatch` JSON record, writes it
atomically through the store, and returns one metadata row (or failure row) per item.
The driver appends those rows to Parquet parts only after the images exist, so a
metadata row never points at a missing image.
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

# The one metadata schema: run, resume, rerun and status all read these columns.
METADATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image_index", pa.int32()),
        ("status", pa.string()),
        ("mode", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("scheduler", pa.string()),
        ("scheduler_class", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("strength", pa.float64()),
        ("model", pa.string()),
        ("model_sha256", pa.string()),
        ("key", pa.string()),
        ("image_uri", pa.string()),
        ("sha256", pa.string()),
        ("batch_size", pa.int32()),
        ("batch_position", pa.int32()),
        ("torch_threads", pa.int32()),
        ("device", pa.string()),
        ("dtype", pa.string()),
        ("prompt_truncated", pa.bool_()),
        ("render_seconds", pa.float64()),
        ("init_image_uri", pa.string()),
        ("init_image_sha256", pa.string()),
        ("mask_image_uri", pa.string()),
        ("mask_image_sha256", pa.string()),
        ("depth_map_uri", pa.string()),
        ("depth_map_sha256", pa.string()),
        ("depth_source", pa.string()),
        ("notes", pa.string()),
        ("call_id", pa.string()),
        ("env", pa.string()),
        ("worker", pa.string()),
        ("job_name", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("attempts", pa.int32()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

# Fields that determine the pixels; the PNG's `sdbatch` chunk holds exactly these so
# identical renders give identical bytes (no timestamps or timings inside the image).
REPRODUCIBLE_FIELDS = (
    "id",
    "image_index",
    "mode",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "scheduler",
    "scheduler_class",
    "width",
    "height",
    "strength",
    "model",
    "model_sha256",
    "init_image_sha256",
    "mask_image_sha256",
    "depth_map_sha256",
    "depth_source",
    "batch_size",
    "batch_position",
    "torch_threads",
    "device",
    "dtype",
    "prompt_truncated",
)

A1111_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_sde": "DPM++ SDE",
    "unipc": "UniPC",
}
_CLASS_SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "LMSDiscreteScheduler": "LMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "UniPCMultistepScheduler": "UniPC",
}


def sampler_name(row: dict[str, Any]) -> str:
    if row["scheduler"] in A1111_SAMPLERS:
        return A1111_SAMPLERS[row["scheduler"]]
    cls = row.get("scheduler_class") or ""
    return _CLASS_SAMPLERS.get(cls, cls)


def _num(value: float) -> str:
    return f"{value:g}"


def infotext(row: dict[str, Any]) -> str:
    """AUTOMATIC1111's `parameters` text, readable by its PNG Info tab and Civitai."""
    model_name = str(row["model"]).rstrip("/").rsplit("/", 1)[-1]
    fields = [
        f"Steps: {row['steps']}",
        f"Sampler: {sampler_name(row)}",
        f"CFG scale: {_num(row['guidance_scale'])}",
        f"Seed: {row['seed']}",
        f"Size: {row['width']}x{row['height']}",
        f"Model hash: {(row.get('model_sha256') or '')[:10]}",
        f"Model: {model_name}",
    ]
    if row["mode"] != "txt2img":
        fields.append(f"Denoising strength: {_num(row['strength'])}")
    lines = [row["prompt"]]
    if row.get("negative_prompt"):
        lines.append(f"Negative prompt: {row['negative_prompt']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def encode_png(pixels: np.ndarray, row: dict[str, Any]) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext(row))
    record = {k: row.get(k) for k in REPRODUCIBLE_FIELDS}
    info.add_text("sdbatch", json.dumps(record, sort_keys=True, ensure_ascii=False))
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_batch(
    batch: pa.Table, *, output: str, job_name: str, storage: dict[str, Any] | None = None
) -> pa.Table:
    """Encode and store each rendered image; return metadata rows (schema above)."""
    from .store import open_store

    store = open_store(output, storage)
    now = datetime.now(timezone.utc)
    rows = []
    for row in batch.to_pylist():
        pixels = row.pop("pixels", None)
        row.update(job_name=job_name, created_at=now, image_uri=None, sha256=None)
        if row["status"] == "ok":
            image = np.frombuffer(pixels, dtype=np.uint8).reshape(row["height"], row["width"], 3)
            data = encode_png(image, row)
            store.write_bytes(row["key"], data, content_type="image/png")
            row.update(image_uri=store.uri_of(row["key"]), sha256=hashlib.sha256(data).hexdigest())
        rows.append({name: row.get(name) for name in METADATA_SCHEMA.names})
    return pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)

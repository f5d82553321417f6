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
import os
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import StoreError
from .plan import schema
from .schedulers import a1111_name

# An item rendered but not stored because the output failed: never committed (it renders
# again on resume); the committer stops the job with the store's message.
UNSTORED = "unstored"

# SDXL's size conditioning and the refiner / ControlNet / depth estimator an item used:
# columns of the schema, and in the image's record only when set (FAMILY_FIELDS).
CONDITIONING_FIELDS = (
    "refiner",
    "refiner_sha256",
    "refiner_switch",
    "controlnet",
    "controlnet_sha256",
    "controlnet_conditioning_scale",
    "depth_estimator",
    "depth_estimator_sha256",
    "original_size",
    "target_size",
    "crops_coords_top_left",
)

# The one metadata schema: run, resume, rerun and status all read these columns.
METADATA_SCHEMA = schema(
    "id",
    "row_id",
    "sweep",
    "image_index",
    "status",
    "mode",
    "prompt",
    "negative_prompt",
    "prompt_syntax",
    "loras",
    "embeddings",
    "adapters",
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
    "model_family",
    *CONDITIONING_FIELDS,
    "key",
    "member",
    "image_uri",
    "sha256",
    "batch_size",
    "batch_position",
    "torch_threads",
    "device",
    "dtype",
    "prompt_truncated",
    "render_seconds",
    "init_image_uri",
    "init_image_sha256",
    "mask_image_uri",
    "mask_image_sha256",
    "depth_map_uri",
    "depth_map_sha256",
    "depth_source",
    "notes",
    "call_id",
    "render_options",
    "env",
    "worker",
    "job_name",
    "error_type",
    "error_message",
    "attempts",
    "created_at",
)

# Fields that determine the pixels; the PNG's `sdbatch` chunk holds exactly these so
# identical renders give identical bytes (no timestamps or timings inside the image).
REPRODUCIBLE_FIELDS = (
    "id",
    "row_id",
    "sweep",
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
    "torch_threads",
    "device",
    "dtype",
    "prompt_truncated",
    "render_options",
)
# Reproducible fields that only some items use (SDXL's, adapters): stored in the image
# only when set, so an image without them has the bytes it had before they existed (the
# family itself is in the metadata; the weights hash already pins it). `prompt_syntax`
# likewise, only when not plain (`record_json`).
FAMILY_FIELDS = (
    *CONDITIONING_FIELDS,
    "loras",
    "embeddings",
    "adapters",
)


def failed_fields(error_type: str, message: str, attempts: int = 1) -> dict[str, Any]:
    """The fields that make a render row a failure row (the render actor's, the driver's
    for an item that killed its actor): no pixels, no call, why, and how many tries."""
    return {
        "status": "failed",
        "pixels": None,
        "batch_position": None,
        "render_seconds": None,
        "scheduler_class": None,
        "call_id": None,
        "error_type": error_type,
        "error_message": message,
        "attempts": attempts,
    }


def crash_failures(job_name: str, dead: dict[tuple[str, int], list[Any]]) -> pa.Table:
    """Failure rows for items whose render killed the actor process every time (`dead`:
    key → [crashes, crashes while alone, item]; the driver builds them, `runner`)."""
    now = datetime.now(timezone.utc)
    rows = []
    for crashes, alone, item in dead.values():
        message = (
            f"the render actor's process died {crashes} times with this item in hand "
            f"({alone} of them rendering it alone): the pipeline call kills the process "
            "(a crash or an out-of-memory kill in native code)"
        )
        row = {name: item.get(name) for name in METADATA_SCHEMA.names}
        row.update(failed_fields("ActorCrash", message, attempts=crashes))
        row.update(job_name=job_name, created_at=now, image_uri=None, sha256=None)
        rows.append({name: row.get(name) for name in METADATA_SCHEMA.names})
    return pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)


def sampler_name(row: dict[str, Any]) -> str:
    return a1111_name(row["scheduler"], row.get("scheduler_class"))


def _num(value: float) -> str:
    return f"{value:g}"


def _quote(value: str) -> str:
    """A1111's quote(): values holding ',', ':' or newlines are JSON strings."""
    if any(c in value for c in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value


def _model_name(ref: str) -> str:
    return str(ref).rstrip("/").rsplit("/", 1)[-1]


def infotext(row: dict[str, Any]) -> str:
    """AUTOMATIC1111's `parameters` text, readable by its PNG Info tab and Civitai.

    SDXL images add what A1111 writes for them: `Refiner: NAME [hash]` and `Refiner
    switch at`, and the depth ControlNet as sd-webui-controlnet's `ControlNet 0` unit.
    """
    fields = [
        f"Steps: {row['steps']}",
        f"Sampler: {_quote(sampler_name(row))}",
        f"CFG scale: {_num(row['guidance_scale'])}",
        f"Seed: {row['seed']}",
        f"Size: {row['width']}x{row['height']}",
        f"Model hash: {(row.get('model_sha256') or '')[:10]}",
        f"Model: {_quote(_model_name(row['model']))}",
    ]
    if row["mode"] != "txt2img":
        fields.append(f"Denoising strength: {_num(row['strength'])}")
    if row.get("refiner"):
        refiner = f"{_model_name(row['refiner'])} [{(row.get('refiner_sha256') or '')[:10]}]"
        fields.append(f"Refiner: {_quote(refiner)}")
        fields.append(f"Refiner switch at: {_num(row['refiner_switch'])}")
    if row.get("controlnet"):
        unit = (
            f"Module: {'none' if row.get('depth_source') == 'provided' else 'depth'}, "
            f"Model: {_model_name(row['controlnet'])} [{(row.get('controlnet_sha256') or '')[:8]}], "
            f"Weight: {_num(row['controlnet_conditioning_scale'])}"
        )
        fields.append(f"ControlNet 0: {json.dumps(unit)}")
    adapters = json.loads(row["adapters"]) if row.get("adapters") else {}
    loras = adapters.get("loras", [])
    if loras:
        names = ", ".join(f"{a['name']}: {a['short_hash']}" for a in loras)
        fields.append(f"Lora hashes: {json.dumps(names)}")
    if adapters.get("embeddings"):
        names = ", ".join(f"{a['name']}: {a['short_hash']}" for a in adapters["embeddings"])
        fields.append(f"TI hashes: {json.dumps(names)}")
    # A1111 keeps the tags in the prompt text; the encoded prompt here has them removed.
    tags = "".join(f" <lora:{a['name']}:{_num(a['weight'])}>" for a in loras)
    lines = [row["prompt"] + tags]
    if row.get("negative_prompt"):
        lines.append(f"Negative prompt: {row['negative_prompt']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def record_json(row: dict[str, Any]) -> str:
    """The reproducible record of an item, as stored inside its image."""
    record = {k: row.get(k) for k in REPRODUCIBLE_FIELDS}
    record.update({k: row[k] for k in FAMILY_FIELDS if row.get(k) is not None})
    if row.get("prompt_syntax") not in (None, "plain"):
        record["prompt_syntax"] = row["prompt_syntax"]
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


# EXIF tags for JPEG/WebP, where PNG text chunks don't exist: A1111 reads its infotext
# from UserComment ("UNICODE\0" + UTF-16BE), the JSON record goes in ImageDescription.
_EXIF_IFD, _USER_COMMENT, _IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


def encode_image(
    pixels: np.ndarray, row: dict[str, Any], options: dict[str, Any] | None = None
) -> bytes:
    """Encode pixels with the item's parameters embedded (PNG text chunks or EXIF)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    options = options or {}
    fmt = options.get("format", "png")
    image = Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", infotext(row))
        info.add_text("sdbatch", record_json(row))
        image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()
    exif = Image.Exif()
    exif[_IMAGE_DESCRIPTION] = json.dumps(json.loads(record_json(row)), sort_keys=True)
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + infotext(row).encode("utf-16-be")
    quality = int(options.get("quality", 95))
    if fmt == "webp":
        image.save(
            buf,
            format="WEBP",
            quality=quality,
            lossless=bool(options.get("lossless")),
            method=4,
            exif=exif,
        )
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=quality, subsampling=0, exif=exif)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def write_batch(
    batch: pa.Table,
    *,
    output: str,
    job_name: str,
    storage: dict[str, Any] | None = None,
    image_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Encode each rendered image and store it; return metadata rows (schema above).

    With the webdataset layout nothing is stored here: the encoded bytes go on in an
    `encoded` column to the job's `ShardPacker`.
    """
    from .store import open_store

    options = image_options or {}
    shards = options.get("layout") == "webdataset"
    content_type = CONTENT_TYPES[options.get("format", "png")]

    store = open_store(output, storage)
    now = datetime.now(timezone.utc)
    rows, encoded = [], []
    store_error: StoreError | None = None
    for row in batch.to_pylist():
        pixels = row.pop("pixels", None)
        row.update(job_name=job_name, created_at=now, image_uri=None, sha256=None)
        data = None
        if row["status"] == "ok" and store_error is not None:
            row.update(status=UNSTORED, error_type="StoreError", error_message=str(store_error))
        elif row["status"] == "ok":
            image = np.frombuffer(pixels, dtype=np.uint8).reshape(row["height"], row["width"], 3)
            data = encode_image(image, row, options)
            row["sha256"] = hashlib.sha256(data).hexdigest()
            if not shards:
                try:
                    store.write_bytes(row["key"], data, content_type=content_type)
                    row["image_uri"] = store.uri_of(row["key"])
                except StoreError as err:
                    # The output failed (disk full, access revoked): the images stored so
                    # far are still committed; this one and the rest of the block are
                    # not failures of theirs, and stop the job (`commit`).
                    store_error, data = err, None
                    row.update(status=UNSTORED, error_type="StoreError", error_message=str(err))
        rows.append({name: row.get(name) for name in METADATA_SCHEMA.names})
        encoded.append(data)
    table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
    if shards:
        table = table.append_column("encoded", pa.array(encoded, pa.binary()))
    return table


class ShardPacker:
    """Packs encoded images into WebDataset tar shards (`{sample}.{ext}` + `{sample}.json`).

    Runs as one Ray actor per job, beside the write tasks (`stream.write_blocks` hands it
    each block's finished items), never in the driver: the open shard is a temporary file
    on the actor's node, so memory does not grow with shard_size × image size. A shard is
    uploaded whole when it holds `shard_size` samples (or when the driver closes the
    packer at the end of the run); only then are its samples' metadata rows released to
    be committed, so an interrupted run never records an item whose shard does not
    exist, and resume re-renders what the lost open shard held. An item added twice (a
    retried write task) is packed once.
    """

    def __init__(
        self,
        output: str,
        storage: dict[str, Any] | None,
        run_id: str,
        shard_size: int,
        extension: str,
    ):
        from .store import open_store

        self.store = open_store(output, storage)
        self.run_id, self.shard_size, self.extension = run_id, shard_size, extension
        self.seq = 0
        self._open_shard()

    def _open_shard(self) -> None:
        import tarfile
        import tempfile

        fd, self.path = tempfile.mkstemp(prefix=f"sdbatch-shard-{self.run_id}-", suffix=".tar")
        self.file = os.fdopen(fd, "w+b")
        self.tar = tarfile.open(fileobj=self.file, mode="w")
        self.rows: list[dict[str, Any]] = []
        self.keys: set[str] = set()

    def _add_member(self, name: str, data: bytes) -> None:
        import tarfile

        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, table: pa.Table) -> list[pa.Table]:
        """Add finished items (rows with `encoded`); return metadata of shards closed now."""
        closed = []
        for row in table.to_pylist():
            data = row.pop("encoded")
            if row["key"] in self.keys:
                continue
            # WebDataset splits a member name at its first dot: keep the sample key dot-free.
            sample = row["key"].rsplit("/", 1)[-1].rsplit(".", 1)[0].replace(".", "_")
            self._add_member(f"{sample}.{self.extension}", data)
            self._add_member(
                f"{sample}.json",
                json.dumps(
                    {**{k: row.get(k) for k in REPRODUCIBLE_FIELDS}, "sha256": row["sha256"]},
                    sort_keys=True,
                ).encode(),
            )
            row["member"] = f"{sample}.{self.extension}"
            self.rows.append(row)
            self.keys.add(row["key"])
            if len(self.rows) >= self.shard_size:
                closed.append(self.close())
        return [t for t in closed if t.num_rows]

    def close(self) -> pa.Table:
        """Upload the open shard (if it has samples) and return its metadata rows."""
        if not self.rows:
            return METADATA_SCHEMA.empty_table()
        self.tar.close()
        self.file.close()
        key = f"shards/{self.run_id}-{self.seq:05d}.tar"
        try:
            self.store.write_file(key, self.path, content_type="application/x-tar")
        finally:
            os.unlink(self.path)
        for row in self.rows:
            row.update(key=key, image_uri=f"{self.store.uri_of(key)}#{row['member']}")
        table = pa.Table.from_pylist(
            [{n: r.get(n) for n in METADATA_SCHEMA.names} for r in self.rows],
            schema=METADATA_SCHEMA,
        )
        self.seq += 1
        self._open_shard()
        return table

"""Planning, pure and Ray-free: manifest rows × image index → work items.

An item is fully described by its row, its image index `k` and the job spec. Its seed and
output key depend on nothing else (never on batch position, shard or worker), which is
what makes resume and `sdbatch rerun` possible.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa

from .adapters import choose as choose_loras
from .adapters import embeddings_in
from .spec import MAX_SEED, SAMPLING_FIELDS, JobSpec, RenderParams

# Columns a manifest row may set to override `defaults`: the spec's RenderParams.
OVERRIDES = tuple(RenderParams.model_fields)
# SDXL micro-conditioning: [height, width] pairs and the crop's [top, left].
SIZE_CONDITIONING = ("original_size", "target_size", "crops_coords_top_left")
# The refiner's second stage exists for these modes (diffusers has no refiner route for
# the ControlNet img2img pipeline that SDXL's depth2img uses).
REFINER_MODES = ("txt2img", "img2img", "inpaint")
DEFAULT_REFINER_SWITCH = 0.8  # diffusers' docs and A1111's default
IMAGE_COLUMNS = ("init_image", "mask_image", "depth_map")

# Every column of a planned item, a prepared item and a metadata row, with its Arrow
# type: the one place column types are written (plan, prepare, write and the manifest's
# type checks read it). Names not listed here are strings.
COLUMN_TYPES: dict[str, pa.DataType] = {
    "image_index": pa.int32(),
    "seed": pa.int64(),
    "steps": pa.int32(),
    "num_images": pa.int32(),
    "width": pa.int32(),
    "height": pa.int32(),
    "guidance_scale": pa.float64(),
    "strength": pa.float64(),
    "refiner_switch": pa.float64(),
    "controlnet_conditioning_scale": pa.float64(),
    **{c: pa.list_(pa.int32()) for c in SIZE_CONDITIONING},
    **{c: pa.binary() for c in IMAGE_COLUMNS},
    **{c: pa.binary() for c in ("init_pixels", "mask_pixels", "depth_pixels")},
    "batch_size": pa.int32(),
    "batch_position": pa.int32(),
    "torch_threads": pa.int32(),
    "attempts": pa.int32(),
    "prompt_truncated": pa.bool_(),
    "render_seconds": pa.float64(),
    "created_at": pa.timestamp("us", tz="UTC"),
}


def schema(*names: str) -> pa.Schema:
    """An Arrow schema of these columns, typed from COLUMN_TYPES."""
    return pa.schema([(name, COLUMN_TYPES.get(name, pa.string())) for name in names])


# A manifest image cell is a URI (string) or the encoded bytes; items carry either in
# `<column>_uri` or `<column>`, and the prepare stage turns both into decoded pixels.
ITEM_SCHEMA = schema(
    "id",
    "row_id",
    "sweep",
    "image_index",
    "seed",
    "prompt",
    "negative_prompt",
    "prompt_syntax",
    "loras",
    "embeddings",
    "mode",
    "model",
    "model_family",
    "refiner",
    "refiner_switch",
    "controlnet",
    "controlnet_conditioning_scale",
    "depth_estimator",
    *SIZE_CONDITIONING,
    *SAMPLING_FIELDS,
    "key",
    "depth_source",
    "batch_key",
    *IMAGE_COLUMNS,
    *[f"{c}_uri" for c in IMAGE_COLUMNS],
)

# Parameters that must agree for items to share one pipeline call.
BATCH_FIELDS = (
    "mode",
    "model",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "scheduler",
    "strength",
    "depth_source",
    "refiner",
    "refiner_switch",
    "controlnet",
    "controlnet_conditioning_scale",
    "depth_estimator",
    *SIZE_CONDITIONING,
    "loras",
    "prompt_syntax",
)


def item_seed(job_seed: int, item_id: str, k: int, row_seed: int | None = None) -> int:
    """The seed of image `k` of row `item_id`.

    With a row seed: `(row_seed + k) mod 2**63` (A1111's convention for a batch: image k
    gets seed + k). Otherwise the first 8 bytes of SHA-256 over (job seed, id, k), as an
    int in [0, 2**63).
    """
    if row_seed is not None:
        return (int(row_seed) + k) % (MAX_SEED + 1)
    digest = hashlib.sha256(f"sdbatch-seed\0{job_seed}\0{item_id}\0{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(item_id: str, limit: int = 60) -> str:
    text = unicodedata.normalize("NFKD", item_id).encode("ascii", "ignore").decode()
    text = _UNSAFE.sub("_", text).strip("._-")
    return text[:limit] or "item"


def image_key(item_id: str, k: int, ext: str = "png") -> str:
    """Output key of an image, relative to the output prefix.

    A readable slug of the id plus a hash of the exact id: two ids never collide, and no
    id (`../x`, `a/b`, unicode, dots) can escape `images/` or create sub-folders. The two
    hex chars of fan-out keep any one local folder small.
    """
    h = hashlib.sha256(item_id.encode()).hexdigest()
    return f"images/{h[:2]}/{_slug(item_id)}-{h[:12]}-{k:04d}.{ext}"


def batch_key(item: dict[str, Any]) -> str:
    """Items with equal batch keys can be rendered in one pipeline call.

    SDXL encodes an empty negative prompt as zeros only when the whole call has none
    (`force_zeros_for_empty_prompt`), so there an empty one must not share a call with a
    non-empty one: the image would depend on its neighbours.
    """
    key = "|".join(f"{item.get(f)}" for f in BATCH_FIELDS)
    if item.get("model_family") == "sdxl":
        key += "|neg" if item.get("negative_prompt") else "|noneg"
    return key


def resolve_uri(ref: str, base: str) -> str:
    """An image URI from a manifest: absolute paths and URLs as-is, else relative to `base`
    (the manifest's folder or S3 prefix)."""
    if "://" in ref or ref.startswith("/"):
        return ref
    if "://" in base:
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, ref))}"
    return posixpath.normpath(posixpath.join(base, ref))


def manifest_base(manifest_uri: str) -> str:
    return manifest_uri.rstrip("/").rsplit("/", 1)[0] or "/"


def sweep_label(cell: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cell.items())


Families = Callable[[str], "str | None"]


def _no_family(ref: str) -> str | None:
    return None


def _family_params(
    params: dict[str, Any], spec: JobSpec, family: str | None, depth_provided: bool
) -> dict[str, Any]:
    """The parameters only one family uses, resolved to what the pipeline call gets (None
    where they do not apply), so that metadata records what shaped the image."""
    assert spec.models is not None
    out: dict[str, Any] = {
        "refiner": None,
        "refiner_switch": None,
        "controlnet": None,
        "controlnet_conditioning_scale": None,
        "depth_estimator": None,
        **dict.fromkeys(SIZE_CONDITIONING),
    }
    if family != "sdxl":
        return out
    size = [int(params["height"]), int(params["width"])]
    out["original_size"] = list(params["original_size"] or size)
    out["target_size"] = list(params["target_size"] or size)
    out["crops_coords_top_left"] = list(params["crops_coords_top_left"] or (0, 0))
    switch = params["refiner_switch"]
    switch = DEFAULT_REFINER_SWITCH if switch is None else float(switch)
    if spec.models.refiner and params["mode"] in REFINER_MODES and switch < 1:
        out.update(refiner=spec.models.refiner, refiner_switch=switch)
    if params["mode"] == "depth2img":
        out["controlnet"] = spec.models.depth_controlnet
        out["controlnet_conditioning_scale"] = float(params["controlnet_conditioning_scale"])
        if not depth_provided:
            out["depth_estimator"] = spec.models.depth_estimator
    return out


def expand_row(
    row: dict[str, Any], spec: JobSpec, base: str = "/", families: Families = _no_family
) -> Iterator[dict[str, Any]]:
    """The work items of one manifest row: one per image index (× sweep cell).

    With a sweep, each grid cell is its own item with id `ROW@k=v,...`. Its seed derives
    from that id (so cells get different noise), unless `sweep.same_seed` keeps the
    row's own seeds across the grid. `families` names a checkpoint's family (sd1, sd2,
    sdxl; `models.family_of`), which decides the family-specific parameters.
    """
    defaults = spec.defaults.model_dump()
    row_params = {
        name: (row[name] if row.get(name) is not None else defaults[name]) for name in OVERRIDES
    }
    row_id = str(row["id"])
    row_seed = row.get("seed")
    cells = spec.sweep.grid() if spec.sweep else [{}]
    same_seed = spec.sweep.same_seed if spec.sweep else True
    for cell in cells:
        params = {**row_params, **cell}
        item_id = f"{row_id}@{sweep_label(cell)}" if cell else row_id
        model = spec.model_for(params["mode"])
        family = families(model)
        family_params = _family_params(params, spec, family, row.get("depth_map") is not None)
        # `<lora:…>` tags leave the prompt; checked by the manifest validation already.
        prompt, loras = choose_loras(row["prompt"], params["loras"], spec.loras)
        embeddings = embeddings_in([prompt, params["negative_prompt"]], list(spec.embeddings))
        for k in range(int(params["num_images"])):
            if same_seed:
                seed = item_seed(spec.seed, row_id, k, row_seed)
            else:
                seed = item_seed(spec.seed if row_seed is None else int(row_seed), item_id, k)
            item = {
                "id": item_id,
                "row_id": row_id,
                "sweep": json.dumps(cell, sort_keys=True) if cell else None,
                "image_index": k,
                "seed": seed,
                "prompt": prompt,
                "model": model,
                "model_family": family,
                "key": image_key(item_id, k, spec.output_options.extension),
                **{name: params[name] for name in OVERRIDES if name != "num_images"},
                **family_params,
                "loras": loras,
                "embeddings": embeddings,
            }
            for name in IMAGE_COLUMNS:
                value = row.get(name)
                item[name] = value if isinstance(value, bytes) else None
                item[f"{name}_uri"] = resolve_uri(value, base) if isinstance(value, str) else None
            if item["mode"] == "depth2img":
                provided = item["depth_map"] is not None or item["depth_map_uri"] is not None
                item["depth_source"] = "provided" if provided else "estimated"
            else:
                item["depth_source"] = None
            item["steps"] = int(item["steps"])
            item["width"] = int(item["width"])
            item["height"] = int(item["height"])
            item["guidance_scale"] = float(item["guidance_scale"])
            item["strength"] = float(item["strength"]) if item["mode"] != "txt2img" else 1.0
            item["batch_key"] = batch_key(item)
            yield item


def plan_items(
    rows: Iterable[dict[str, Any]],
    spec: JobSpec,
    done: set[tuple[str, int]] | frozenset[tuple[str, int]] = frozenset(),
    families: Families = _no_family,
) -> Iterator[dict[str, Any]]:
    """All items of `rows` not yet in `done` (a set of `(id, image_index)`)."""
    base = manifest_base(spec.manifest)
    for row in rows:
        for item in expand_row(row, spec, base, families):
            if (item["id"], item["image_index"]) not in done:
                yield item


def homogeneous_blocks(
    items: Iterable[dict[str, Any]],
    block_rows: int,
    first: tuple[int, int] = (0, 0),
    alone: Callable[[dict[str, Any]], bool] = lambda item: False,
) -> Iterator[list[dict[str, Any]]]:
    """Group items into blocks of `block_rows` that share one batch key.

    Blocks are emitted as soon as they fill, so memory is bounded by
    (distinct batch keys × block_rows); the remainders come last. `first` = (count,
    rows): the first `count` blocks hold `rows` items (a job's first blocks are one
    pipeline call each, so every actor stores an image within one call of starting).
    An item `alone` says so is a block of its own (one suspected of killing its actor).
    """
    pending: dict[str, list[dict[str, Any]]] = {}
    small, small_rows = first
    for item in items:
        if alone(item):
            yield [item]
            continue
        bucket = pending.setdefault(item["batch_key"], [])
        bucket.append(item)
        if len(bucket) >= (small_rows if small > 0 else block_rows):
            small -= 1
            yield pending.pop(item["batch_key"])
    yield from (bucket for bucket in pending.values() if bucket)


def block_rows_for(total_items: int, batch_size: int, actors: int) -> int:
    """Rows per block: a multiple of the batch size, small enough that every actor gets
    several blocks, large enough that a 10⁶-item job is not a million tiny objects."""
    per_actor = max(1, total_items // max(1, actors * 4))
    batches = max(1, min(16, per_actor // batch_size))
    return batches * batch_size

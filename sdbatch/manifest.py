"""Parquet manifests: schema and value checks before any rendering, then streamed rows.

The manifest is never loaded whole: validation and planning read it record batch by
record batch, so a 10⁶-row manifest costs the driver a set of ids, not a DataFrame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .plan import IMAGE_COLUMNS, OVERRIDES, SIZE_CONDITIONING
from .spec import MAX_SEED, MODES, SCHEDULERS, JobSpec

REQUIRED = ("id", "prompt")
MAX_PROBLEMS = 20
READ_ROWS = 8192


class ManifestError(Exception):
    """A manifest that cannot run; `problems` holds one readable line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_image(t: pa.DataType) -> bool:
    return _is_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_int_list(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    ) and pa.types.is_integer(t.value_type)


COLUMN_TYPES = {
    "id": (_is_string, "string"),
    "prompt": (_is_string, "string"),
    "negative_prompt": (_is_string, "string"),
    "mode": (_is_string, "string"),
    "scheduler": (_is_string, "string"),
    "seed": (_is_int, "integer"),
    "steps": (_is_int, "integer"),
    "width": (_is_int, "integer"),
    "height": (_is_int, "integer"),
    "num_images": (_is_int, "integer"),
    "guidance_scale": (_is_number, "number"),
    "strength": (_is_number, "number"),
    "refiner_switch": (_is_number, "number"),
    "controlnet_conditioning_scale": (_is_number, "number"),
    **{c: (_is_int_list, "a list of 2 integers") for c in SIZE_CONDITIONING},
    **{c: (_is_image, "string URI or binary image bytes") for c in IMAGE_COLUMNS},
}


def _range(lo: float, hi: float, what: str = "") -> Any:
    def check(v: Any) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number{what}, got {v}"
        if not (lo <= v <= hi):
            return f"must be {lo:g}..{hi:g}{what}, got {v}"
        return None

    return check


def _size(v: int) -> str | None:
    if not (8 <= v <= 4096) or v % 8:
        return f"must be a multiple of 8 in 8..4096, got {v}"
    return None


def _pair(lo: int, what: str) -> Any:
    def check(v: list[int]) -> str | None:
        if len(v) != 2 or any(x is None or not (lo <= x <= 16384) for x in v):
            return f"must be 2 integers in {lo}..16384 {what}, got {v}"
        return None

    return check


def _choice(options: tuple[str, ...]) -> Any:
    def check(v: str) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}, got {v!r}"

    return check


VALUE_CHECKS = {
    "seed": _range(0, MAX_SEED),
    "steps": _range(1, 500),
    "num_images": _range(1, 10_000),
    "guidance_scale": _range(0, 100),
    "strength": _range(0, 1),
    "refiner_switch": _range(0, 1, " (0 excluded)"),
    "controlnet_conditioning_scale": _range(0, 2),
    "original_size": _pair(1, "[height, width]"),
    "target_size": _pair(1, "[height, width]"),
    "crops_coords_top_left": _pair(0, "[top, left]"),
    "width": _size,
    "height": _size,
    "mode": _choice(MODES),
    "scheduler": _choice(SCHEDULERS),
}


@dataclass
class ManifestInfo:
    uri: str
    num_rows: int
    total_items: int
    columns: list[str]
    modes: set[str] = field(default_factory=set)
    # Whether some depth2img row has no depth_map (its depth is estimated).
    estimates_depth: bool = False


def _open(uri: str, storage: dict[str, Any] | None) -> pq.ParquetFile:
    from .store import StoreError, open_store, split_uri

    try:
        parent, name = split_uri(uri)
        return pq.ParquetFile(open_store(parent, storage).open_input(name))
    except FileNotFoundError:
        raise ManifestError([f"{uri}: manifest not found"]) from None
    except StoreError as err:  # no credentials, access denied, unreachable endpoint, ...
        raise ManifestError([str(err)]) from None
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError([f"{uri}: not a readable Parquet file: {err}"]) from None


def _id_problem(value: Any) -> str | None:
    if value is None:
        return "id is null"
    if not value.strip():
        return "id is empty"
    if not value.strip("./\\ "):
        return f"id {value!r} is only dots/slashes"
    return None


def validate_manifest(uri: str, spec: JobSpec) -> ManifestInfo:
    """Check columns, types and every value; raise ManifestError listing the problems."""
    pf = _open(uri, spec.storage.model_dump())
    schema = pf.schema_arrow
    problems: list[str] = []

    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise ManifestError(
            [
                f"{uri}: missing required column {c!r} (columns: {', '.join(schema.names)})"
                for c in missing
            ]
        )
    for name in schema.names:
        if name in COLUMN_TYPES:
            ok, expected = COLUMN_TYPES[name]
            t = schema.field(name).type
            if not ok(t):
                problems.append(f"{uri}: column {name!r} must be {expected}, got {t}")
    if problems:
        raise ManifestError(problems)
    if pf.metadata.num_rows == 0:
        raise ManifestError([f"{uri}: manifest has no rows"])

    columns = [c for c in schema.names if c in COLUMN_TYPES]
    checks = {c: VALUE_CHECKS[c] for c in columns if c in VALUE_CHECKS}
    seen: set[str] = set()
    modes: set[str] = set()
    total_items = 0
    default_n = spec.defaults.num_images
    row_no = 0
    extra = 0
    estimates_depth = False
    refiner = spec.models.refiner if spec.models else None

    def problem(msg: str) -> None:
        nonlocal extra
        if len(problems) < MAX_PROBLEMS:
            problems.append(msg)
        else:
            extra += 1

    for batch in pf.iter_batches(batch_size=READ_ROWS, columns=columns):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            row = {c: data[c][i] for c in columns}
            item_id = row["id"]
            where = f"{uri}: row {row_no} (id {item_id!r})"
            row_no += 1
            bad_id = _id_problem(item_id)
            if bad_id:
                problem(f"{uri}: row {row_no - 1}: {bad_id}")
            elif item_id in seen:
                problem(f"{where}: duplicate id")
            else:
                seen.add(item_id)
            if row["prompt"] is None:
                problem(f"{where}: prompt is null")
            for name, check in checks.items():
                value = row[name]
                if value is not None:
                    msg = check(value)
                    if msg:
                        problem(f"{where}: {name} {msg}")
            if row.get("refiner_switch") == 0:
                problem(f"{where}: refiner_switch must be > 0 (1 = base model only), got 0")
            if row.get("refiner_switch") is not None and not refiner:
                problem(f"{where}: refiner_switch is set but the spec has no models.refiner")
            mode = row.get("mode") or spec.defaults.mode
            modes.add(mode)
            if mode == "depth2img" and row.get("depth_map") is None:
                estimates_depth = True
            if mode != "txt2img" and mode in MODES:
                if row.get("init_image") is None:
                    problem(f"{where}: mode {mode} needs an init_image, got none")
                if mode == "inpaint" and row.get("mask_image") is None:
                    problem(f"{where}: mode inpaint needs a mask_image, got none")
                steps = row.get("steps") or spec.defaults.steps
                strength = row.get("strength")
                strength = spec.defaults.strength if strength is None else strength
                if 0 < strength <= 1 and int(steps * strength) < 1:
                    problem(
                        f"{where}: strength {strength:g} × steps {steps} rounds to 0 denoising "
                        "steps (diffusers refuses it); raise steps or strength, or use strength 0 "
                        "to keep the input unchanged"
                    )
            n = row.get("num_images")
            total_items += n if isinstance(n, int) and n > 0 else default_n
    if extra:
        problems.append(f"{uri}: ... and {extra} more problems")
    if spec.sweep and not problems:
        cells = len(spec.sweep.grid())
        total_items *= cells
        if total_items > spec.sweep.max_items:
            problems.append(
                f"{uri}: the sweep expands {row_no} rows × {cells} grid cells into "
                f"{total_items:,} items, over sweep.max_items={spec.sweep.max_items:,}"
            )
    if problems:
        raise ManifestError(problems)
    return ManifestInfo(uri, row_no, total_items, columns, modes, estimates_depth)


def iter_rows(
    uri: str, columns: list[str], storage: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Manifest rows as dicts, streamed (only `columns` are read)."""
    pf = _open(uri, storage)
    for batch in pf.iter_batches(batch_size=READ_ROWS, columns=columns):
        yield from batch.to_pylist()


__all__ = ["ManifestError", "ManifestInfo", "OVERRIDES", "iter_rows", "validate_manifest"]

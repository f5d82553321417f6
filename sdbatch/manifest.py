"""Parquet manifests: schema and value checks before any rendering, then streamed rows.

The manifest is never loaded whole: validation and planning read it record batch by
record batch (validation one row group at a time). Validation checks a batch's values
with Arrow compute kernels and runs the per-row checks, which word the messages, only
on the rows the kernels cannot clear. Duplicate ids are found from a 64-bit hash per
row, sorted once and confirmed on the ids of the rows whose hash repeats, so a 10⁷-row
manifest costs the driver 80 MB of hashes, not a set of ids.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import Problem, StoreError, UserError
from .plan import IMAGE_COLUMNS, OVERRIDES, schema
from .spec import MODES, JobSpec
from .values import VALUE_CHECKS, Loras, LoraTags, any_of

REQUIRED = ("id", "prompt")
MAX_PROBLEMS = 20
READ_ROWS = 8192
CHECK_ROWS = 65_536  # rows per batch while validating: kernels amortise their calls
PROGRESS_ROWS = 1_000_000


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


_KINDS = {
    pa.string(): (_is_string, "string"),
    pa.int32(): (_is_int, "integer"),
    pa.int64(): (_is_int, "integer"),
    pa.float64(): (_is_number, "number"),
    pa.list_(pa.int32()): (_is_int_list, "a list of 2 integers"),
}
# What each manifest column may hold: the kind of its item column's type (plan.py).
COLUMN_TYPES = {
    **{name: _KINDS[schema(name).field(0).type] for name in ("id", "prompt", "seed", *OVERRIDES)},
    **{c: (_is_image, "string URI or binary image bytes") for c in IMAGE_COLUMNS},
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
    from .store import open_store, split_uri

    try:
        parent, name = split_uri(uri)
        return pq.ParquetFile(open_store(parent, storage).open_input(name))
    except FileNotFoundError:
        raise UserError([f"{uri}: manifest not found"]) from None
    except StoreError as err:  # no credentials, access denied, unreachable endpoint, ...
        raise UserError([str(err)]) from None
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError([f"{uri}: not a readable Parquet file: {err}"]) from None


def _id_problem(value: Any) -> str | None:
    if value is None:
        return "id is null"
    if not value.strip():
        return "id is empty"
    if not value.strip("./\\ "):
        return f"id {value!r} is only dots/slashes"
    return None


# Matches every id `_id_problem` refuses but null: Python's whitespace is within \p{Z},
# the ASCII controls and U+0085 (tests/unit/test_manifest_scale.py checks it).
_BLANK_ID = r"\A[\p{Z}\x00-\x20\x85./\\]*\z"
_INPUT_MODES = tuple(m for m in MODES if m != "txt2img")


def _batches(pf: pq.ParquetFile, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
    # One row group per reader: over the whole file, pre-buffering (on in `_open`, which
    # S3 needs) keeps every row group read so far until the reader ends.
    for group in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=rows, row_groups=[group], columns=columns)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array:
    """A column of the batch; all nulls when the manifest has none (as `row.get`)."""
    if name in batch.schema.names:
        return batch.column(name)
    return pa.nulls(batch.num_rows, pa.float64())


def _row_modes(batch: pa.RecordBatch, default: str) -> pa.Array:
    """Each row's mode as the row checks read it: `row["mode"] or defaults.mode`."""
    if "mode" not in batch.schema.names:
        return pc.fill_null(pa.nulls(batch.num_rows, pa.string()), default)
    mode = batch.column("mode")
    unset = pc.fill_null(pc.equal(mode, ""), True)
    return pc.if_else(unset, pa.scalar(default, mode.type), mode)


def _no_denoising(batch: pa.RecordBatch, spec: JobSpec) -> pa.Array:
    """Rows whose strength × steps rounds to 0 (the row check's arithmetic, in float64:
    the same products for every steps value the range check lets through)."""
    d = spec.defaults
    steps = pc.cast(_column(batch, "steps"), pa.float64(), safe=False)
    steps = pc.if_else(pc.fill_null(pc.equal(steps, 0.0), True), float(d.steps), steps)
    strength = pc.cast(_column(batch, "strength"), pa.float64(), safe=False)
    strength = pc.fill_null(strength, float(d.strength))
    in_range = pc.and_(pc.greater(strength, 0.0), pc.less_equal(strength, 1.0))
    return pc.and_(in_range, pc.less(pc.multiply(steps, strength), 1.0))


def _suspects(
    batch: pa.RecordBatch, modes: pa.Array, checks: dict[str, Any], spec: JobSpec
) -> np.ndarray:
    """Indices of the rows the row checks must see: every row with a problem (duplicate
    ids aside), and a few without where a kernel cannot clear a row exactly."""
    ids = batch.column("id")
    masks = [
        pc.is_null(ids),
        pc.match_substring_regex(ids, _BLANK_ID),
        pc.is_null(batch.column("prompt")),
        *(check.suspects(batch.column(name)) for name, check in checks.items()),
    ]
    switch = _column(batch, "refiner_switch")
    has_refiner = bool(spec.models and spec.models.refiner)
    masks.append(pc.equal(switch, 0.0) if has_refiner else pc.is_valid(switch))
    needs_input = pc.is_in(modes, value_set=pa.array(_INPUT_MODES, modes.type))
    masks.append(pc.and_(needs_input, pc.is_null(_column(batch, "init_image"))))
    inpaint = pc.equal(modes, "inpaint")
    masks.append(pc.and_(inpaint, pc.is_null(_column(batch, "mask_image"))))
    masks.append(pc.and_(needs_input, _no_denoising(batch, spec)))
    return np.flatnonzero(any_of(masks, batch.num_rows).to_numpy(zero_copy_only=False))


def _row_problems(
    uri: str, row_no: int, row: dict[str, Any], checks: dict[str, Any], spec: JobSpec
) -> list[Problem]:
    """One row's problems in the order they are listed (the duplicate id line, found
    later, goes before them)."""
    found = []
    item_id = row["id"]
    where = f"{uri}: row {row_no} (id {item_id!r})"

    def add(field: str, text: str, head: str = where) -> None:
        found.append(Problem(f"{head}: {text}", file=uri, field=field, value=row.get(field)))

    bad_id = _id_problem(item_id)
    if bad_id:
        add("id", bad_id, head=f"{uri}: row {row_no}")
    if row["prompt"] is None:
        add("prompt", "prompt is null")
    for name, check in checks.items():
        value = row[name]
        if value is not None:
            msg = check(value)
            if msg:
                add(name, f"{name} {msg}")
    if row.get("refiner_switch") == 0:
        add("refiner_switch", "refiner_switch must be > 0 (1 = base model only), got 0")
    if row.get("refiner_switch") is not None and not (spec.models and spec.models.refiner):
        add("refiner_switch", "refiner_switch is set but the spec has no models.refiner")
    mode = row.get("mode") or spec.defaults.mode
    if mode != "txt2img" and mode in MODES:
        if row.get("init_image") is None:
            add("init_image", f"mode {mode} needs an init_image, got none")
        if mode == "inpaint" and row.get("mask_image") is None:
            add("mask_image", "mode inpaint needs a mask_image, got none")
        steps = row.get("steps") or spec.defaults.steps
        strength = row.get("strength")
        strength = spec.defaults.strength if strength is None else strength
        if 0 < strength <= 1 and int(steps * strength) < 1:
            add(
                "strength",
                f"strength {strength:g} × steps {steps} rounds to 0 denoising "
                "steps (diffusers refuses it); raise steps or strength, or use strength 0 "
                "to keep the input unchanged",
            )
    return found


def _items(batch: pa.RecordBatch, default: int) -> int:
    """Items of the batch's rows: num_images where positive, else the default."""
    n = _column(batch, "num_images")
    positive = pc.fill_null(pc.greater(n, 0), False)
    counted = pc.sum(pc.filter(n, positive)).as_py() or 0
    return int(counted) + default * (batch.num_rows - pc.sum(positive).as_py())


class _Problems:
    """The first MAX_PROBLEMS problems in row order, and how many there are in all."""

    def __init__(self) -> None:
        self.count = 0
        self._worst_first: list[tuple[int, int, str]] = []  # heap of negated positions

    def add(self, row_no: int, order: int, msg: str) -> None:
        self.count += 1
        entry = (-row_no, -order, msg)
        if len(self._worst_first) < MAX_PROBLEMS:
            heapq.heappush(self._worst_first, entry)
        elif entry > self._worst_first[0]:
            heapq.heapreplace(self._worst_first, entry)

    def lines(self, uri: str) -> list[str]:
        kept = [msg for _, _, msg in sorted(self._worst_first, reverse=True)]
        if self.count > len(kept):
            kept.append(f"{uri}: ... and {self.count - len(kept)} more problems")
        return kept


def _hash_ids(con: Any, ids: pa.Array) -> np.ndarray:
    """A 64-bit hash per id (DuckDB's: Arrow has no hash kernel)."""
    rel = con.from_arrow(pa.table({"id": ids})).project("hash(id) AS h")
    return np.asarray(rel.fetchnumpy()["h"], dtype=np.uint64)


def _repeated(hashes: np.ndarray) -> np.ndarray:
    """The hash values that occur more than once, sorted (sorts `hashes` in place)."""
    hashes.sort()
    return np.unique(hashes[1:][hashes[1:] == hashes[:-1]])


def _duplicates(pf: pq.ParquetFile, repeated: np.ndarray, con: Any) -> Iterator[tuple[int, str]]:
    """(row, id) of each row whose id a valid earlier row has. Only the ids of rows whose
    hash repeats become Python strings; comparing those exactly means a hash collision
    never makes a duplicate."""
    seen: set[str] = set()
    row_no = 0
    for batch in _batches(pf, ["id"], CHECK_ROWS):
        ids = batch.column(0)
        hashes = _hash_ids(con, ids)
        at = np.minimum(np.searchsorted(repeated, hashes), len(repeated) - 1)
        rows = np.flatnonzero(repeated[at] == hashes)
        for i, item_id in zip(rows.tolist(), ids.take(rows).to_pylist(), strict=True):
            if _id_problem(item_id) is None:
                if item_id in seen:
                    yield row_no + i, item_id
                seen.add(item_id)
        row_no += batch.num_rows


def _check_schema(uri: str, pf: pq.ParquetFile) -> list[str]:
    """The manifest's columns that sdbatch reads; raises on missing or mistyped columns
    and on an empty manifest."""
    schema = pf.schema_arrow
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise UserError(
            [
                Problem(
                    f"{uri}: missing required column {c!r} (columns: {', '.join(schema.names)})",
                    file=uri,
                    field=c,
                )
                for c in missing
            ]
        )
    problems = []
    for name in schema.names:
        if name in COLUMN_TYPES:
            ok, expected = COLUMN_TYPES[name]
            t = schema.field(name).type
            if not ok(t):
                problems.append(
                    Problem(
                        f"{uri}: column {name!r} must be {expected}, got {t}",
                        file=uri,
                        field=name,
                        value=str(t),
                    )
                )
    if problems:
        raise UserError(problems)
    if pf.metadata.num_rows == 0:
        raise UserError([f"{uri}: manifest has no rows"])
    return [c for c in schema.names if c in COLUMN_TYPES]


def rows_checked(rows: int) -> str:
    """The console line for a large manifest's validation progress."""
    return f"checking the manifest: {rows:,} rows"


def validate_manifest(
    uri: str, spec: JobSpec, on_progress: Callable[[int], None] | None = None
) -> ManifestInfo:
    """Check columns, types and every value; raise UserError listing the problems.

    `on_progress(rows)` gets the number of rows checked so far, about every
    PROGRESS_ROWS rows and once when all are.
    """
    import duckdb

    # 1. Columns and types, from the schema alone.
    pf = _open(uri, spec.storage.model_dump())
    columns = _check_schema(uri, pf)
    checks: dict[str, Any] = {c: VALUE_CHECKS[c] for c in columns if c in VALUE_CHECKS}
    known = tuple(spec.loras)
    checks["prompt"] = LoraTags(known)
    if "loras" in columns:
        checks["loras"] = Loras(known)

    # 2. Values, a batch at a time: kernels clear most rows; the row checks word the rest.
    found = _Problems()
    hashes = np.empty(pf.metadata.num_rows, dtype=np.uint64)
    con = duckdb.connect()
    modes: set[str] = set()
    total_items = row_no = reported = 0
    estimates_depth = False
    for batch in _batches(pf, columns, CHECK_ROWS):
        hashes[row_no : row_no + batch.num_rows] = _hash_ids(con, batch.column("id"))
        row_modes = _row_modes(batch, spec.defaults.mode)
        suspects = _suspects(batch, row_modes, checks, spec)
        for i, row in zip(suspects.tolist(), batch.take(suspects).to_pylist(), strict=True):
            for order, msg in enumerate(_row_problems(uri, row_no + i, row, checks, spec)):
                found.add(row_no + i, order, msg)
        modes.update(pc.unique(row_modes).to_pylist())
        depth = pc.and_(pc.equal(row_modes, "depth2img"), pc.is_null(_column(batch, "depth_map")))
        estimates_depth = estimates_depth or pc.any(depth).as_py() is True
        total_items += _items(batch, spec.defaults.num_images)
        row_no += batch.num_rows
        if on_progress and row_no - reported >= PROGRESS_ROWS:
            reported = row_no
            on_progress(row_no)

    # 3. Duplicate ids: the rows whose id hash repeats, confirmed on their ids.
    repeated = _repeated(hashes[:row_no])
    del hashes
    if len(repeated):
        for dup_row, item_id in _duplicates(pf, repeated, con):
            where = f"{uri}: row {dup_row} (id {item_id!r})"
            found.add(
                dup_row, -1, Problem(f"{where}: duplicate id", file=uri, field="id", value=item_id)
            )
    con.close()
    if on_progress and row_no >= PROGRESS_ROWS:  # a small manifest: no line at all
        on_progress(row_no)

    # 4. The sweep's size, then the verdict.
    problems = found.lines(uri)
    if spec.sweep and not problems:
        cells = len(spec.sweep.grid())
        total_items *= cells
        if total_items > spec.sweep.max_items:
            problems.append(
                f"{uri}: the sweep expands {row_no} rows × {cells} grid cells into "
                f"{total_items:,} items, over sweep.max_items={spec.sweep.max_items:,}"
            )
    if problems:
        raise UserError(problems)
    return ManifestInfo(uri, row_no, total_items, columns, modes, estimates_depth)


def iter_rows(
    uri: str, columns: list[str], storage: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Manifest rows as dicts, streamed (only `columns` are read)."""
    pf = _open(uri, storage)
    for batch in _batches(pf, columns, READ_ROWS):
        yield from batch.to_pylist()


__all__ = ["ManifestInfo", "OVERRIDES", "iter_rows", "validate_manifest"]

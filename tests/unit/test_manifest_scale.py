"""The batch-wise validator says exactly what the row-by-row one said, on any manifest.

`reference_validate` is the validator as it was before validation became batch-wise
(a Python dict and a set entry per row); every test here compares the two on manifests
with problems of every kind injected, read in small batches so problems, duplicates and
row numbers cross batch and row-group boundaries.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sdbatch import manifest
from sdbatch.errors import UserError
from sdbatch.manifest import (
    COLUMN_TYPES,
    MAX_PROBLEMS,
    READ_ROWS,
    REQUIRED,
    ManifestInfo,
    _open,
    validate_manifest,
)
from sdbatch.spec import MAX_SEED, MODES, SCHEDULERS, JobSpec, parse_spec

# ---------------------------------------------------------------- the reference


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


REFERENCE_CHECKS = {
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


def _id_problem(value: Any) -> str | None:
    if value is None:
        return "id is null"
    if not value.strip():
        return "id is empty"
    if not value.strip("./\\ "):
        return f"id {value!r} is only dots/slashes"
    return None


def reference_validate(uri: str, spec: JobSpec) -> ManifestInfo:
    """validate_manifest before it became batch-wise (sdbatch b369b3a), unchanged."""
    pf = _open(uri, spec.storage.model_dump())
    schema = pf.schema_arrow
    problems: list[str] = []

    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise UserError(
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
        raise UserError(problems)
    if pf.metadata.num_rows == 0:
        raise UserError([f"{uri}: manifest has no rows"])

    columns = [c for c in schema.names if c in COLUMN_TYPES]
    checks = {c: REFERENCE_CHECKS[c] for c in columns if c in REFERENCE_CHECKS}
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
        raise UserError(problems)
    return ManifestInfo(uri, row_no, total_items, columns, modes, estimates_depth)


# ---------------------------------------------------------------- manifests with problems

BASE = {"name": "t", "manifest": "/m", "output": "/o"}
SPECS = {
    "plain": parse_spec({**BASE, "model": "/m"}),
    "refiner": parse_spec({**BASE, "models": {"base": "/m", "refiner": "/r"}}),
    "img2img": parse_spec(
        {**BASE, "model": "/m", "defaults": {"mode": "img2img", "steps": 4, "strength": 0.3}}
    ),
    "sweep": parse_spec({**BASE, "model": "/m", "sweep": {"steps": [1, 2], "max_items": 10**9}}),
    "small sweep": parse_spec(
        {**BASE, "model": "/m", "sweep": {"steps": [1, 2], "max_items": 400}}
    ),
}
WHITESPACE = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
BAD_IDS = [None, "", " ", "..", "./\\ ", " . / ", "\u3000", "\x85", "\t\n", "\u2028.", "/"]
IMAGE = "s3://bucket/in/0001.png"


def pick(rng: random.Random, bad: float, good: list[Any], wrong: list[Any]) -> Any:
    return rng.choice(wrong) if rng.random() < bad else rng.choice(good)


def random_columns(rng: random.Random, n: int, bad: float) -> dict[str, tuple[list, pa.DataType]]:
    """Columns of a manifest (values, type), each value wrong with probability `bad`."""
    uint_seed = rng.random() < 0.3
    float_guidance = rng.choice([pa.float64(), pa.float32(), pa.int64()])
    ids: list[Any] = []
    for i in range(n):
        r = rng.random()
        if ids and r < bad:  # a duplicate, often of a row many batches back
            ids.append(rng.choice(ids))
        elif r < 2 * bad:
            ids.append(rng.choice([*BAD_IDS, rng.choice(WHITESPACE) * rng.randint(1, 3)]))
        else:
            ids.append(rng.choice([f"row-{i}", f"é {i}", f" {i}. ", f"../{i}"]))
    good_modes = [None, *MODES, "txt2img", "txt2img"]
    modes = [pick(rng, bad, good_modes, ["paint", "TXT2IMG", ""]) for _ in range(n)]
    steps = [pick(rng, bad, [None, 20, 500], [0, -5, 501, 30_000]) for _ in range(n)]
    strength = [
        pick(rng, bad, [None, 0.0, 0.3, 0.75, 1.0], [-0.1, 1.5, math.nan]) for _ in range(n)
    ]
    for i, mode in enumerate(modes):
        if mode not in ("txt2img", None, "") and rng.random() < bad:
            steps[i], strength[i] = rng.choice([(1, 0.5), (3, 0.3), (2, 0.49), (None, 0.01)])
    seeds = [0, 7, 2**40, MAX_SEED]
    wrong_seeds = [2**63, 2**64 - 1] if uint_seed else [-1, -(2**63)]
    sizes = [None, 8, 64, 512, 4096]
    wrong_guidance = [-1, 101]
    if pa.types.is_floating(float_guidance):
        wrong_guidance += [math.nan, math.inf, -math.inf]
    pair_good = [None, [512, 512], [1, 16384]]
    pair_bad = [[0, 512], [512], [1, 2, 3], [None, 5], [16385, 8], [], [-1, 5]]
    return {
        "id": (ids, rng.choice([pa.string(), pa.large_string()])),
        "prompt": ([pick(rng, bad, ["a cat", "", "p"], [None]) for _ in range(n)], pa.string()),
        "negative_prompt": ([rng.choice([None, "blurry"]) for _ in range(n)], pa.string()),
        "seed": (
            [pick(rng, bad, [None, *seeds], wrong_seeds) for _ in range(n)],
            pa.uint64() if uint_seed else pa.int64(),
        ),
        "steps": (steps, rng.choice([pa.int64(), pa.int16()])),
        "width": ([pick(rng, bad, sizes, [0, 4, 100, 4104, -8, 4097]) for _ in range(n)], pa.int32()),
        "height": ([pick(rng, bad, sizes, [12, 5000]) for _ in range(n)], pa.uint16()),
        "num_images": ([pick(rng, bad, [None, 1, 3], [0, -1, 10_001]) for _ in range(n)], pa.int64()),
        "guidance_scale": (
            [pick(rng, bad, [None, 0, 7, 100], wrong_guidance) for _ in range(n)],
            float_guidance,
        ),
        "strength": (strength, rng.choice([pa.float64(), pa.float32()])),
        "refiner_switch": (
            [pick(rng, bad, [None] * 8 + [0.5, 1.0], [0.0, -0.0, 1.5, math.nan]) for _ in range(n)],
            pa.float64(),
        ),
        "controlnet_conditioning_scale": (
            [pick(rng, bad, [None, 0.0, 2.0], [2.5, -1.0]) for _ in range(n)], pa.float32(),
        ),
        "original_size": ([pick(rng, bad, pair_good, pair_bad) for _ in range(n)],
                          pa.list_(pa.int32())),
        "target_size": ([pick(rng, bad, pair_good, pair_bad) for _ in range(n)],
                        pa.large_list(pa.int64())),
        "crops_coords_top_left": (
            [pick(rng, bad, [None, [0, 0], [8, 16]], [[-1, 0], [0, None], [0, 16385]])
             for _ in range(n)],
            pa.list_(pa.int16(), 2),
        ),
        "mode": (modes, pa.string()),
        "scheduler": ([pick(rng, bad, [None, "ddim", "euler_a"], ["warp", ""]) for _ in range(n)],
                      pa.string()),
        "init_image": (
            [None if m in (None, "", "txt2img") or rng.random() < bad else IMAGE for m in modes],
            rng.choice([pa.string(), pa.binary()]),
        ),
        "mask_image": ([None if m != "inpaint" or rng.random() < bad else IMAGE for m in modes],
                       pa.string()),
        "depth_map": ([rng.choice([None, IMAGE]) for _ in modes], pa.string()),
    }  # fmt: skip


def write(path: Path, columns: dict[str, tuple[list, pa.DataType]], row_group: int) -> str:
    table = pa.table({name: pa.array(values, t) for name, (values, t) in columns.items()})
    pq.write_table(table, path, row_group_size=row_group)
    return str(path)


def outcome(validate: Any, uri: str, spec: JobSpec) -> ManifestInfo | list[str]:
    try:
        return validate(uri, spec)
    except UserError as err:
        return err.problems


def random_case(rng: random.Random, tmp_path: Path, bad: float) -> str:
    n = rng.choice([1, 50, 300])
    columns = random_columns(rng, n, bad)
    optional = [c for c in columns if c not in REQUIRED]
    for name in rng.sample(optional, rng.randint(0, len(optional))):
        del columns[name]
    return write(tmp_path / "m.parquet", columns, rng.choice([13, 100, 1000]))


@pytest.mark.parametrize("case", range(48))
def test_same_verdict_as_the_row_by_row_validator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: int
) -> None:
    rng = random.Random(case)
    monkeypatch.setattr(manifest, "CHECK_ROWS", rng.choice([5, 64, 4096]))
    bad = [0.0, 0.0, 0.002, 0.01, 0.05, 0.3][case % 6]
    uri = random_case(rng, tmp_path, bad)
    for name, spec in SPECS.items():
        expected = outcome(reference_validate, uri, spec)
        assert outcome(validate_manifest, uri, spec) == expected, name


def test_a_valid_manifest_with_every_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random cases are rarely valid with every column present; this one is."""
    monkeypatch.setattr(manifest, "CHECK_ROWS", 16)
    rng = random.Random(7)
    columns = random_columns(rng, 200, 0.0)
    columns["refiner_switch"] = ([None] * 200, pa.float64())
    uri = write(tmp_path / "m.parquet", columns, 50)
    info = validate_manifest(uri, SPECS["plain"])
    assert info == reference_validate(uri, SPECS["plain"])
    assert info.num_rows == 200 and len(info.modes) > 1


def test_hash_collisions_never_make_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a hash that collides all the time, every id is compared exactly."""

    def weak_hash(con: Any, ids: pa.Array) -> np.ndarray:
        lengths = pc.fill_null(pc.utf8_length(ids), 0).to_numpy(zero_copy_only=False)
        return (lengths % 3).astype(np.uint64)

    monkeypatch.setattr(manifest, "_hash_ids", weak_hash)
    monkeypatch.setattr(manifest, "CHECK_ROWS", 10)
    for case in range(6):
        rng = random.Random(100 + case)
        uri = random_case(rng, tmp_path, [0.0, 0.01, 0.1][case % 3])
        expected = outcome(reference_validate, uri, SPECS["plain"])
        assert outcome(validate_manifest, uri, SPECS["plain"]) == expected


def test_duplicates_far_apart_in_row_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "CHECK_ROWS", 64)
    ids = [f"r{i}" for i in range(5000)]
    ids[4990] = ids[3]
    ids[2500] = ids[4999] = ids[10]
    ids[3000] = ""
    ids[3001] = ""  # a bad id repeated is a bad id, not a duplicate
    prompts: list[str | None] = ["p"] * 5000
    prompts[4990] = None  # after the duplicate line of the same row
    uri = write(
        tmp_path / "m.parquet", {"id": (ids, pa.string()), "prompt": (prompts, pa.string())}, 500
    )
    found = outcome(validate_manifest, uri, SPECS["plain"])
    assert found == outcome(reference_validate, uri, SPECS["plain"])
    assert found == [
        f"{uri}: row 2500 (id 'r10'): duplicate id",
        f"{uri}: row 3000: id is empty",
        f"{uri}: row 3001: id is empty",
        f"{uri}: row 4990 (id 'r3'): duplicate id",
        f"{uri}: row 4990 (id 'r3'): prompt is null",
        f"{uri}: row 4999 (id 'r10'): duplicate id",
    ]


def test_cap_keeps_the_first_problems_in_row_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Duplicates are found after the other problems; the list still reads in row order."""
    monkeypatch.setattr(manifest, "CHECK_ROWS", 8)
    n = 100
    ids = [f"r{i % 30}" for i in range(n)]  # rows 30.. are duplicates
    steps = [0 if i % 2 else 20 for i in range(n)]
    columns = {"id": (ids, pa.string()), "prompt": (["p"] * n, pa.string()),
               "steps": (steps, pa.int64())}  # fmt: skip
    uri = write(tmp_path / "m.parquet", columns, 25)
    found = outcome(validate_manifest, uri, SPECS["plain"])
    assert found == outcome(reference_validate, uri, SPECS["plain"])
    assert isinstance(found, list) and len(found) == MAX_PROBLEMS + 1
    assert found[-1] == f"{uri}: ... and {50 + 70 - MAX_PROBLEMS} more problems"


def test_blank_id_pattern_covers_python_whitespace() -> None:
    """Every id `_id_problem` refuses (but null) matches _BLANK_ID, so its row is checked."""
    blank = [c * k for c in WHITESPACE + "./\\" for k in (1, 2)] + ["", " ./\\ "]
    assert all(_id_problem(v) for v in blank)
    matched = pc.match_substring_regex(pa.array(blank), manifest._BLANK_ID)
    assert all(matched.to_pylist())
    cleared = ["a", "\u200b", ". x", "x\n", "é"]
    assert not any(_id_problem(v) for v in cleared)
    assert not any(pc.match_substring_regex(pa.array(cleared), manifest._BLANK_ID).to_pylist())


def test_progress_counts_rows_up_to_the_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest, "CHECK_ROWS", 30)
    monkeypatch.setattr(manifest, "PROGRESS_ROWS", 100)
    rows = [f"r{i}" for i in range(1000)]
    uri = write(
        tmp_path / "m.parquet", {"id": (rows, pa.string()), "prompt": (rows, pa.string())}, 70
    )
    seen: list[int] = []
    info = validate_manifest(uri, SPECS["plain"], on_progress=seen.append)
    assert seen[-1] == info.num_rows == 1000
    assert seen == sorted(seen)
    assert all(b - a <= 100 + 30 for a, b in zip([0, *seen], seen, strict=False))


def test_pair_columns_with_null_lists_that_hold_values(tmp_path: Path) -> None:
    """A null list may still span child values (Arrow allows it); they are not the row's."""
    values = pa.array([512, 512, 0, 0, 1, 2, 3], pa.int32())
    pairs = pa.ListArray.from_arrays(
        pa.array([0, 2, 4, 7], pa.int32()), values, mask=pa.array([False, True, False])
    )
    check = manifest.VALUE_CHECKS["original_size"]
    assert pc.fill_null(check.suspects(pairs), False).to_pylist() == [False, False, True]
    assert pc.fill_null(check.suspects(pairs.slice(1)), False).to_pylist() == [False, True]

"""Value checks of manifest columns, derived from the spec's fields.

Each check words the message for one value (`check(v)`, run only on the rows that need
it) and flags, for a whole column at once, every value it might refuse (`suspects`,
Arrow kernels), so validating 10⁷ rows costs kernels, not a Python call per value.
`VALUE_CHECKS` is derived from `spec.RenderParams` (bounds, Literals) and `spec.PAIRS`:
the spec and the manifest refuse the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .adapters import choose as choose_loras
from .errors import UserError
from .schedulers import SCHEDULERS
from .spec import MAX_SEED, PAIRS, RenderParams


def _outside(arr: pa.Array, lo: float, hi: float) -> pa.Array:
    """True where a value may lie outside lo..hi or is not finite (null stays null)."""
    t = arr.type
    if pa.types.is_integer(t):
        info = np.iinfo(t.to_pandas_dtype())
        lo, hi = math.ceil(lo), math.floor(hi)
        if lo > info.max or hi < info.min:
            return pc.is_valid(arr)
        # A bound beyond the type's range cannot be crossed (nor held by a scalar of it).
        low = pc.less(arr, pa.scalar(lo, t)) if lo > info.min else None
        high = pc.greater(arr, pa.scalar(hi, t)) if hi < info.max else None
        return any_of([m for m in (low, high) if m is not None], len(arr))
    x = pc.cast(arr, pa.float64())
    # Bounds rounded inwards, so no value the exact bound refuses is cleared; NaN
    # compares false both ways and is flagged with the out-of-range values.
    lo_f, hi_f = float(lo), float(hi)
    lo_f = math.nextafter(lo_f, math.inf) if lo_f < lo else lo_f
    hi_f = math.nextafter(hi_f, -math.inf) if hi_f > hi else hi_f
    return pc.invert(pc.and_(pc.greater_equal(x, lo_f), pc.less_equal(x, hi_f)))


def any_of(masks: list[pa.Array], n: int) -> pa.Array:
    """Element-wise OR of boolean masks; null counts as False."""
    out = pa.array(np.zeros(n, dtype=bool))
    for mask in masks:
        out = pc.or_kleene(out, mask)
    return pc.fill_null(out, False)


@dataclass(frozen=True)
class _Range:
    lo: float
    hi: float
    what: str = ""

    def __call__(self, v: Any) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number{self.what}, got {v}"
        if not (self.lo <= v <= self.hi):
            return f"must be {self.lo:g}..{self.hi:g}{self.what}, got {v}"
        return None

    def suspects(self, arr: pa.Array) -> pa.Array:
        return _outside(arr, self.lo, self.hi)


@dataclass(frozen=True)
class _Size:
    lo: int = 8
    hi: int = 4096

    def __call__(self, v: int) -> str | None:
        if not (self.lo <= v <= self.hi) or v % 8:
            return f"must be a multiple of 8 in {self.lo}..{self.hi}, got {v}"
        return None

    def suspects(self, arr: pa.Array) -> pa.Array:
        odd = pc.not_equal(pc.bit_wise_and(arr, pa.scalar(7, arr.type)), pa.scalar(0, arr.type))
        return pc.or_kleene(_outside(arr, self.lo, self.hi), odd)


@dataclass(frozen=True)
class _Pair:
    lo: int
    what: str
    hi: int = 16384

    def __call__(self, v: list[int]) -> str | None:
        if len(v) != 2 or any(x is None or not (self.lo <= x <= self.hi) for x in v):
            return f"must be 2 integers in {self.lo}..{self.hi} {self.what}, got {v}"
        return None

    def suspects(self, arr: pa.Array) -> pa.Array:
        lengths = pc.list_value_length(arr)
        counts = pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(arr)  # null lists left out, as in `counts`
        if len(values) != counts.sum():
            return pc.is_valid(arr)  # a layout this does not follow: the row checks decide
        bad = pc.fill_null(
            pc.or_kleene(pc.is_null(values), _outside(values, self.lo, self.hi)), False
        )
        mask = np.zeros(len(arr), dtype=bool)
        mask[np.repeat(np.arange(len(arr)), counts)[bad.to_numpy(zero_copy_only=False)]] = True
        return pc.or_kleene(pa.array(mask), pc.not_equal(lengths, 2))


@dataclass(frozen=True)
class _Choice:
    options: tuple[str, ...]

    def __call__(self, v: str) -> str | None:
        if v in self.options:
            return None
        return f"must be one of {', '.join(self.options)}, got {v!r}"

    def suspects(self, arr: pa.Array) -> pa.Array:
        known = pc.is_in(arr, value_set=pa.array(self.options, arr.type))
        return pc.and_(pc.is_valid(arr), pc.invert(known))


def _value_checks() -> dict[str, Any]:
    """Per-column checks, derived from the spec's `RenderParams` fields: the bounds of
    each number field (`ge`/`gt`/`le`), the choices of each Literal, `PAIRS` for the
    micro-conditioning pairs; width and height also take the multiple-of-8 rule."""
    checks: dict[str, Any] = {"seed": _Range(0, MAX_SEED)}
    for name, info in RenderParams.model_fields.items():
        choices = get_args(info.annotation)
        if name == "scheduler":
            checks[name] = _Choice(SCHEDULERS)
        elif name in PAIRS:
            pair = PAIRS[name]
            checks[name] = _Pair(pair.lo, pair.order, pair.hi)
        elif choices and all(isinstance(c, str) for c in choices):
            checks[name] = _Choice(choices)
        else:
            bounds = {
                k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le") if hasattr(m, k)
            }
            if "le" not in bounds:
                continue
            if name in ("width", "height"):
                checks[name] = _Size(bounds["ge"], bounds["le"])
            elif "gt" in bounds:
                checks[name] = _Range(bounds["gt"], bounds["le"], f" ({bounds['gt']:g} excluded)")
            else:
                checks[name] = _Range(bounds["ge"], bounds["le"])
    return checks


VALUE_CHECKS = _value_checks()


@dataclass(frozen=True)
class Loras:
    """A `loras` value naming the spec's LoRAs with valid weights."""

    known: tuple[str, ...]

    def __call__(self, v: str) -> str | None:
        try:
            choose_loras("", v, dict.fromkeys(self.known, ""))
        except UserError as err:
            return f"{v!r}: {err}"
        return None

    def suspects(self, arr: pa.Array) -> pa.Array:
        return pc.and_(pc.is_valid(arr), pc.not_equal(arr, ""))


@dataclass(frozen=True)
class LoraTags:
    """`<lora:NAME:WEIGHT>` tags in a prompt naming the spec's LoRAs with valid weights."""

    known: tuple[str, ...]

    def __call__(self, v: str) -> str | None:
        try:
            choose_loras(v, None, dict.fromkeys(self.known, ""))
        except UserError as err:
            return f"tag: {err}"
        return None

    def suspects(self, arr: pa.Array) -> pa.Array:
        return pc.fill_null(pc.match_substring(arr, "<lora:"), False)

"""The static HTML gallery of a job's output.

`build_gallery` reads an output's metadata and failure parts through the store (local
folder or S3) and writes one self-contained HTML page: inline CSS and JS, no network,
image links relative to the page, so it works wherever the output is opened, copied or
served (a local folder, a web server, an S3 website). Sweep items (metadata `row_id` +
`sweep`) are also laid out as one grid per manifest row, like A1111's X/Y/Z plot.
This module chooses what the page shows; the markup, CSS and JS are the Jinja2 templates
in `templates/` (autoescaped). The record inside one image (`sdbatch inspect`) is
`inspector`'s. Nothing here prints.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import posixpath
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import pyarrow as pa

from .errors import UserError
from .inspector import read_tar_members
from .store import S3Store, Store, open_store
from .write import infotext

# A page with a card per image of a million-image job would be gigabytes of HTML.
DEFAULT_LIMIT = 1000
# Longest side of the thumbnails inlined for WebDataset samples.
THUMBNAIL = 256
# Left out of the details panel: the same long JSON on every row.
_HIDDEN_FIELDS = ("env",)


@dataclass
class Gallery:
    """What `build_gallery` wrote."""

    uri: str
    images: int  # cards on the page
    matching_images: int  # images matching --where (before --limit)
    failures: int  # failures listed on the page
    matching_failures: int
    sweep_grids: int


@dataclass
class SweepGrid:
    """One manifest row's sweep: rows × columns = the two parameters with most values.

    A third (and further) swept parameter splits the row into several grids, each with
    that parameter fixed (`fixed`), like the Z axis of A1111's X/Y/Z plot.
    """

    row_id: str
    prompt: str
    x: str | None
    xs: list[Any]
    y: str | None
    ys: list[Any]
    fixed: dict[str, Any]
    # (y value key, x value key) → indices into the items given to sweep_grids
    cells: dict[tuple[str, str], list[int]] = field(default_factory=dict)


# ---------------------------------------------------------------- gallery


def build_gallery(
    output: str,
    storage: dict[str, Any] | None = None,
    *,
    out: str | None = None,
    limit: int | None = DEFAULT_LIMIT,
    where: str | None = None,
) -> Gallery:
    """Write the HTML contact sheet of a job output; see the module docstring.

    out: the page's path (default OUTPUT/index.html); for an S3 output, a key inside it.
    limit: at most this many images (and failures) on the page; None or 0 for all.
    where: an SQL predicate over the metadata columns (DuckDB), e.g. "mode = 'inpaint'".
    """
    from .output import METADATA_PREFIX, SUCCESS_KEY, unresolved_failures

    # 1. What the output holds (every part, old and new schemas alike): one row per item
    # (the latest), and the failures still to fix among the items without one (the
    # rule `status` and `rerun` use).
    store = open_store(output, storage)
    meta = _latest(_read_all(store, METADATA_PREFIX))
    shown = meta.select(["id", "image_index"]) if meta is not None else _NO_ITEMS
    fails: pa.Table | None = unresolved_failures(store, shown)
    if meta is None and not fails.num_rows:
        raise UserError(
            f"{store.uri}: no metadata/ or failures/ parts; is this a job output "
            "(or has its first batch not been committed yet)?"
        )

    # 2. --where, then a stable order, then --limit.
    meta, fails = _where(meta, where), _where(fails, where)
    matching_images = meta.num_rows if meta is not None else 0
    matching_failures = fails.num_rows if fails is not None else 0
    images = _ordered(meta, limit)
    failures = _ordered(fails, limit)

    # 3. Where the page goes, and image links relative to it.
    page_uri, page_store, page_key, link = _page_location(store, out)

    # 4. Render and write (WebDataset samples have no file to link to: inline thumbnails).
    thumbs = _shard_thumbnails(store, images)
    grids = sweep_grids(images + failures)
    page = render_html(
        images=images,
        failures=failures,
        grids=grids,
        links=[thumbs.get(i) or link(r["key"]) for i, r in enumerate(images)],
        title=_job_name(images, failures, store),
        output_uri=store.uri,
        complete=store.exists(SUCCESS_KEY),
        where=where,
        matching=(matching_images, matching_failures),
    )
    page_store.write_bytes(page_key, page.encode(), content_type="text/html; charset=utf-8")
    return Gallery(
        uri=page_uri,
        images=len(images),
        matching_images=matching_images,
        failures=len(failures),
        matching_failures=matching_failures,
        sweep_grids=len(grids),
    )


_NO_ITEMS = pa.schema([("id", pa.string()), ("image_index", pa.int32())]).empty_table()


def _read_all(store: Store, prefix: str) -> pa.Table | None:
    from .output import read_parts

    tables = list(read_parts(store, prefix))
    if not tables:
        return None
    # Parts written before a column existed (e.g. row_id, sweep) get nulls for it.
    return pa.concat_tables(tables, promote_options="default")


def _latest(table: pa.Table | None) -> pa.Table | None:
    """The newest row per (id, image_index). Only the key columns become Python objects,
    so this stays cheap for millions of rows."""
    if table is None:
        return None
    ids, ks = table["id"].to_pylist(), table["image_index"].to_pylist()
    stamps: list[Any] = (
        table["created_at"].to_pylist() if "created_at" in table.column_names else [None] * len(ids)
    )
    newest: dict[tuple[str, int], int] = {}
    for i, key in enumerate(zip(ids, ks, strict=True)):
        j = newest.get(key)
        if j is None or (stamps[i] is not None and (stamps[j] is None or stamps[i] >= stamps[j])):
            newest[key] = i
    return table.take(pa.array(sorted(newest.values()), pa.int64()))


def _where(table: pa.Table | None, predicate: str | None) -> pa.Table | None:
    """Rows of `table` for which the SQL predicate holds, evaluated by DuckDB with file
    and network access switched off (a predicate can only look at this table)."""
    if table is None or not predicate or not predicate.strip():
        return table
    try:
        import duckdb
    except ImportError:
        raise UserError("--where needs DuckDB: pip install duckdb") from None
    rows = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    con = duckdb.connect(config={"enable_external_access": False, "lock_configuration": True})
    try:
        con.register("items", rows)
        result = con.sql(f"SELECT __row FROM items WHERE ({predicate}) ORDER BY __row")
        picked = result.fetchall()
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--where {predicate!r}: {first}") from None
    finally:
        con.close()
    indices = [r[0] for r in picked]
    if any(not isinstance(i, int) or not 0 <= i < table.num_rows for i in indices):
        raise UserError(f"--where {predicate!r}: not a predicate over the metadata columns")
    return table.take(pa.array(sorted(set(indices)), pa.int64()))


def _ordered(table: pa.Table | None, limit: int | None) -> list[dict[str, Any]]:
    """Rows by manifest row, item and image index; at most `limit` of them."""
    if table is None or table.num_rows == 0:
        return []
    group = "row_id" if "row_id" in table.column_names else "id"
    keys = [(group, "ascending"), ("id", "ascending"), ("image_index", "ascending")]
    table = table.sort_by(keys if group != "id" else keys[1:])
    if limit:
        table = table.slice(0, limit)
    return table.to_pylist()


def _page_location(store: Store, out: str | None) -> tuple[str, Store, str, Any]:
    """(page URI, store to write it with, its key there, key → relative image link)."""
    if isinstance(store, S3Store):
        # Relative links only work if the page sits in the same bucket prefix as the images.
        key = out or "index.html"
        if key.startswith("s3://"):
            if not key.startswith(store.uri.rstrip("/") + "/"):
                raise UserError(
                    f"--out {out}: an S3 output's gallery is written inside it "
                    f"({store.uri}/...) so its image links stay relative"
                )
            key = key[len(store.uri.rstrip("/")) + 1 :]
        elif key.startswith("/") or "://" in key:
            raise UserError(
                f"--out {out}: for an S3 output, --out is a key inside it (e.g. index.html)"
            )
        key = posixpath.normpath(key)
        folder = posixpath.dirname(key) or "."
        return (
            store.uri_of(key),
            store,
            key,
            lambda k: quote(posixpath.relpath(k, folder)),
        )
    page = Path(out).expanduser() if out else Path(store.uri) / "index.html"
    page = page.resolve()
    if page.is_dir():
        page = page / "index.html"
    root = Path(store.uri)
    return (
        str(page),
        open_store(str(page.parent)),
        page.name,
        lambda k: quote(Path(os.path.relpath(root / k, page.parent)).as_posix()),
    )


def _shard_thumbnails(store: Store, rows: list[dict[str, Any]]) -> dict[int, str]:
    """Row index → `data:` URI of a small WebP thumbnail, for rows whose image is a
    member of a WebDataset shard (`key` = the .tar, `image_uri` = `...tar#member`)."""
    import base64

    from PIL import Image

    wanted: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, row in enumerate(rows):
        key, uri = str(row.get("key") or ""), str(row.get("image_uri") or "")
        if key.endswith(".tar") and "#" in uri:
            wanted[key][uri.rsplit("#", 1)[1]].append(i)
    thumbs = {}
    for key, members in wanted.items():
        try:
            data = read_tar_members(store.read_bytes(key), set(members), store.uri_of(key))
        except FileNotFoundError as err:
            raise UserError(f"{err}; a metadata row points at it") from None
        for name, indices in members.items():
            with Image.open(io.BytesIO(data[name])) as im:
                thumb = im.convert("RGB")
            thumb.thumbnail((THUMBNAIL, THUMBNAIL))
            buf = io.BytesIO()
            thumb.save(buf, format="WEBP", quality=80)
            uri = "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()
            for i in indices:
                thumbs[i] = uri
    return thumbs


def _job_name(images: list[dict], failures: list[dict], store: Store) -> str:
    for row in images + failures:
        if row.get("job_name"):
            return str(row["job_name"])
    return store.uri.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------- sweeps


def sweep_grids(items: Sequence[dict[str, Any]]) -> list[SweepGrid]:
    """Group sweep items (`row_id`, `sweep` JSON) into grids, one or more per manifest row.

    Items without a sweep (older outputs, jobs without `sweep:`) are left out.
    """
    by_row: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for i, item in enumerate(items):
        cell = _sweep_cell(item.get("sweep"))
        if cell:
            by_row[str(item.get("row_id") or item["id"])].append((i, cell))
    grids = []
    for row_id, members in by_row.items():
        values: dict[str, dict[str, Any]] = defaultdict(dict)
        for _, cell in members:
            for name, v in cell.items():
                values[name][_value_key(v)] = v
        # Most values first; ties by name, so the layout is stable.
        axes = sorted(values, key=lambda n: (-len(values[n]), n))
        x, y, zs = axes[0], (axes[1] if len(axes) > 1 else None), axes[2:]
        by_z: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        for i, cell in members:
            by_z[tuple(_value_key(cell.get(z)) for z in zs)].append((i, cell))
        prompt = str(items[members[0][0]].get("prompt") or "")
        for zkey in sorted(by_z, key=lambda k: [_value_order(json.loads(v)) for v in k]):
            group = by_z[zkey]
            grid = SweepGrid(
                row_id=row_id,
                prompt=prompt,
                x=x,
                xs=_sorted_values(values[x].values()),
                y=y,
                ys=_sorted_values(values[y].values()) if y else [None],
                fixed={z: json.loads(k) for z, k in zip(zs, zkey, strict=True)},
            )
            for i, cell in group:
                yk = _value_key(cell.get(y)) if y else _value_key(None)
                grid.cells.setdefault((yk, _value_key(cell.get(x))), []).append(i)
            grids.append(grid)
    return grids


def _sweep_cell(value: Any) -> dict[str, Any] | None:
    if not value:
        return None
    if isinstance(value, dict):
        return value
    try:
        cell = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return None  # a view: a malformed cell just isn't laid out as a grid
    return cell if isinstance(cell, dict) and cell else None


def _value_key(value: Any) -> str:
    """A swept value as a hashable key (values may be lists or dicts)."""
    return json.dumps(value, sort_keys=True)


def _value_order(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers by value (5 < 7.5 < 10), then everything else as text."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return (1, 0.0, str(value))
    return (0, float(value), "")


def _sorted_values(values: Any) -> list[Any]:
    return sorted(values, key=_value_order)


def _label(name: str | None, value: Any) -> str:
    if name is None:
        return ""
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{name} = {shown}"


# ---------------------------------------------------------------- HTML


def render_html(
    *,
    images: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    grids: list[SweepGrid],
    links: list[str],
    title: str,
    output_uri: str,
    complete: bool,
    where: str | None,
    matching: tuple[int, int],
) -> str:
    """The whole page as a string (pure: no I/O), from templates/gallery.html.j2."""
    texts = [_safe_infotext(r) for r in images]
    records = [
        {
            "src": links[i],
            "infotext": texts[i],
            "fields": {k: _jsonable(v) for k, v in r.items() if k not in _HIDDEN_FIELDS},
        }
        for i, r in enumerate(images)
    ]
    modes = Counter(str(r.get("mode")) for r in images + failures)
    summary = (
        f"{len(images)} of {matching[0]} images"
        + (f" (--limit {len(images)})" if len(images) < matching[0] else "")
        + f", {matching[1]} failed item(s)"
        + (f", {len(grids)} sweep grid(s)" if grids else "")
        + ("" if complete else " · job incomplete (no _SUCCESS)")
    )
    return _page_template().render(
        title=title,
        output_uri=output_uri,
        summary=summary,
        now=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        where=where,
        modes=sorted(modes.items()),
        grids=[_grid_view(g, images + failures) for g in grids],
        cards=[_card_view(i, r, links[i], texts[i]) for i, r in enumerate(images)],
        failures=[_failure_view(r) for r in failures],
        records=records,
    )


@functools.cache
def _page_template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("sdbatch", "templates"),
        autoescape=True,  # prompts, ids and error messages are user text, never markup
        undefined=jinja2.StrictUndefined,
        finalize=lambda value: "" if value is None else value,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    # Records keep the metadata's column order: the details panel lists fields in it.
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False}
    return env.get_template("gallery.html.j2")


# The views below hold what the template prints, already chosen and formatted: the
# template decides only the markup. Rows from older outputs may lack columns (`.get`).


def _card_view(i: int, row: dict[str, Any], link: str, text: str) -> dict[str, Any]:
    return {
        "i": i,
        "src": link,
        "infotext": text,
        "search": _search_text(row.get("id"), row.get("prompt")),
        "caption": _caption(row),
        "width": row.get("width") or 64,
        "height": row.get("height") or 64,
        **{k: row.get(k) for k in ("id", "image_index", "mode", "prompt", "seed")},
    }


def _failure_view(row: dict[str, Any]) -> dict[str, Any]:
    shown = ("id", "image_index", "mode", "prompt", "error_type", "error_message")
    return {"search": _search_text(row.get("id"), row.get("prompt"))} | {
        k: row.get(k) for k in shown
    }


def _grid_view(grid: SweepGrid, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A sweep grid; a cell is a list of indices into the page's cards, then failures."""
    return {
        "row_id": grid.row_id,
        "prompt": grid.prompt,
        "search": _search_text(grid.row_id, grid.prompt),
        # A grid takes part in the mode filter only if all its items share one mode.
        "modes": list({items[i].get("mode") for ids in grid.cells.values() for i in ids}),
        "fixed": ", ".join(_label(k, v) for k, v in grid.fixed.items()),
        "x_name": grid.x,
        "y_name": grid.y or "",
        "columns": [_label(grid.x, xv) for xv in grid.xs],
        "rows": [
            {
                "label": _label(grid.y, yv),
                "cells": [grid.cells.get((_value_key(yv), _value_key(xv)), []) for xv in grid.xs],
            }
            for yv in grid.ys
        ],
    }


def _search_text(*parts: Any) -> str:
    """What the page's text filter matches (lower case)."""
    return " ".join(str(p) for p in parts).lower()


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)  # seeds go up to 2**63; a JS number would round them
    return value


def _caption(row: dict[str, Any]) -> str:
    parts = [f"seed {row.get('seed')}", f"{row.get('steps')} steps"]
    if row.get("guidance_scale") is not None:
        parts.append(f"CFG {row['guidance_scale']:g}")
    parts += [str(row.get("scheduler") or ""), f"{row.get('width')}×{row.get('height')}"]
    if row.get("mode") not in (None, "txt2img") and row.get("strength") is not None:
        parts.append(f"strength {row['strength']:g}")
    return " · ".join(p for p in parts if p)


def _safe_infotext(row: dict[str, Any]) -> str:
    try:
        return infotext(row)
    except (KeyError, TypeError, ValueError):  # an older or partial row: still show the card
        return str(row.get("prompt") or "")

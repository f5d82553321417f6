"""The static HTML gallery of a job's output.

`build_gallery` reads an output's metadata and failure parts through the store (local
folder or S3) and writes one self-contained HTML page: inline CSS and JS, no network,
image links relative to the page, so it works wherever the output is opened, copied or
served (a local folder, a web server, an S3 website). Sweep items (metadata `row_id` +
`sweep`) are also laid out as one grid per manifest row, like A1111's X/Y/Z plot.
The record inside one image (`sdbatch inspect`) is `inspector`'s. Nothing here prints.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import posixpath
from collections import defaultdict
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa

from .inspector import InspectError, read_tar_members
from .store import S3Store, Store, open_store
from .write import infotext

# A page with a card per image of a million-image job would be gigabytes of HTML.
DEFAULT_LIMIT = 1000
# Longest side of the thumbnails inlined for WebDataset samples.
THUMBNAIL = 256
# Left out of the details panel: the same long JSON on every row.
_HIDDEN = ("env",)


class GalleryError(Exception):
    """A gallery problem; the message names the output, file or predicate."""


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
    from .output import FAILURES_PREFIX, METADATA_PREFIX, SUCCESS_KEY

    # 1. Read what the output holds (every part, old and new schemas alike).
    store = open_store(output, storage)
    meta = _read_all(store, METADATA_PREFIX)
    fails = _read_all(store, FAILURES_PREFIX)
    if meta is None and fails is None:
        raise GalleryError(
            f"{store.uri}: no metadata/ or failures/ parts; is this a job output "
            "(or has its first batch not been committed yet)?"
        )

    # 2. One row per item (the latest), and failures only of items that never succeeded.
    meta = _latest(meta)
    done = _keys(meta)
    fails = _latest(fails, exclude=done)

    # 3. --where, then a stable order, then --limit.
    meta, fails = _where(meta, where), _where(fails, where)
    matching_images = meta.num_rows if meta is not None else 0
    matching_failures = fails.num_rows if fails is not None else 0
    images = _ordered(meta, limit)
    failures = _ordered(fails, limit)

    # 4. Where the page goes, and image links relative to it.
    page_uri, page_store, page_key, link = _page_location(store, out)

    # 5. Render and write (WebDataset samples have no file to link to: inline thumbnails).
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


def _read_all(store: Store, prefix: str) -> pa.Table | None:
    from .output import read_parts

    tables = list(read_parts(store, prefix))
    if not tables:
        return None
    # Parts written before a column existed (e.g. row_id, sweep) get nulls for it.
    return pa.concat_tables(tables, promote_options="default")


def _keys(table: pa.Table | None) -> set[tuple[str, int]]:
    if table is None:
        return set()
    return set(zip(table["id"].to_pylist(), table["image_index"].to_pylist(), strict=True))


def _latest(
    table: pa.Table | None, exclude: AbstractSet[tuple[str, int]] = frozenset()
) -> pa.Table | None:
    """The newest row per (id, image_index), minus `exclude`. Only the key columns become
    Python objects, so this stays cheap for millions of rows."""
    if table is None:
        return None
    ids, ks = table["id"].to_pylist(), table["image_index"].to_pylist()
    stamps: list[Any] = (
        table["created_at"].to_pylist() if "created_at" in table.column_names else [None] * len(ids)
    )
    newest: dict[tuple[str, int], int] = {}
    for i, key in enumerate(zip(ids, ks, strict=True)):
        if key in exclude:
            continue
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
        raise GalleryError("--where needs DuckDB: pip install duckdb") from None
    rows = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    con = duckdb.connect(config={"enable_external_access": False, "lock_configuration": True})
    try:
        con.register("items", rows)
        result = con.sql(f"SELECT __row FROM items WHERE ({predicate}) ORDER BY __row")
        picked = result.fetchall()
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GalleryError(f"--where {predicate!r}: {first}") from None
    finally:
        con.close()
    indices = [r[0] for r in picked]
    if any(not isinstance(i, int) or not 0 <= i < table.num_rows for i in indices):
        raise GalleryError(f"--where {predicate!r}: not a predicate over the metadata columns")
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
                raise GalleryError(
                    f"--out {out}: an S3 output's gallery is written inside it "
                    f"({store.uri}/...) so its image links stay relative"
                )
            key = key[len(store.uri.rstrip("/")) + 1 :]
        elif key.startswith("/") or "://" in key:
            raise GalleryError(
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
            raise GalleryError(f"{err}; a metadata row points at it") from None
        except InspectError as err:
            raise GalleryError(str(err)) from None
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
                values[name][_vkey(v)] = v
        # Most values first; ties by name, so the layout is stable.
        axes = sorted(values, key=lambda n: (-len(values[n]), n))
        x, y, zs = axes[0], (axes[1] if len(axes) > 1 else None), axes[2:]
        by_z: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        for i, cell in members:
            by_z[tuple(_vkey(cell.get(z)) for z in zs)].append((i, cell))
        prompt = str(items[members[0][0]].get("prompt") or "")
        for zkey in sorted(by_z, key=lambda k: [_vsort(json.loads(v)) for v in k]):
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
                yk = _vkey(cell.get(y)) if y else _vkey(None)
                grid.cells.setdefault((yk, _vkey(cell.get(x))), []).append(i)
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


def _vkey(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _vsort(value: Any) -> tuple[int, float, str]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return (1, 0.0, str(value))
    return (0, float(value), "")


def _sorted_values(values: Any) -> list[Any]:
    return sorted(values, key=_vsort)


def _label(name: str | None, value: Any) -> str:
    if name is None:
        return ""
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{name} = {shown}"


# ---------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


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
    """The whole page as a string (pure: no I/O)."""
    texts = [_safe_infotext(r) for r in images]
    records = [
        {
            "src": links[i],
            "infotext": texts[i],
            "fields": {k: _jsonable(v) for k, v in r.items() if k not in _HIDDEN},
        }
        for i, r in enumerate(images)
    ]
    modes: dict[str, int] = defaultdict(int)
    for r in images + failures:
        modes[str(r.get("mode"))] += 1

    cards = [_card(i, r, links[i], texts[i]) for i, r in enumerate(images)]
    fail_rows = [_failure_row(r) for r in failures]
    sweep_html = [_grid(g, images, failures, links) for g in grids]
    buttons = [
        f'<button type="button" data-filter="" aria-pressed="true">all ({len(images) + len(failures)})</button>'
    ]
    buttons += [
        f'<button type="button" data-filter="{_e(m)}" aria-pressed="false">{_e(m)} ({n})</button>'
        for m, n in sorted(modes.items())
    ]
    summary = (
        f"{len(images)} of {matching[0]} images"
        + (f" (--limit {len(images)})" if len(images) < matching[0] else "")
        + f", {matching[1]} failed item(s)"
        + (f", {len(grids)} sweep grid(s)" if grids else "")
        + ("" if complete else " · job incomplete (no _SUCCESS)")
    )
    # `<` is escaped so no prompt can close the <script> element holding the records.
    data = json.dumps(records, ensure_ascii=False).replace("<", "\\u003c")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)} · sdbatch gallery</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub"><code>{_e(output_uri)}</code> · <span id="summary">{_e(summary)}</span>'
        f" · generated {now}</p>",
        f'<p class="sub">where <code>{_e(where)}</code></p>' if where else "",
        '<nav class="filters" aria-label="filter">',
        *buttons,
        '<input type="search" id="q" placeholder="filter by prompt or id" aria-label="filter text">',
        '<span id="shown" aria-live="polite"></span>',
        "</nav></header><main>",
    ]
    if sweep_html:
        parts += ['<section id="sweeps"><h2>Sweeps</h2>', *sweep_html, "</section>"]
    parts += [
        f'<section id="images"><h2>Images ({len(images)})</h2>',
        '<div class="grid">',
        *cards,
        "</div>" + ("" if cards else '<p class="empty">no images</p>'),
        "</section>",
    ]
    if fail_rows:
        parts += [
            f'<section id="failures"><h2>Failures ({len(failures)})</h2>',
            "<table><thead><tr><th>id</th><th>#</th><th>mode</th><th>error</th>"
            "<th>message</th><th>prompt</th></tr></thead><tbody>",
            *fail_rows,
            "</tbody></table></section>",
        ]
    parts += [
        "</main>",
        '<dialog id="details"><form method="dialog"><button class="close" aria-label="close">×</button></form>'
        '<div class="dwrap"><a id="dlink" target="_blank" rel="noopener"><img id="dimg" alt=""></a>'
        '<div class="dtext"><h3 id="dtitle"></h3><pre id="dinfo"></pre>'
        '<table id="dfields"></table></div></div></dialog>',
        f'<script type="application/json" id="records">{data}</script>',
        f"<script>{_JS}</script>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _card(i: int, row: dict[str, Any], link: str, text: str) -> str:
    w, h = row.get("width") or 64, row.get("height") or 64
    search = f"{row.get('id')} {row.get('prompt')}".lower()
    return (
        f'<figure class="card" data-i="{i}" data-mode="{_e(row.get("mode"))}" '
        f'data-text="{_e(search)}" tabindex="0" title="{_e(text)}">'
        f'<img loading="lazy" decoding="async" src="{_e(link)}" width="{w}" height="{h}" '
        f'alt="{_e(row.get("prompt"))}">'
        f'<figcaption><p class="prompt">{_e(row.get("prompt"))}</p>'
        f'<p class="meta">{_e(_caption(row))}</p>'
        f'<p class="id">{_e(row.get("id"))} #{_e(row.get("image_index"))} · {_e(row.get("mode"))}</p>'
        "</figcaption></figure>"
    )


def _failure_row(row: dict[str, Any]) -> str:
    search = f"{row.get('id')} {row.get('prompt')}".lower()
    return (
        f'<tr class="failure" data-mode="{_e(row.get("mode"))}" data-text="{_e(search)}">'
        f"<td>{_e(row.get('id'))}</td><td>{_e(row.get('image_index'))}</td>"
        f'<td>{_e(row.get("mode"))}</td><td class="etype">{_e(row.get("error_type"))}</td>'
        f'<td class="emsg">{_e(row.get("error_message"))}</td>'
        f'<td class="prompt">{_e(row.get("prompt"))}</td></tr>'
    )


_MISSING = '<span class="missing">—</span>'


def _grid(grid: SweepGrid, images: list[dict], failures: list[dict], links: list[str]) -> str:
    n = len(images)
    items = images + failures
    modes = {items[i].get("mode") for ids in grid.cells.values() for i in ids}
    mode_attr = f' data-mode="{_e(modes.pop())}"' if len(modes) == 1 else ""
    search = f"{grid.row_id} {grid.prompt}".lower()
    fixed = ", ".join(_label(k, v) for k, v in grid.fixed.items())
    head = "".join(f"<th>{_e(_label(grid.x, v))}</th>" for v in grid.xs)
    rows = []
    for yv in grid.ys:
        cells = []
        for xv in grid.xs:
            inner = []
            for i in grid.cells.get((_vkey(yv), _vkey(xv)), []):
                row = items[i]
                if i < n:
                    inner.append(
                        f'<img loading="lazy" decoding="async" src="{_e(links[i])}" '
                        f'data-i="{i}" width="{row.get("width") or 64}" '
                        f'height="{row.get("height") or 64}" tabindex="0" '
                        f'title="seed {_e(row.get("seed"))} #{_e(row.get("image_index"))}" '
                        f'alt="{_e(row.get("prompt"))}">'
                    )
                else:
                    inner.append(
                        f'<span class="cellfail" title="{_e(row.get("error_message"))}">'
                        f"failed: {_e(row.get('error_type'))}</span>"
                    )
            cells.append(f"<td>{''.join(inner) or _MISSING}</td>")
        label = f"<th>{_e(_label(grid.y, yv))}</th>" if grid.y else "<th></th>"
        rows.append(f"<tr>{label}{''.join(cells)}</tr>")
    return (
        f'<div class="sweep"{mode_attr} data-text="{_e(search)}">'
        f'<h3>{_e(grid.row_id)} <span class="prompt">{_e(grid.prompt)}</span></h3>'
        + (f'<p class="fixed">{_e(fixed)}</p>' if fixed else "")
        + f'<table><thead><tr><th class="corner">{_e(grid.y or "")} \\ {_e(grid.x)}</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


_CSS = """
:root{color-scheme:light dark;--bg:#f6f6f4;--fg:#1d1d1f;--mut:#6b6b70;--card:#fff;--line:#ddd;--acc:#2b6cb0;--bad:#b42318}
@media (prefers-color-scheme:dark){:root{--bg:#161618;--fg:#ececef;--mut:#9a9aa2;--card:#222226;--line:#38383e;--acc:#6ea8fe;--bad:#ff7b72}}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,sans-serif;background:var(--bg);color:var(--fg)}
header{position:sticky;top:0;z-index:2;background:var(--bg);border-bottom:1px solid var(--line);padding:10px 16px}
h1{font-size:18px;margin:0 0 2px}h2{font-size:16px;margin:18px 0 8px}.sub{margin:0;color:var(--mut)}
main{padding:0 16px 24px}[hidden]{display:none!important}
.filters{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin-top:8px}
.filters button{border:1px solid var(--line);background:var(--card);color:var(--fg);border-radius:14px;padding:3px 10px;cursor:pointer}
.filters button[aria-pressed=true]{background:var(--acc);border-color:var(--acc);color:#fff}
#q{padding:3px 8px;border:1px solid var(--line);border-radius:6px;background:var(--card);color:var(--fg);min-width:220px}
#shown{color:var(--mut)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;overflow:hidden;cursor:pointer}
.card:focus,.card:hover{outline:2px solid var(--acc)}
.card img{display:block;width:100%;height:auto;object-fit:contain;background:#0002}
figcaption{padding:6px 8px}figcaption p{margin:0}
.card .prompt{display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;overflow:hidden}
.meta,.id,.fixed{color:var(--mut);font-size:12px}.id{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
table{border-collapse:collapse}th,td{border:1px solid var(--line);padding:4px 6px;text-align:left;vertical-align:top}
#failures td.etype{color:var(--bad);font-weight:600}#failures td.emsg{font-family:ui-monospace,monospace;font-size:12px;max-width:48ch;overflow-wrap:anywhere}
.sweep{margin-bottom:16px}.sweep h3{font-size:14px;margin:8px 0 4px}.sweep h3 .prompt{font-weight:400;color:var(--mut)}
.sweep td img{width:128px;height:auto;display:inline-block;margin:1px;cursor:pointer}.sweep th{font-weight:600;font-size:12px;white-space:nowrap}
.cellfail{color:var(--bad);font-size:12px}.missing{color:var(--mut)}
dialog{max-width:min(1100px,95vw);border:1px solid var(--line);border-radius:10px;background:var(--card);color:var(--fg);padding:14px}
dialog::backdrop{background:#000a}.close{float:right;font-size:20px;background:none;border:0;color:var(--fg);cursor:pointer}
.dwrap{display:flex;gap:14px;flex-wrap:wrap}.dwrap img{max-width:min(512px,90vw);width:100%;min-width:256px;image-rendering:auto}
.dtext{flex:1;min-width:280px}#dinfo{white-space:pre-wrap;background:#0001;padding:8px;border-radius:6px}
#dfields{font-size:12px}#dfields th{white-space:nowrap}#dfields td{font-family:ui-monospace,monospace;overflow-wrap:anywhere}
"""

_JS = """
(() => {
  const records = JSON.parse(document.getElementById("records").textContent);
  const dlg = document.getElementById("details");
  const state = {mode: "", q: ""};
  let current = -1;
  function apply() {
    for (const el of document.querySelectorAll("[data-text]")) {
      const okMode = !state.mode || !el.dataset.mode || el.dataset.mode === state.mode;
      const okText = !state.q || el.dataset.text.includes(state.q);
      el.hidden = !(okMode && okText);
    }
    for (const b of document.querySelectorAll("button[data-filter]"))
      b.setAttribute("aria-pressed", String(b.dataset.filter === state.mode));
    const cards = document.querySelectorAll(".card:not([hidden])").length;
    const fails = document.querySelectorAll("tr.failure:not([hidden])").length;
    document.getElementById("shown").textContent = `showing ${cards} image(s), ${fails} failure(s)`;
  }
  function show(i) {
    const r = records[i];
    if (!r) return;
    current = i;
    const f = r.fields;
    document.getElementById("dimg").src = r.src;
    document.getElementById("dlink").href = r.src;
    document.getElementById("dtitle").textContent = `${f.id} #${f.image_index} · ${f.mode}`;
    document.getElementById("dinfo").textContent = r.infotext;
    const table = document.getElementById("dfields");
    table.replaceChildren();
    for (const [k, v] of Object.entries(f)) {
      if (v === null || v === undefined || v === "") continue;
      const tr = table.insertRow();
      const th = document.createElement("th");
      th.textContent = k;
      tr.appendChild(th);
      tr.insertCell().textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
    }
    if (!dlg.open) dlg.showModal();
  }
  function step(d) {
    const visible = [...document.querySelectorAll(".card:not([hidden])")].map(c => +c.dataset.i);
    const at = visible.indexOf(current);
    if (visible.length) show(visible[(at + d + visible.length) % visible.length]);
  }
  document.addEventListener("click", e => {
    const b = e.target.closest("button[data-filter]");
    if (b) { state.mode = b.dataset.filter; apply(); return; }
    const el = e.target.closest("[data-i]");
    if (el && !dlg.contains(el)) show(+el.dataset.i);
    else if (e.target === dlg) dlg.close();
  });
  document.addEventListener("keydown", e => {
    if (dlg.open && (e.key === "ArrowRight" || e.key === "ArrowLeft")) step(e.key === "ArrowRight" ? 1 : -1);
    else if (!dlg.open && e.key === "Enter" && e.target.dataset && e.target.dataset.i !== undefined) show(+e.target.dataset.i);
  });
  document.getElementById("q").addEventListener("input", e => { state.q = e.target.value.trim().toLowerCase(); apply(); });
  apply();
})();
"""

"""Regenerate items from their metadata rows alone, and verify they reproduce bit for bit.

A metadata (or failure) row holds everything an item needs: prompt, seed, every render
parameter, the checkpoint and its weights hash, the input image URIs and hashes, and the
batch size, batch position and torch thread count it was rendered with. Rerunning pads
a pipeline call to that batch size with the item at its stored position, on the stored
number of threads, which is what makes the bytes come out identical on the same stack.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .output import METADATA_PREFIX, done_table, read_parts, stored_spec, unresolved_failures
from .plan import ITEM_SCHEMA, image_key
from .store import Store, open_store
from .write import METADATA_SCHEMA

if TYPE_CHECKING:
    from .spec import JobSpec


@dataclass
class Outcome:
    id: str
    image_index: int
    status: str  # exact | differs | failed | weights-changed | input-changed
    detail: str = ""
    max_diff: int | None = None
    psnr: float | None = None


@dataclass
class RerunReport:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def exact(self) -> int:
        return sum(o.status == "exact" for o in self.outcomes)

    @property
    def all_exact(self) -> bool:
        return bool(self.outcomes) and self.exact == len(self.outcomes)


# What a rerun checks its inputs against: the hashes the first run recorded.
INPUT_HASHES = ("init_image_sha256", "mask_image_sha256", "depth_map_sha256")


def select_rows(store: Store, ids: list[str] | None, failed: bool) -> list[dict[str, Any]]:
    """Metadata rows to rerun: by id (all image indexes), or the failed items."""
    if failed:
        rows = unresolved_failures(store, done_table(store)).to_pylist()
    else:
        rows = [r for t in read_parts(store, METADATA_PREFIX) for r in t.to_pylist()]
        if ids is not None:
            wanted = set(ids)
            rows = [r for r in rows if r["id"] in wanted]
            missing = wanted - {r["id"] for r in rows}
            if missing:
                raise UserError(f"{store.uri}: no metadata for id(s) {', '.join(sorted(missing))}")
    if not rows:
        raise UserError(f"{store.uri}: nothing to rerun")
    return rows


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def rerun(
    output: str,
    *,
    ids: list[str] | None = None,
    failed: bool = False,
    to: str | None = None,
    verify: bool = False,
    storage: dict[str, Any] | None = None,
) -> RerunReport:
    """Render the chosen items again from metadata; write them to `to`, compare if `verify`.

    Through the job's own stages: `prepare.prepare_batch` fetches and decodes the inputs,
    `Renderer.render` renders each item alone at its recorded batch position, and
    `write.write_batch` encodes it (and stores it in `to`).
    """
    from .models import use_layouts, use_storage
    from .render import Renderer, checkpoints_of, models_of

    # 1. Choose rows; the stored spec gives the image format and single-file layouts.
    source = open_store(output, storage)
    rows = select_rows(source, ids, failed)
    stored = _stored_spec(source)
    options = stored.output_options.model_dump() if stored else {"format": "png"}
    layouts = stored.models.layouts() if stored and stored.models else {}
    use_storage(storage)  # s3:// checkpoints: this node's cached copy
    use_layouts(layouts)  # single-file checkpoints: the layouts the job used
    report = RerunReport()
    # 2. Rows whose weights changed since are reported, not rendered.
    hashes = _current_hashes(rows, storage)
    rows = [row for row in rows if not _weights_changed(row, hashes, report)]
    written: list[dict[str, Any]] = []
    for group in _by_actor(rows):
        # 3. One renderer per actor configuration (`_by_actor`).
        first = group[0]
        renderer = Renderer(
            **models_of(first),
            model_hashes={ref: hashes[ref] or "" for ref in checkpoints_of(first).values()},
            batch_size=int(first["batch_size"] or 1),
            device=first["device"] or "auto",
            dtype=first["dtype"] or "auto",
            torch_threads=int(first["torch_threads"] or 1),
            # VAE tiling and the like shape pixels: the options the job rendered with.
            render_options=json.loads(first.get("render_options") or "{}"),
            prompt_overflow=stored.prompt_overflow if stored else "truncate",
            storage=storage,
            layouts=layouts,
        )
        # 4. Prepare and render each item as the job did.
        rendered = _render_group(renderer, group, storage, report)
        if not rendered:
            continue
        # 5. Encode (and store in `to`) as the job's write stage does; compare.
        written += _write_and_compare(rendered, source, to, options, storage, verify, report)
    # 6. The regenerated images' metadata, beside them (data first, its record last).
    if to is not None and written:
        _write_part(open_store(to, storage), written)
    return report


def _current_hashes(rows: list[dict[str, Any]], storage: dict[str, Any] | None) -> dict[str, Any]:
    """Checkpoint ref or adapter URI → the sha256 of its weights now (None if missing)."""
    from .adapters import recorded as recorded_adapters
    from .adapters import resolve as resolve_adapter
    from .models import weights_sha256
    from .render import checkpoints_of
    from .weights import file_sha256

    hashes: dict[str, str | None] = {}
    for ref in {ref for r in rows for ref in checkpoints_of(r).values()}:
        try:
            hashes[ref] = weights_sha256(ref)
        except Exception:  # noqa: BLE001 - a missing model is reported per item
            hashes[ref] = None
    for f in {f for r in rows for f in recorded_adapters(r)["adapter_files"].values()}:
        try:
            hashes[f.uri] = file_sha256(resolve_adapter(f.uri, storage))
        except Exception:  # noqa: BLE001 - a missing file is reported per item
            hashes[f.uri] = None
    return hashes


def _weights_changed(row: dict[str, Any], hashes: dict[str, Any], report: RerunReport) -> bool:
    """Whether a checkpoint or adapter file of `row` changed since (then reported)."""
    from .adapters import recorded as recorded_adapters
    from .render import checkpoints_of

    changed = [
        f"{ref}: recorded {row[f'{column}_sha256'][:12]}, "
        f"now {hashes[ref][:12] if hashes[ref] else 'missing'}"
        for column, ref in checkpoints_of(row).items()
        if row.get(f"{column}_sha256") and hashes[ref] != row[f"{column}_sha256"]
    ]
    changed += [
        f"{f.uri}: recorded {f.sha256[:12]}, now {(hashes[f.uri] or 'missing')[:12]}"
        for f in recorded_adapters(row)["adapter_files"].values()
        if hashes[f.uri] != f.sha256
    ]
    if changed:
        report.outcomes.append(
            Outcome(row["id"], row["image_index"], "weights-changed", "; ".join(changed))
        )
    return bool(changed)


def _by_actor(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by what an actor is built with: models, batch size, threads, device,
    dtype, render options and adapter files."""
    from .adapters import recorded as recorded_adapters
    from .render import MODEL_COLUMNS

    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        key = (
            row["mode"],
            *(row.get(column) for column in MODEL_COLUMNS),
            row["batch_size"],
            row["torch_threads"],
            row["device"],
            row["dtype"],
            row.get("render_options"),
            tuple(sorted(recorded_adapters(row)["adapter_files"])),
        )
        groups[key].append(row)
    return list(groups.values())


def _render_group(
    renderer: Any, group: list[dict[str, Any]], storage: dict[str, Any] | None, report: RerunReport
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(metadata row, render result) of each row of `group` that rendered again; the
    others get their outcome: inputs that no longer load or changed, a failed render."""
    from .prepare import prepare_batch

    planned = [{name: row.get(name) for name in ITEM_SCHEMA.names} for row in group]
    for item in planned:
        item["batch_key"] = "rerun"
    prepared = prepare_batch(pa.Table.from_pylist(planned, schema=ITEM_SCHEMA), storage=storage)
    rendered = []
    for row, item in zip(group, prepared.to_pylist(), strict=True):
        where = (row["id"], row["image_index"])
        changed = [c for c in INPUT_HASHES if row.get(c) and item.get(c) != row[c]]
        if item["status"] == "failed":
            report.outcomes.append(Outcome(*where, "failed", item["error_message"]))
        elif changed:
            report.outcomes.append(Outcome(*where, "input-changed", ", ".join(changed)))
        else:
            position = int(row.get("batch_position") or 0)
            result = renderer.render([item], position=position)[0]
            if result["status"] == "ok":
                rendered.append((row, result))
            else:
                detail = f"{result['error_type']}: {result['error_message']}"
                report.outcomes.append(Outcome(*where, "failed", detail))
    return rendered


def _write_and_compare(
    rendered: list[tuple[dict[str, Any], dict[str, Any]]],
    source: Store,
    to: str | None,
    options: dict[str, Any],
    storage: dict[str, Any] | None,
    verify: bool,
    report: RerunReport,
) -> list[dict[str, Any]]:
    """The job's write stage on the results: into `to` as plain files (an item of a
    shard too), or, without `to`, encoded only (as for shards: nothing is stored). Each
    outcome compares the new bytes with the first run's; returns the metadata written."""
    from .write import UNSTORED, write_batch

    results = [{**result, "key": _target_key(row)} for row, result in rendered]
    written = write_batch(
        pa.Table.from_pylist(results),
        output=to or source.uri,
        job_name=rendered[0][0].get("job_name") or "",
        storage=storage,
        image_options={**options, "layout": "files" if to else "webdataset"},
    ).to_pylist()
    for (row, result), meta in zip(rendered, written, strict=True):
        if meta["status"] == UNSTORED:
            raise UserError(f"{to}: {meta['error_message']}")
        where = (row["id"], row["image_index"])
        if row.get("sha256") == meta["sha256"]:
            report.outcomes.append(Outcome(*where, "exact"))
        elif verify and row.get("image_uri"):
            pixels = np.frombuffer(result["pixels"], np.uint8).reshape(
                row["height"], row["width"], 3
            )
            old = _stored_pixels(source, row)
            diff = (
                None
                if old is None
                else int(np.abs(old.astype(np.int16) - pixels.astype(np.int16)).max())
            )
            psnr = None if old is None else _psnr(old, pixels)
            report.outcomes.append(Outcome(*where, "differs", "", diff, psnr))
        else:
            report.outcomes.append(Outcome(*where, "rendered"))
    return written if to else []


def _target_key(row: dict[str, Any]) -> str:
    """Where a regenerated image goes: its own key; an item from a shard as a plain file."""
    name = row.get("member") or row["key"]
    return image_key(row["id"], row["image_index"], name.rsplit(".", 1)[-1])


def _write_part(target: Store, rows: list[dict[str, Any]]) -> None:
    buf = io.BytesIO()
    table = pa.Table.from_pylist(
        [{n: r.get(n) for n in METADATA_SCHEMA.names} for r in rows], schema=METADATA_SCHEMA
    )
    pq.write_table(table, buf)
    digest = hashlib.sha256(buf.getvalue()).hexdigest()[:12]
    target.write_bytes(f"{METADATA_PREFIX}part-rerun-{digest}.parquet", buf.getvalue())


def _stored_spec(store: Store) -> JobSpec | None:
    """The spec the job ran with (its stored job.yaml); None for outputs without one."""
    try:
        return stored_spec(store)
    except UserError:  # unreadable: rerun from the metadata rows alone
        return None


def _stored_pixels(store: Store, row: dict[str, Any]) -> np.ndarray | None:
    import tarfile

    from PIL import Image

    try:
        data = store.read_bytes(row["key"])
    except FileNotFoundError:
        return None
    if row.get("member"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.extractfile(row["member"])
            if member is None:
                return None
            data = member.read()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

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
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .output import FAILURES_PREFIX, METADATA_PREFIX, done_items, read_parts
from .plan import ITEM_SCHEMA, image_key
from .store import Store, open_store
from .write import CONTENT_TYPES, METADATA_SCHEMA, encode_image

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


class RerunError(Exception):
    pass


def select_rows(store: Store, ids: list[str] | None, failed: bool) -> list[dict[str, Any]]:
    """Metadata rows to rerun: by id (all image indexes), or the failed items."""
    if failed:
        done = done_items(store)
        rows = [
            r
            for t in read_parts(store, FAILURES_PREFIX)
            for r in t.to_pylist()
            if (r["id"], r["image_index"]) not in done
        ]
        latest = {(r["id"], r["image_index"]): r for r in rows}  # last failure wins
        rows = list(latest.values())
    else:
        rows = [r for t in read_parts(store, METADATA_PREFIX) for r in t.to_pylist()]
        if ids is not None:
            wanted = set(ids)
            rows = [r for r in rows if r["id"] in wanted]
            missing = wanted - {r["id"] for r in rows}
            if missing:
                raise RerunError(f"{store.uri}: no metadata for id(s) {', '.join(sorted(missing))}")
    if not rows:
        raise RerunError(f"{store.uri}: nothing to rerun")
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
    """Render the chosen items again from metadata; write them to `to`, compare if `verify`."""
    from .adapters import recorded as recorded_adapters
    from .adapters import resolve as resolve_adapter
    from .models import use_layouts, use_storage, weights_sha256
    from .prepare import InputError, prepare_item
    from .render import MODEL_COLUMNS, Renderer, checkpoints_of, models_of
    from .weights import file_sha256

    # 1. Choose rows and check that the weights are still the ones recorded.
    source = open_store(output, storage)
    rows = select_rows(source, ids, failed)
    stored = _stored_spec(source)
    options = stored.output_options.model_dump() if stored else {"format": "png"}
    layouts = stored.models.layouts() if stored and stored.models else {}
    target = open_store(to, storage) if to else None
    report = RerunReport()
    use_storage(storage)  # s3:// checkpoints: this node's cached copy
    use_layouts(layouts)  # single-file checkpoints: the layouts the job used
    current_hash: dict[str, str | None] = {}
    for ref in {ref for r in rows for ref in checkpoints_of(r).values()}:
        try:
            current_hash[ref] = weights_sha256(ref)
        except Exception:  # noqa: BLE001 - a missing model is reported per item
            current_hash[ref] = None
    adapter_hash: dict[str, str | None] = {}  # adapter URI → its file's sha256 now
    for f in {f for r in rows for f in recorded_adapters(r)["adapter_files"].values()}:
        try:
            adapter_hash[f.uri] = file_sha256(resolve_adapter(f.uri, storage))
        except Exception:  # noqa: BLE001 - a missing file is reported per item
            adapter_hash[f.uri] = None

    # 2. Group by what an actor is built with: models, batch size, threads, device, dtype.
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        changed = [
            f"{ref}: recorded {row[f'{column}_sha256'][:12]}, "
            f"now {current_hash[ref][:12] if current_hash[ref] else 'missing'}"  # type: ignore[index]
            for column, ref in checkpoints_of(row).items()
            if row.get(f"{column}_sha256") and current_hash[ref] != row[f"{column}_sha256"]
        ]
        changed += [
            f"{f.uri}: recorded {f.sha256[:12]}, now {(adapter_hash[f.uri] or 'missing')[:12]}"
            for f in recorded_adapters(row)["adapter_files"].values()
            if adapter_hash[f.uri] != f.sha256
        ]
        if changed:
            report.outcomes.append(
                Outcome(row["id"], row["image_index"], "weights-changed", "; ".join(changed))
            )
            continue
        key = (
            row["mode"],
            *(row.get(column) for column in MODEL_COLUMNS),
            row["batch_size"],
            row["torch_threads"],
            row["device"],
            row["dtype"],
            tuple(sorted(recorded_adapters(row)["adapter_files"])),
        )
        groups[key].append(row)

    written: list[dict[str, Any]] = []
    for key, group in groups.items():
        mode, batch_size, threads, device, dtype = key[0], *key[-5:-1]
        renderer = Renderer(
            **models_of(group[0]),
            model_hashes={
                ref: current_hash[ref] or "" for ref in checkpoints_of(group[0]).values()
            },
            batch_size=int(batch_size or 1),
            device=device or "auto",
            dtype=dtype or "auto",
            torch_threads=int(threads or 1),
            storage=storage,
            layouts=layouts,
        )
        for row in group:
            # 3. Rebuild the work item and its inputs exactly as the first run saw them.
            item = {name: row.get(name) for name in ITEM_SCHEMA.names}
            item.update(init_image=None, mask_image=None, depth_map=None)
            item["batch_key"] = "rerun"
            if mode != "txt2img":
                try:
                    prepare_item(item, storage)
                except InputError as err:
                    report.outcomes.append(
                        Outcome(row["id"], row["image_index"], "failed", str(err))
                    )
                    continue
                changed = [
                    c
                    for c in ("init_image_sha256", "mask_image_sha256", "depth_map_sha256")
                    if row.get(c) and item.get(c) != row[c]
                ]
                if changed:
                    report.outcomes.append(
                        Outcome(row["id"], row["image_index"], "input-changed", ", ".join(changed))
                    )
                    continue
            result = renderer.render([item], position=int(row.get("batch_position") or 0))[0]
            if result["status"] != "ok":
                report.outcomes.append(
                    Outcome(
                        row["id"],
                        row["image_index"],
                        "failed",
                        f"{result['error_type']}: {result['error_message']}",
                    )
                )
                continue
            pixels = np.frombuffer(result["pixels"], np.uint8).reshape(
                row["height"], row["width"], 3
            )
            data = encode_image(pixels, result, options)
            digest = hashlib.sha256(data).hexdigest()
            if target is not None:
                key = image_key(row["id"], row["image_index"], row["key"].rsplit(".", 1)[-1])
                if row.get("member"):  # from a shard: regenerate as a plain file
                    key = image_key(row["id"], row["image_index"], row["member"].rsplit(".", 1)[-1])
                target.write_bytes(
                    key, data, content_type=CONTENT_TYPES[options.get("format", "png")]
                )
                written.append(
                    {
                        **row,
                        "key": key,
                        "member": None,
                        "sha256": digest,
                        "image_uri": target.uri_of(key),
                    }
                )
            # 4. Compare with what the first run stored.
            if row.get("sha256") == digest:
                report.outcomes.append(Outcome(row["id"], row["image_index"], "exact"))
            elif verify and row.get("image_uri"):
                old = _stored_pixels(source, row)
                diff = (
                    int(np.abs(old.astype(np.int16) - pixels.astype(np.int16)).max())
                    if old is not None
                    else None
                )
                report.outcomes.append(
                    Outcome(
                        row["id"],
                        row["image_index"],
                        "differs",
                        "",
                        diff,
                        _psnr(old, pixels) if old is not None else None,
                    )
                )
            else:
                report.outcomes.append(Outcome(row["id"], row["image_index"], "rendered"))
    if target is not None and written:
        buf = io.BytesIO()
        table = pa.Table.from_pylist(
            [{n: r.get(n) for n in METADATA_SCHEMA.names} for r in written], schema=METADATA_SCHEMA
        )
        pq.write_table(table, buf)
        target.write_bytes(
            f"{METADATA_PREFIX}part-rerun-{hashlib.sha256(buf.getvalue()).hexdigest()[:12]}.parquet",
            buf.getvalue(),
        )
    return report


def _stored_spec(store: Store) -> JobSpec | None:
    """The spec the job ran with (its stored job.yaml); None for outputs without one."""
    import yaml

    from .spec import parse_spec

    try:
        return parse_spec(yaml.safe_load(store.read_bytes("job.yaml")), store.uri_of("job.yaml"))
    except Exception:  # noqa: BLE001 - older outputs: PNG files, no layouts
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

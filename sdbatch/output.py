"""The output contract: what a job output holds and how every tool reads it.

    OUTPUT/
      images/… or shards/…    the images (keys from `plan`)
      metadata/  failures/    Parquet parts, compacted at the end of a run (`compact`)
      job.yaml  _MODELS.json  the render settings and weight hashes resume checks against
      _RUN.json  _LEASE.json  the current run, and its lease on the output (`lease`)
      _SUCCESS                written last, when every item is done; lists the files

`run`, `status`, `rerun`, `estimate` and `gallery` all read an output through this
module (never through the driver), so a row is counted the same way everywhere.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .compact import compact, live_files, read_live
from .compact import repair as repair_compaction
from .errors import UserError
from .lease import LEASE_KEY
from .spec import JobSpec
from .store import PROBE_KEY, Store, open_store
from .write import METADATA_SCHEMA

METADATA_PREFIX = "metadata/"
FAILURES_PREFIX = "failures/"
SUCCESS_KEY = "_SUCCESS"
SPEC_KEY = "job.yaml"
RUN_KEY = "_RUN.json"
MODELS_KEY = "_MODELS.json"  # per checkpoint: combined, per-component and per-file hashes


def done_items(store: Store) -> set[tuple[str, int]]:
    """(id, image_index) of items with a metadata row whose image exists (a Python set:
    for tools that need one; the driver keeps `stream.done_table`'s Arrow table)."""
    table = done_table(store)
    return set(zip(table["id"].to_pylist(), table["image_index"].to_pylist(), strict=True))


def done_table(store: Store) -> pa.Table:
    """`stream.DONE_SCHEMA` rows of items with a metadata row whose image exists, once
    each. One listing of images/ and shards/ (not a request per item): cheap on S3."""
    from .stream import done_table as scan

    return scan(store, METADATA_PREFIX, ("images/", "shards/"))


def union_done(*tables: pa.Table) -> pa.Table:
    """`stream.DONE_SCHEMA` rows of all `tables`, once each (a plan's skip set)."""
    from .stream import DONE_SCHEMA, unique

    parts = [t.select(["id", "image_index", "row_id"]).cast(DONE_SCHEMA) for t in tables]
    return unique(pa.concat_tables(parts)) if parts else DONE_SCHEMA.empty_table()


def unresolved_failures(store: Store, done: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """The failures still to fix: for each item with no image in `done` (`done_table`),
    its newest failure row (latest `created_at`, then the later part), with `columns`
    (default all). The one rule `status`, `rerun --failed` and the gallery share; Arrow
    throughout, since a job's failures are not a Python object each."""
    import numpy as np

    from .stream import anti_join

    names = None
    if columns is not None:
        names = list(dict.fromkeys(["id", "image_index", *columns, "created_at"]))
    parts = [t.cast(_schema_of(t)) for t in read_parts(store, FAILURES_PREFIX, names)]
    if parts:
        table = pa.concat_tables(parts, promote_options="default")
    else:
        table = pa.schema([METADATA_SCHEMA.field(c) for c in names or METADATA_SCHEMA.names])
        table = table.empty_table()
    if "created_at" not in table.column_names:  # parts older than the column
        table = table.append_column("created_at", pa.nulls(table.num_rows, pa.timestamp("us")))
    # Keys, order and time only: Arrow joins cannot carry list columns along.
    keys = table.select(["id", "image_index", "created_at"]).append_column(
        "_part", pa.array(np.arange(table.num_rows, dtype=np.int64))
    )
    keys = anti_join(keys, done).sort_by([("created_at", "ascending"), ("_part", "ascending")])
    keys = keys.append_column("_rank", pa.array(np.arange(keys.num_rows, dtype=np.int64)))
    newest = keys.group_by(["id", "image_index"], use_threads=False).aggregate([("_rank", "max")])
    rows = keys.filter(pc.is_in(keys["_rank"], value_set=newest["_rank_max"]))["_part"]
    return table.take(pc.take(rows, pc.sort_indices(rows)))


def _schema_of(table: pa.Table) -> pa.Schema:
    """METADATA_SCHEMA's types for the columns `table` has (others as they are)."""
    known = set(METADATA_SCHEMA.names)
    return pa.schema(
        [METADATA_SCHEMA.field(f.name) if f.name in known else f for f in table.schema]
    )


def drop_orphan_shards(store: Store) -> None:
    """Delete shards no metadata row points to: an interrupted run uploaded them but did
    not commit their rows, so their items render again and would be read twice."""
    shards = set(store.list("shards/"))
    if not shards:
        return
    referenced: set[str] = set()
    for table in read_parts(store, METADATA_PREFIX, columns=["key"]):
        referenced.update(pc.unique(table["key"]).to_pylist())
    for key in shards - referenced:
        store.delete(key)


def read_parts(store: Store, prefix: str, columns: list[str] | None = None) -> list[pa.Table]:
    """The tables of `prefix`'s live files (`compact.read_live`: each row exactly once,
    whatever state a compaction was interrupted in or is running in)."""
    return read_live(
        store, prefix, lambda key: pq.read_table(io.BytesIO(store.read_bytes(key)), columns=columns)
    )


def read_metadata(output: str, storage: dict[str, Any] | None = None) -> pa.Table:
    """Every metadata row of a job output, as one table (empty with the schema if none)."""
    store = open_store(output, storage)
    tables = list(read_parts(store, METADATA_PREFIX))
    if not tables:
        return METADATA_SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="default")


# ---------------------------------------------------------------- Ray


def start_fresh(store: Store, overwrite: bool) -> None:
    existing = [k for k in store.list() if k not in (PROBE_KEY, LEASE_KEY)]
    if not existing:
        return
    if not overwrite:
        raise UserError(
            f"{store.uri}: output is not empty ({len(existing)} objects); --fresh needs "
            "--overwrite to delete them, or choose another output"
        )
    for key in existing:
        store.delete(key)


def stored_spec(store: Store) -> JobSpec | None:
    """The spec an output was rendered with (its job.yaml); None if it has none."""
    import yaml

    from .spec import parse_spec

    if not store.exists(SPEC_KEY):
        return None
    try:
        return parse_spec(yaml.safe_load(store.read_bytes(SPEC_KEY)), store.uri_of(SPEC_KEY))
    except yaml.YAMLError as err:
        raise UserError(f"{store.uri_of(SPEC_KEY)}: malformed YAML: {err}") from None


def check_same_render(spec: JobSpec, store: Store) -> None:
    """Refuse to resume into an output whose items were rendered with other settings."""
    from .spec import render_signature, signature_changes

    try:
        old = stored_spec(store)
    except UserError:
        raise UserError(
            f"{store.uri_of(SPEC_KEY)}: unreadable stored spec; use --fresh --overwrite"
        ) from None
    if old is None:
        return
    changes = signature_changes(render_signature(old), render_signature(spec))
    if changes:
        raise UserError(
            "\n".join(
                [f"{store.uri}: this output was rendered with different settings:"]
                + [f"  {c}" for c in changes]
                + ["resuming would mix images from both; use a new output, or --fresh --overwrite"]
            )
        )


def check_same_weights(store: Store, hashes: dict[str, Any]) -> None:
    """Refuse to resume with other weights under the same model names; then record these.

    Only files the pipelines load count (`weights.loaded_files`), so adding or changing
    an unused file (a root-level .ckpt, an fp16 variant) never stops a resume.
    """
    recorded: dict[str, Any] = {}
    if store.exists(MODELS_KEY):
        try:
            recorded = json.loads(store.read_bytes(MODELS_KEY))
        except ValueError:
            recorded = {}
    changes = []
    for ref, now in hashes.items():
        old = recorded.get(ref)
        if not isinstance(old, dict) or old.get("sha256") == now.sha256:
            continue
        before = old.get("components") or {}
        parts = sorted(
            name
            for name in set(before) | set(now.components)
            if before.get(name) != now.components.get(name)
        )
        changes.append(
            f"  {ref}: {', '.join(parts) or 'files'} changed "
            f"(recorded {str(old.get('sha256'))[:12]}, now {now.sha256[:12]})"
        )
    if changes:
        raise UserError(
            "\n".join(
                [f"{store.uri}: the weights differ from those this output was rendered with:"]
                + changes
                + ["resuming would mix images from both; use a new output, or --fresh --overwrite"]
            )
        )
    merged = {**recorded, **{ref: h.as_json() for ref, h in hashes.items()}}
    store.write_bytes(
        MODELS_KEY,
        json.dumps(merged, indent=1, sort_keys=True).encode(),
        content_type="application/json",
    )


def repair(store: Store) -> None:
    """Before a run reads what is done: finish or roll back an interrupted compaction,
    and delete shards an interrupted run uploaded without committing their rows."""
    for prefix in (METADATA_PREFIX, FAILURES_PREFIX):
        repair_compaction(store, prefix)
    drop_orphan_shards(store)


def count_parts(store: Store) -> int:
    return len(live_files(store, METADATA_PREFIX))


def begin_run(store: Store, spec: JobSpec) -> None:
    """Record the settings this run renders with (what the next resume checks against);
    the output is no longer complete until this run says so."""
    from .spec import dump_spec

    store.write_bytes(SPEC_KEY, dump_spec(spec).encode(), content_type="application/yaml")
    store.delete(SUCCESS_KEY)


# What `_RUN.json`'s "events" count for a run (`runner`; read by `status`):
RUN_EVENTS = (
    "replans",  # passes planned again after a lost node or render actor (max_job_retries)
    "nodes_lost",  # nodes that died during the run (Ray's node table), mended by Ray or not
    "actors_restarted",  # render actor restarts by Ray (its actor table)
    "items_rerendered",  # items in hand when their node or actor was lost, rendered again
    "items_failed_by_crashes",  # items that killed their actor every time: ActorCrash rows
)


def write_run_record(
    store: Store,
    *,
    run_id: str,
    total: int,
    planned: int,
    took_over: str | None,
    started_at: str | None = None,
    events: dict[str, int] | None = None,
) -> None:
    """`_RUN.json`: the current run, and what it lived through (`RUN_EVENTS`)."""
    record = {
        "run_id": run_id,
        "total": total,
        "planned": planned,
        "started_at": started_at or datetime.now(timezone.utc).isoformat(),
        "lease_taken_over_from": took_over,
        "events": events or {},
    }
    store.write_bytes(RUN_KEY, json.dumps(record).encode(), content_type="application/json")


def finish_run(store: Store, summary: dict[str, Any], total: int) -> None:
    """After every planned item went through (failures included): the rows into ≤ 1 file
    per 10⁶ (crash-safe, `compact`), then `_SUCCESS` listing them, last, and only when
    every item is done. A stopped run never gets here; its parts wait for the next."""
    files = {p.rstrip("/"): compact(store, p) for p in (METADATA_PREFIX, FAILURES_PREFIX)}
    drop_orphan_shards(store)  # a retried write task's shard nobody committed
    if done_table(store).num_rows >= total:
        store.write_bytes(
            SUCCESS_KEY,
            json.dumps({**summary, "files": files}, indent=2).encode(),
            content_type="application/json",
        )

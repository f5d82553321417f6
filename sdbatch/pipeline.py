"""The Ray Data side of a job: the plan stage (streamed, or made here for one small
fragment), the prepare → render → write stages, and the job's light helper actors
(plan gate, shard packer) on the head node. `runner` drives them pass by pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .manifest import ManifestInfo
from .plan import block_rows_for
from .render import BlockRenderer
from .session import CPU_STAGE_CPUS, PLAN_TASKS, Placement, runtime_env
from .spec import JobSpec
from .stream import unpack

# How far the streamed plan may run ahead of the write stage, in blocks per actor: enough
# for every actor's queue (Ray Data sends an actor up to 4 blocks at once) and the writes.
AHEAD_BLOCKS = 8
# The resource Ray gives the head node only.
HEAD_RESOURCE = "node:__internal_head__"


def shard_packer(spec: JobSpec, run_id: str) -> Any:
    """The job's WebDataset `ShardPacker` actor (None for the files layout)."""
    if spec.output_options.layout != "webdataset":
        return None
    from .write import ShardPacker

    o = spec.output_options
    return on_head_node(
        ShardPacker, spec.output, spec.storage.model_dump(), run_id, o.shard_size, o.extension
    )


def close_packer(packer: Any) -> pa.Table:
    """Upload the open shard; its rows to commit (none if the packer is gone: its items
    render again on resume)."""
    import ray

    from .stream import call_actor
    from .write import METADATA_SCHEMA

    try:
        return call_actor(packer.close)
    except ray.exceptions.RayError:
        return METADATA_SCHEMA.empty_table()
    finally:
        ray.kill(packer)


def plan_stage(
    spec: JobSpec,
    info: ManifestInfo,
    done: pa.Table,
    only: pa.Table | None,
    models: dict[str, str],
    actors: int,
    alone: list[tuple[str, int]] | None = None,
) -> tuple[Any, int, Any]:
    """The planning stage (a Ray Data dataset of packed planned blocks, `stream`), an
    estimate of the items it will plan, and its PlanGate actor (None when the plan is
    made here); (None, 0, None) when there is nothing to render."""
    import ray.data

    from . import stream
    from .manifest import _open
    from .models import family_of
    from .stream import PlanGate, fragments, plan_fragment

    storage = spec.storage.model_dump()
    estimate = only.num_rows if only is not None else max(0, info.total_items - done.num_rows)
    kwargs: dict[str, Any] = dict(
        spec=spec,
        columns=info.columns,
        storage=storage,
        families={ref: family_of(ref) for ref in set(models.values())},
        block_rows=block_rows_for(max(1, estimate), spec.batch_size, actors),
        first_blocks=actors,
        alone=alone,
    )
    if only is not None and not only.num_rows:
        return None, 0, None
    parts = fragments(_open(spec.manifest, storage), stream.FRAGMENT_ROWS)
    if len(parts) == 1 and info.num_rows <= stream.FRAGMENT_ROWS:
        # One fragment (at most FRAGMENT_ROWS rows, so bounded): planned here, up front,
        # so every actor has a block from the first moment. Streamed, a plan slower than
        # the actors (tiny models) would feed one idle actor at a time.
        rows = list(plan_fragment(pa.Table.from_pylist(parts), done=done, only=only, **kwargs))
        planned = sum(b.num_rows for row in rows for b, _ in unpack(row) if b is not None)
        # from_blocks: metadata computed here (from_arrow asks a remote task for it, and
        # on a fresh Ray that task waits ~2 s for a worker process before any actor starts).
        return (ray.data.from_blocks(rows), planned, None) if planned else (None, 0, None)
    kwargs.update(
        done=ray.put(done) if done.num_rows else None,
        only=ray.put(only) if only is not None else None,
    )
    if estimate == 0:
        # Everything looks done: confirm it with the planning tasks alone (cheap, no
        # actor loads a model) before starting a pool for nothing.
        counts = _streamed_plan(parts, kwargs).map_batches(
            _count_items, batch_format="pyarrow", num_cpus=CPU_STAGE_CPUS
        )
        estimate = sum(int(row["items"]) for row in counts.iter_rows())
        if estimate == 0:
            return None, 0, None
    gate = on_head_node(PlanGate, AHEAD_BLOCKS * actors * kwargs["block_rows"])
    return _streamed_plan(parts, {**kwargs, "gate": gate}), estimate, gate


def _streamed_plan(parts: list[dict[str, Any]], kwargs: dict[str, Any]) -> Any:
    import ray.data

    from .stream import plan_fragment

    return ray.data.from_items(parts, override_num_blocks=len(parts)).map_batches(
        plan_fragment,
        fn_kwargs=kwargs,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=CPU_STAGE_CPUS,
        compute=ray.data.TaskPoolStrategy(size=PLAN_TASKS),
        runtime_env=runtime_env(),
    )


def on_head_node(cls: type, *args: Any) -> Any:
    """An instance of `cls` as a Ray actor on the head node (where the driver runs under
    `ray job submit` and KubeRay), taking no CPU: a job's light helpers must outlive any
    worker node, and losing the head ends the cluster anyway. Without a head marker
    (an older Ray), the driver's own node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": 0, "runtime_env": runtime_env()}
    if HEAD_RESOURCE in ray.cluster_resources():
        options["resources"] = {HEAD_RESOURCE: 0.001}
    else:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True
        )
    return ray.remote(cls).options(**options).remote(*args)


def _count_items(batch: pa.Table) -> pa.Table:
    from .stream import unpack

    return pa.table({"items": [sum(b.num_rows for b, _ in unpack(batch) if b is not None)]})


def _warmup_sizes(spec: JobSpec, info: ManifestInfo) -> list[tuple[str, int, int]]:
    """(mode, width, height) the actors compile for before the first batch; a scan of
    three manifest columns, only where the job compiles (torch_compile)."""
    if not spec.compute.render_options().get("torch_compile"):
        return []
    from .manifest import _open

    pf = _open(spec.manifest, spec.storage.model_dump())
    names = [c for c in ("mode", "width", "height") if c in info.columns]
    d = spec.defaults
    sizes: set[tuple[str, int, int]] = set()
    if not names:
        return [(d.mode, d.width, d.height)]
    for batch in pf.iter_batches(columns=names, batch_size=65536):
        table = pa.Table.from_batches([batch]).group_by(names).aggregate([])
        for row in table.to_pylist():
            sizes.add(
                (
                    row.get("mode") or d.mode,
                    row.get("width") or d.width,
                    row.get("height") or d.height,
                )
            )
    return sorted(sizes)


@dataclass
class Stages:
    """What the render and write stages are built from."""

    models: dict[str, str]  # checkpoint per mode
    aux: dict[str, str | None]  # refiner, depth ControlNet, depth estimator
    hashes: dict[str, str]  # checkpoint -> model_sha256
    placement: Placement
    gate: Any  # the streamed plan's PlanGate actor, or None
    in_flight: str | None  # the run's InFlight key prefix: which items each actor has in hand
    # Render actors a pass starts with: all of them at first (so a small job's blocks
    # spread); after a loss, one, and the pool grows as capacity comes back.
    min_actors: int | None = None
    # `lora:NAME` / `embedding:NAME` → adapters.AdapterFile (hashed in the driver)
    adapters: dict[str, Any] = field(default_factory=dict)


def build(*args: Any) -> Any:
    with warnings.catch_warnings():
        # Actor restarts (max_restarts, max_task_retries) only go through ray_remote_args,
        # which Ray 2.60 flags as deprecated (removed in 2.64, hence the pin in
        # pyproject.toml); there is no named parameter for them yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return _build(*args)


def _build(
    spec: JobSpec,
    plan: Any,
    stages: Stages,
    packer: Any,
    info: ManifestInfo,
) -> Any:
    """plan → prepare (where rows have input images) → render → write, as Ray Data."""
    import ray.data

    from .stream import prepare_blocks, write_blocks

    # Environment read now, not at ray.init: a connected cluster gets this job's settings.
    env = runtime_env()
    ds = plan  # one packed planned block per row (`stream`), whatever the stage
    if info.modes != {"txt2img"}:
        # Fetch + decode input images in CPU tasks, ahead of the actors.
        ds = ds.map_batches(
            prepare_blocks,
            fn_kwargs=dict(storage=spec.storage.model_dump()),
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=CPU_STAGE_CPUS,
            runtime_env=env,
        )
    # batch_size=None: each call gets one planned block (one batch key, a multiple of
    # batch_size items), so pipeline calls are as full as the plan allows.
    ds = ds.map_batches(
        BlockRenderer,
        fn_constructor_kwargs=_renderer_kwargs(spec, stages, info),
        compute=ray.data.ActorPoolStrategy(
            min_size=stages.min_actors or stages.placement.actors,
            max_size=stages.placement.actors,
        ),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=stages.placement.cpus_per_actor,
        num_gpus=stages.placement.gpus_per_actor or None,
        resources=spec.compute.resources or None,
        # Ray Data restarts dead actors forever by default; a crash loop must end.
        max_restarts=spec.execution.max_actor_restarts,
        max_task_retries=spec.execution.max_actor_restarts + 1,
        runtime_env=env,
    )
    return ds.map_batches(
        write_blocks,
        fn_kwargs=dict(
            output=spec.output,
            job_name=spec.name,
            storage=spec.storage.model_dump(),
            image_options=spec.output_options.model_dump(),
            packer=packer,
            gate=stages.gate,
        ),
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=CPU_STAGE_CPUS,
        runtime_env=env,
    )


def _renderer_kwargs(spec: JobSpec, stages: Stages, info: ManifestInfo) -> dict[str, Any]:
    """What each render actor is built with: the checkpoints and adapters to load once,
    and how to render (`render.Renderer`'s keyword arguments)."""
    from . import modelcache

    assert spec.models is not None
    return dict(
        models=stages.models,
        **stages.aux,
        model_hashes=stages.hashes,
        in_flight=stages.in_flight,
        batch_size=spec.batch_size,
        device=stages.placement.device,
        dtype=spec.compute.dtype,
        torch_threads=stages.placement.torch_threads,
        prompt_overflow=spec.prompt_overflow,
        render_options=spec.compute.render_options(),
        warmup_sizes=_warmup_sizes(spec, info),
        storage=spec.storage.model_dump(),
        layouts=spec.models.layouts(),
        loras=spec.loras,
        embeddings=spec.embeddings,
        adapter_files=stages.adapters,
        model_sources=modelcache.plans(sorted({*stages.hashes, *spec.models.layouts().values()})),
    )

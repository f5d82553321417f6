"""`sdbatch plan`: what a job will render, what is already done, and how long it will take.

Counting streams the manifest through the same planner `run` uses (no torch, no Ray).
Time comes from a cost model, seconds per (denoising step × pixel), measured either by
rendering a few items on one in-process actor (`--calibrate N`) or from the render
times already stored in the output's metadata.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .checks import check_job
from .manifest import iter_rows
from .models import family_of
from .output import METADATA_PREFIX, done_items, read_parts
from .plan import homogeneous_blocks, plan_items
from .spec import JobSpec
from .store import open_store

GROUP_FIELDS = ("mode", "width", "height", "steps", "scheduler", "model")


def cost_units(item: dict[str, Any]) -> float:
    """Work of one image: denoising steps actually run × pixels."""
    steps = item["steps"] * (item["strength"] if item["mode"] != "txt2img" else 1.0)
    return max(steps, 1) * item["width"] * item["height"]


@dataclass
class PlanReport:
    total: int
    done: int
    groups: Counter = field(default_factory=Counter)  # group tuple → remaining items
    done_groups: Counter = field(default_factory=Counter)
    batches: int = 0
    units: float = 0.0
    seconds_per_unit: float | None = None
    source: str = ""
    actors: int = 1

    @property
    def remaining(self) -> int:
        return self.total - self.done

    @property
    def gpu_seconds(self) -> float | None:
        return None if self.seconds_per_unit is None else self.units * self.seconds_per_unit

    @property
    def wall_seconds(self) -> float | None:
        g = self.gpu_seconds
        return None if g is None else g / max(1, self.actors)


def plan_report(spec: JobSpec, calibrate: int = 0) -> PlanReport:
    info = check_job(spec)
    store = open_store(spec.output, spec.storage.model_dump())
    done = done_items(store)
    report = PlanReport(total=info.total_items, done=0)
    batch_counts: Counter = Counter()
    first_items: dict[tuple, list[dict[str, Any]]] = {}
    rows = iter_rows(spec.manifest, info.columns, spec.storage.model_dump())
    for item in plan_items(rows, spec, families=family_of):
        group = tuple(item[f] for f in GROUP_FIELDS)
        if (item["id"], item["image_index"]) in done:
            report.done += 1
            report.done_groups[group] += 1
            continue
        report.groups[group] += 1
        batch_counts[item["batch_key"]] += 1
        report.units += cost_units(item)
        if calibrate and len(first_items.setdefault(group, [])) < calibrate:
            first_items[group].append(item)
    report.batches = sum(-(-n // spec.batch_size) for n in batch_counts.values())
    report.actors = spec.compute.actors if isinstance(spec.compute.actors, int) else 1
    if calibrate and first_items:
        biggest = max(first_items, key=lambda g: report.groups[g])
        report.seconds_per_unit = _calibrate(spec, first_items[biggest][:calibrate])
        report.source = (
            f"calibrated on {min(calibrate, len(first_items[biggest]))} items, one actor"
        )
    else:
        report.seconds_per_unit, report.source = _from_history(store)
    return report


def _from_history(store: Any) -> tuple[float | None, str]:
    rates = []
    for table in read_parts(
        store, METADATA_PREFIX, ["mode", "steps", "strength", "width", "height", "render_seconds"]
    ):
        for row in table.to_pylist():
            if row["render_seconds"]:
                rates.append(row["render_seconds"] / cost_units(row))
    if not rates:
        return None, "no estimate: no earlier renders in this output (use --calibrate N)"
    return statistics.median(rates), f"from {len(rates)} images already rendered into this output"


def _calibrate(spec: JobSpec, items: list[dict[str, Any]]) -> float:
    """Seconds per cost unit, rendering `items` through the job's render entry point
    (full batches of each batch key) after one warm-up call."""
    from .checks import adapter_files
    from .models import weights_sha256
    from .prepare import prepare_item
    from .render import Renderer, checkpoints_of, models_of

    mode = items[0]["mode"]
    adapters = dict(loras=spec.loras, embeddings=spec.embeddings, adapter_files=adapter_files(spec))
    renderer = Renderer(
        **{**models_of(items[0]), **adapters},
        model_hashes={ref: weights_sha256(ref) for ref in checkpoints_of(items[0]).values()},
        batch_size=spec.batch_size,
        device=spec.compute.device,
        dtype=spec.compute.dtype,
        torch_threads=spec.compute.threads(),
        storage=spec.storage.model_dump(),
        layouts=spec.models.layouts() if spec.models else None,
    )
    for item in items:
        item.update(status=None, notes=None)
        if mode != "txt2img":
            prepare_item(item, spec.storage.model_dump())
    renderer.render(items[:1])  # warm-up: first calls pay for allocation
    # A group's items may differ in batch key (guidance, prompt syntax...): blocked as
    # the plan blocks a job, one block per key.
    blocks = list(homogeneous_blocks(items, len(items)))
    started = time.perf_counter()
    for block in blocks:
        renderer.render(block)
    seconds = time.perf_counter() - started
    return seconds / sum(cost_units(it) for it in items)

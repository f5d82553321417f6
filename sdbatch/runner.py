"""The driver: a job as numbered steps, from checks to the success marker.

    check (`checks`) → lease and resume scan (`output`) → Ray (`session`)
      → plan, render, write (`pipeline`: Ray Data) → commit (`commit`, here)
      → compact and mark success (`output`)

A lost node or render actor ends a pass, not the run: what is left is planned again and
the run goes on (`_Job.run`, step 5). Nothing here prints; progress goes to callbacks
the CLI draws. Tools that read an output (status, rerun, gallery, estimate) import
`output`, never this module.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from . import output, pipeline
from .capacity import LossWatch, actors_that_fit, lost_capacity
from .checks import aux_models, check_job, models_for, pin_hub_models
from .commit import Committer, Progress, Stalled, watched
from .errors import StoreError, UserError
from .lease import Lease, describe
from .manifest import ManifestInfo, rows_checked
from .output import read_metadata
from .session import (
    STAGE_TASKS,
    Placement,
    configure_ray_data,
    end_execution,
    explain_ray_error,
    init_ray,
    place,
    release_ray,
    stall_report,
    warm_stage_workers,
)
from .spec import JobSpec
from .store import Store, open_store
from .stream import DONE_SCHEMA, InFlight, anti_join
from .write import crash_failures

__all__ = ["Placement", "Progress", "RunResult", "read_metadata", "run_job"]


@dataclass
class RunResult:
    name: str
    output: str
    total: int
    done: int
    failed: int
    skipped: int
    wall_seconds: float  # from the first planned block to the last commit
    images_per_second: float
    actors: int
    run_id: str
    actor_seconds_per_image: float | None
    metadata_parts: list[str] = field(default_factory=list)
    # Before rendering: checks, resume scan, weight hashing, Ray start, planning.
    setup_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[Progress, Placement], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    verbose: bool = False,
    fresh: bool = False,
    overwrite: bool = False,
    retry_failed: bool = False,
    stop: threading.Event | None = None,
    break_lease: bool = False,
) -> RunResult:
    """Run a job to completion; resumes from whatever the output already holds.

    fresh: refuse a non-empty output (unless overwrite: clear it first).
    retry_failed: render only items with a failure row and no image yet.
    break_lease: delete another run's lease on the output first (that run may be alive).
    on_note: called with a line of what the driver is doing before rendering starts.
    stop: set it (the CLI's SIGINT handler does) to stop the job: what is finished is
      committed, then KeyboardInterrupt is raised. Checked between steps and while
      rendering, so a KeyboardInterrupt swallowed inside a library cannot keep the job going.
    """

    def check_stop() -> None:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt

    job = _Job(spec, check_stop, on_progress, on_start, on_note or (lambda line: None), verbose)
    # 1. Check inputs and the output before loading anything; take the output's lease.
    store = open_store(spec.output, spec.storage.model_dump())
    store.check_writable()
    job.info = check_job(spec, on_rows=lambda rows: job.note(rows_checked(rows)))
    job.spec = pin_hub_models(spec)  # every actor loads the same commit; job.yaml says which
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    lease = Lease(store, run_id, spec.execution.lease_seconds).acquire(break_lease)
    try:
        return job.run(store, lease, address, fresh, overwrite, retry_failed)
    finally:
        lease.release()


@dataclass
class _Job:
    """One run of a job while it holds the output's lease (`run_job`'s steps 2-7)."""

    spec: JobSpec
    check_stop: Callable[[], None]
    on_progress: Callable[[Progress], None] | None
    on_start: Callable[[Progress, Placement], None] | None
    note: Callable[[str], None]
    verbose: bool
    info: ManifestInfo = field(init=False)
    called: float = field(default_factory=time.monotonic)
    # Items this run committed as failures: a later pass must not render them again.
    failed_here: list[pa.Table] = field(default_factory=list)
    node_passes: int = 0  # passes that ended with a lost node
    # Set by `run` as it goes: what the actors load, and the pass's counts.
    models: dict[str, str] = field(init=False)
    aux: dict[str, str | None] = field(init=False)
    hashes: dict[str, str] = field(init=False)
    adapters: dict[str, Any] = field(init=False)
    progress: Progress | None = None
    record: dict[str, Any] = field(default_factory=dict)
    in_flight: InFlight | None = None  # what the render actors hold (Ray's key-value store)

    def run(
        self,
        store: Store,
        lease: Lease,
        address: str | None,
        fresh: bool,
        overwrite: bool,
        retry_failed: bool,
    ) -> RunResult:
        import ray

        # 2. The output: same settings and weights as what it holds; what is done.
        if fresh:
            output.start_fresh(store, overwrite)
        output.check_same_render(self.spec, store)
        self.models = models_for(self.spec, self.info.modes)
        self.aux = aux_models(self.spec, self.info)
        self.hashes, self.adapters = self._hash_models(store, self.models, self.aux)
        self.check_stop()
        done, only = self._scan(store, retry_failed)
        output.begin_run(store, self.spec)

        # 3. Ray and placement.
        owns_ray = init_ray(address, self.verbose)
        with self._stopping(owns_ray):
            configure_ray_data(self.spec, self.verbose)
            placement = place(self.spec, ray.cluster_resources())
            warm_stage_workers(STAGE_TASKS)
            self.check_stop()
            try:
                parts = self._render_all(store, lease, placement, done, only)
            finally:
                if self.in_flight is not None:
                    self.in_flight.close()  # while this run's Ray is still up
        return self._finish(store, lease, placement, parts)

    @contextlib.contextmanager
    def _stopping(self, owns_ray: bool) -> Iterator[None]:
        """Why a run stops, as one message: a hang, Ray, storage; committed work is kept."""
        import ray

        try:
            yield
        except Stalled as err:
            if owns_ray:
                release_ray(self.verbose)  # the only way to stop a hung actor's work from here
            raise UserError(str(err)) from None
        except ray.exceptions.RayError as err:
            raise UserError(explain_ray_error(err, self.spec)) from None
        except StoreError as err:
            # Disk full, permission or credentials gone, bucket deleted: what is stored
            # and committed stays; the same command resumes once the cause is fixed.
            kept = self.progress.committed if self.progress is not None else 0
            raise UserError(
                f"stopped: {err}\n{kept} image(s) committed by this run are kept; fix the "
                "output (space, permissions, credentials), then run the same command to resume"
            ) from None
        except KeyboardInterrupt:
            # What finished is committed (_render's finally); stop the rest now, even an
            # actor hung inside a pipeline call, instead of at interpreter exit.
            if owns_ray:
                release_ray(self.verbose)
            raise

    def _render_all(
        self,
        store: Store,
        lease: Lease,
        placement: Placement,
        done: pa.Table,
        only: pa.Table | None,
    ) -> list[str]:
        """4-5. Plan (streamed: Ray Data tasks expand manifest fragments into homogeneous
        blocks as rendering goes; here only its size is known), then render, write and
        commit metadata parts as results stream back. A lost node (or every render actor)
        ends a pass: what is left is planned again (committed items are skipped, exactly
        once) and the run goes on. Returns the metadata parts committed."""
        import ray

        spec, info = self.spec, self.info
        plan, to_render, gate = pipeline.plan_stage(
            spec, info, done, only, self.models, placement.actors
        )
        progress = self.progress = Progress(
            total=info.total_items, skipped=info.total_items - to_render
        )
        self.record = dict(
            run_id=lease.run_id,
            total=info.total_items,
            planned=to_render,
            took_over=describe(lease.took_over) if lease.took_over else None,
            started_at=datetime.now(timezone.utc).isoformat(),
        )
        output.write_run_record(store, **self.record)
        if self.on_start:
            self.on_start(progress, placement)
        self.check_stop()
        committer = Committer(
            store,
            lease.run_id,
            progress,
            commit_rows=spec.execution.commit_rows,
            commit_seconds=spec.execution.commit_seconds,
            check_lease=lease.check,
            failed_keys=self.failed_here,
        )
        events = dict.fromkeys(output.RUN_EVENTS, 0)
        in_flight = self.in_flight = InFlight(lease.run_id) if plan is not None else None
        stages = self._stages(placement, gate, in_flight and in_flight.prefix)
        watch = LossWatch()
        while plan is not None:
            before = progress.done + progress.failed
            try:
                self._render(lease, plan, stages, committer, watch)
                self._tally(watch, in_flight, events, progress.done + progress.failed - before)
                break
            except (ray.exceptions.RayError, TimeoutError) as err:
                again = self._tally(
                    watch, in_flight, events, progress.done + progress.failed - before
                )
                try:
                    what = self._lost(err, events, progress, again)
                finally:  # the record counts what this run lived through, even when it stops
                    output.write_run_record(store, **self.record, events=events)
                alone = self._crashes(in_flight, committer, events)
                self._wait_for_capacity(placement)
                skip = output.union_done(output.done_table(store), *self.failed_here)
                left = anti_join(only, skip) if only is not None else None
                plan, to_render, gate = pipeline.plan_stage(
                    spec, info, skip, left, self.models, placement.actors, alone
                )
                stages = self._stages(placement, gate, in_flight.prefix, min_actors=1)
                self.note(f"resumed after {what}: {to_render:,} item(s) left")
                output.write_run_record(store, **self.record, events=events)
        if any(events.values()):  # actors Ray restarted within the last pass
            output.write_run_record(store, **self.record, events=events)
        return committer.parts

    def _stages(
        self, placement: Placement, gate: Any, in_flight: str | None, min_actors: int | None = None
    ) -> pipeline.Stages:
        return pipeline.Stages(
            self.models,
            self.aux,
            self.hashes,
            placement,
            gate,
            in_flight,
            min_actors,
            self.adapters,
        )

    def _finish(
        self, store: Store, lease: Lease, placement: Placement, parts: list[str]
    ) -> RunResult:
        """6. Compact and mark success: only when every item is done."""
        progress = self.progress
        assert progress is not None
        result = RunResult(
            name=self.spec.name,
            output=store.uri,
            total=self.info.total_items,
            done=progress.done,
            failed=progress.failed,
            skipped=progress.skipped,
            wall_seconds=round(progress.elapsed, 3),
            images_per_second=round(progress.rate, 3),
            actors=placement.actors,
            run_id=lease.run_id,
            actor_seconds_per_image=(
                round(progress.actor_seconds / progress.done, 4) if progress.done else None
            ),
            metadata_parts=parts,
            setup_seconds=round(progress.started - self.called, 3),
        )
        output.finish_run(store, result.summary(), self.info.total_items)
        return result

    def _lost(
        self, err: BaseException, events: dict[str, int], progress: Progress, again: int
    ) -> str:
        """What a pass lost (a line for the console), or `err` again when it is not lost
        capacity or the retries are spent. `again`: items it had in flight."""
        what = lost_capacity(err)
        if isinstance(err, TimeoutError) and "starting actors" in str(err).lower():
            # The pool of a pass after a loss found no room within capacity_wait_seconds.
            raise UserError(
                f"no render actor could start within execution.capacity_wait_seconds="
                f"{self.spec.execution.capacity_wait_seconds:g} s; "
                f"{progress.committed} image(s) committed by this run are kept; the same "
                "command resumes once the cluster has room for a render actor"
            ) from None
        if what is None:
            raise err
        if events["replans"] >= self.spec.execution.max_job_retries:
            raise UserError(
                f"{what}, and execution.max_job_retries={self.spec.execution.max_job_retries} "
                f"passes were spent; {progress.committed} image(s) committed by this run are "
                "kept; the same command resumes"
            ) from None
        events["replans"] += 1
        if what.startswith("node "):  # else a render actor died
            self.node_passes += 1
            events["nodes_lost"] = max(events["nodes_lost"], self.node_passes)
        self.note(f"{what}: {again:,} item(s) in flight will render again")
        return what

    def _tally(
        self, watch: LossWatch, in_flight: InFlight | None, events: dict[str, int], committed: int
    ) -> int:
        """After a pass: the items it handed to render actors without committing them
        (in hand on a lost node or actor, or rendered but not yet committed when the pass
        ended; a block Ray retried on a restarted actor): they render again. Nodes lost
        and actors restarted, from Ray's tables (a pass lost to a node that Ray does not
        list as dead yet still counts)."""
        events["nodes_lost"] = max(self.node_passes, watch.nodes_lost())
        restarts = watch.actor_restarts()
        if restarts is not None:
            events["actors_restarted"] = restarts
        if in_flight is None:
            return 0
        again = max(0, in_flight.tally() - committed)
        events["items_rerendered"] += again
        return again

    def _crashes(
        self, in_flight: InFlight, committer: Committer, events: dict[str, int]
    ) -> list[tuple[str, int]]:
        """After a lost pass: items that killed their actor even when rendered alone get
        a failure row (an item is never the reason a job dies twice); items that were in
        hand at two deaths are rendered alone in the next pass to find out."""
        crashes = in_flight.crashed()
        dead = {key: entry for key, entry in crashes.items() if entry[1] >= 1}
        if dead:
            committer.add_rows(crash_failures(self.spec.name, dead))
            committer.flush()
            in_flight.forget(list(dead))
            events["items_failed_by_crashes"] += len(dead)
            # Counted as in flight by `_tally`, but they get a failure row, not a render.
            events["items_rerendered"] = max(0, events["items_rerendered"] - len(dead))
            self.note(
                f"{len(dead)} item(s) killed their render actor every time, even alone: "
                "failure rows (ActorCrash), the rest goes on"
            )
        return [key for key, entry in crashes.items() if entry[0] >= 2 and key not in dead]

    def _wait_for_capacity(self, placement: Placement) -> None:
        """Tell the console how many render actors fit now; the next pass waits up to
        execution.capacity_wait_seconds for its first one (Ray Data's actor start-up)."""
        import ray.data

        fits = actors_that_fit(self.spec, placement, ray.cluster_resources())
        if fits < placement.actors:
            self.note(
                f"waiting for capacity: {fits}/{placement.actors} render actors fit now "
                f"(up to {self.spec.execution.capacity_wait_seconds:g} s)"
            )
        ctx = ray.data.DataContext.get_current()
        ctx.wait_for_min_actors_s = int(self.spec.execution.capacity_wait_seconds) or 1

    def _hash_models(
        self, store: Store, models: dict[str, str], aux: dict[str, str | None]
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """Hash what the actors load, once, in the driver: checkpoints and adapter files; a
        resume with other weights is refused. Actors load only what the job's modes need.
        Returns (checkpoint → model_sha256, `lora:NAME`/`embedding:NAME` → AdapterFile)."""
        from .checks import adapter_files
        from .models import model_hash
        from .weights import ModelHash

        checkpoints = set(models.values()) | {ref for ref in aux.values() if ref}
        model_hashes = {ref: model_hash(ref) for ref in sorted(checkpoints)}
        adapters = adapter_files(self.spec)
        for f in adapters.values():
            model_hashes[f.uri] = ModelHash(f.sha256, {f.kind: f.sha256})
        output.check_same_weights(store, model_hashes)
        return {ref: h.sha256 for ref, h in model_hashes.items()}, adapters

    def _scan(self, store: Store, retry_failed: bool) -> tuple[pa.Table, pa.Table | None]:
        """What is already done (resume) and, with retry_failed, the only items to plan."""
        output.repair(store)
        parts_before = output.count_parts(store)
        if parts_before:
            self.note(f"resuming: scanning {parts_before:,} metadata file(s) for done items")
        scan_started = time.monotonic()
        done = output.done_table(store)
        only = None
        if retry_failed:  # the items `status` counts as failed: the same rule
            failed = output.unresolved_failures(store, done, ["row_id"])
            only = failed.select(DONE_SCHEMA.names).cast(DONE_SCHEMA)
        if parts_before:
            self.note(
                f"{done.num_rows:,} item(s) already done"
                + (f", {only.num_rows:,} failed to retry" if only is not None else "")
                + f" ({time.monotonic() - scan_started:.1f} s)"
            )
        return done, only

    def _render(
        self,
        lease: Lease,
        plan: Any,
        stages: pipeline.Stages,
        committer: Committer,
        watch: LossWatch,
    ) -> None:
        """One pass: stream the plan through render and write; commit rows as they come
        back. However it ends (done, stall, error, Ctrl-C), what was written is committed.
        No render actor alive for capacity_wait_seconds (a lost node Ray cannot place its
        actors elsewhere for) ends the pass like a failed start."""
        spec, execution, progress = self.spec, self.spec.execution, committer.progress
        packer = pipeline.shard_packer(spec, lease.run_id)
        ds = pipeline.build(spec, plan, stages, packer, self.info)
        committer.skipped = 0
        before = progress.done + progress.failed  # this run's earlier passes
        watch.new_pass()
        waiting = [False]

        def on_idle() -> None:
            if committer.due():
                committer.flush()
            quiet = watch.none_alive_for()
            if quiet > execution.capacity_wait_seconds:
                raise TimeoutError(f"starting actors: no render actor alive for {quiet:.0f} s")
            if quiet and not waiting[0]:
                waiting[0] = True
                self.note(
                    f"waiting for capacity: 0/{stages.placement.actors} render actors alive "
                    f"(up to {execution.capacity_wait_seconds:g} s)"
                )

        def abandon() -> None:
            end_execution(ds)
            watch.end_render_actors()  # any Ray Data's shutdown left (a hung one)

        batches = watched(
            lambda: ds.iter_batches(batch_format="pyarrow", batch_size=None),
            watchdog_seconds=execution.watchdog_seconds,
            on_idle=on_idle,
            check_stop=self.check_stop,
            stall_report=lambda seconds: stall_report(seconds, watch.render_actors()),
            on_abandon=abandon,
        )
        try:
            for batch in batches:
                watch.progress()
                committer.add(batch)
                if self.on_progress:
                    self.on_progress(progress)
            # Every fragment reported: the exact count of what was done before this run
            # (a later pass also skips what this run's earlier passes did).
            progress.skipped = committer.skipped - before
        finally:
            batches.close()  # a stopped stream ends its execution now
            if packer is not None:
                committer.add_rows(pipeline.close_packer(packer))
            committer.flush()

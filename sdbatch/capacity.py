"""What a run lost and what fits now: Ray's node and actor tables read by the driver.

`LossWatch` counts nodes lost and render actors restarted (including what Ray mends
without an error reaching the driver) and how long no render actor has been alive;
`lost_capacity` tells a lost node from a dead actor from a failed start;
`actors_that_fit` says how many render actors the cluster has room for now.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from typing import Any

from .session import CPU_STAGE_CPUS, STAGE_TASKS, Placement
from .spec import JobSpec

# Ray actor states of an actor waiting for a place to (re)start.
WAITING = ("RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY")


class LossWatch:
    """What Ray's own tables say a run lost, including what Ray handles without the
    driver seeing an error (an actor restarted in place or on a replacement node while
    it had nothing in hand): nodes seen alive during the run that are dead now, restarts
    of this job's render actors, and how long none of them has been alive.

    The last matters when no node fits a lost node's actors: Ray keeps them waiting for
    one and Ray Data waits with them, so the stream only goes quiet (measured: a render
    node removed while its actors were idle, no replacement; the run waited for the
    900 s watchdog instead of capacity_wait_seconds).
    """

    CHECK_SECONDS = 5.0  # the actor table is read at most this often while idle

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.nodes_lost()
        # Render actors of this driver's earlier runs (a library caller, a test session):
        # dead, and not this run's.
        self.earlier: set[str] = set()
        self.earlier = {a["ActorID"] for a in self.render_actors() or []}
        self.alive_at: float | None = None  # a render actor last known alive
        self.checked = 0.0
        self.nodes_checked = time.monotonic()  # nodes_lost() just now

    def new_pass(self) -> None:
        """A pass starts its own actors (Ray Data waits for them to start)."""
        self.alive_at = None

    def progress(self) -> None:
        """Rows arrived: a render actor was alive."""
        self.alive_at = time.monotonic()
        self._look_at_nodes()

    def _look_at_nodes(self) -> None:
        """Nodes alive now join those seen, at most every CHECK_SECONDS while the run goes
        on: a replacement node that joins and is lost within one pass counts as lost too
        (seen undercounted: two nodes lost, one recorded)."""
        now = time.monotonic()
        if now - self.nodes_checked >= self.CHECK_SECONDS:
            self.nodes_checked = now
            with contextlib.suppress(Exception):  # a count, never the reason a run fails
                self.nodes_lost()

    def none_alive_for(self) -> float:
        """Seconds this pass's render actors have all been waiting for a place (none
        alive, one restarting or pending); 0 otherwise, before any was alive, or for up
        to 2 × CHECK_SECONDS (what the table's sampling leaves open). Actors Ray Data
        ended (dead: their work is done) are not waiting."""
        now = time.monotonic()
        self._look_at_nodes()
        if now - self.checked >= self.CHECK_SECONDS:
            self.checked = now
            states = self._render_actors()
            # Unknown counts as alive: the watchdog still holds.
            if states is None or states["ALIVE"] or not sum(states[s] for s in WAITING):
                self.alive_at = now
        quiet = 0.0 if self.alive_at is None else now - self.alive_at
        return quiet if quiet > 2 * self.CHECK_SECONDS else 0.0

    def nodes_lost(self) -> int:
        import ray

        nodes = ray.nodes()
        dead = {n["NodeID"] for n in nodes if not n.get("Alive")} & self.seen
        self.seen |= {n["NodeID"] for n in nodes if n.get("Alive")}
        return len(dead)

    def actor_restarts(self) -> int | None:
        """None when Ray's actor table cannot be read (a private API)."""
        states = self._render_actors()
        return None if states is None else states["restarts"]

    def render_actors(self) -> list[dict[str, Any]] | None:
        """This run's render actors as GCS's actor table lists them (works without the
        dashboard, which sdbatch leaves off): this driver's, less its earlier runs'. None
        when the table cannot be read (a private API)."""
        import ray

        try:
            from ray._private.state import actors as actor_table

            job = ray.get_runtime_context().get_job_id()
            return [
                a
                for a in actor_table().values()
                if a.get("JobID") == job
                and "BlockRenderer" in a.get("ActorClassName", "")
                and a["ActorID"] not in self.earlier
            ]
        except Exception:  # noqa: BLE001 - a report, never the reason a run fails
            return None

    def end_render_actors(self) -> None:
        """Kill this run's render actors that are not dead yet, as `ray.kill` does (by id:
        Ray Data holds their handles). For a run that stops on a Ray it does not own:
        Ray Data's own forced shutdown has left one alive that was hung inside a pipeline
        call (seen once in the suite), holding its CPU or GPU from the caller's next job."""
        import ray
        from ray._private.worker import global_worker

        for a in self.render_actors() or []:
            if a.get("State") != "DEAD":
                with contextlib.suppress(Exception):  # gone meanwhile; a private API
                    global_worker.core_worker.kill_actor(ray.ActorID.from_hex(a["ActorID"]), True)

    def _render_actors(self) -> Counter[str] | None:
        """This run's render actors per state, and their "restarts"; None when Ray's
        actor table cannot be read."""
        mine = self.render_actors()
        if mine is None:
            return None
        states = Counter(str(a.get("State")) for a in mine)
        states["restarts"] = sum(int(a.get("NumRestarts") or 0) for a in mine)
        return states


def lost_capacity(err: BaseException) -> str | None:
    """What was lost, when `err` is the infrastructure failing rather than the job (a node
    gone, an actor process killed, an object lost with its node); None otherwise — in
    particular for an actor whose constructor failed (a model that does not load), which
    no retry mends.

    Read from the error's type (or, in a task's error, its cause's) and, for the node,
    the address Ray names in its text.
    """
    import ray.exceptions as rex

    lost = (
        rex.ActorDiedError,
        rex.ActorUnavailableError,
        rex.NodeDiedError,
        rex.ObjectLostError,
        rex.OwnerDiedError,
        rex.WorkerCrashedError,
        rex.LocalRayletDiedError,
        rex.ObjectFetchTimedOutError,
    )
    cause = getattr(err, "cause", None)
    found = err if isinstance(err, lost) else cause if isinstance(cause, lost) else None
    text = str(err)
    if found is None or getattr(found, "actor_init_failed", False) or "creation task" in text:
        return None
    kind = type(found).__name__
    ip = re.search(r"\bip[=:]\s*(\d+\.\d+\.\d+\.\d+)", text) or re.search(
        r"ipv4:(\d+\.\d+\.\d+\.\d+)", text
    )
    node_gone = isinstance(found, (rex.ActorUnavailableError, rex.NodeDiedError)) or bool(
        re.search(r"node (has )?died|node .* (dead|terminated)|raylet", text, re.IGNORECASE)
    )
    if node_gone:
        return f"node {ip[1] if ip else '?'} lost ({kind})"
    return f"a render actor{f' on {ip[1]}' if ip else ''} died ({kind})"


def actors_that_fit(spec: JobSpec, placement: Placement, cluster: dict[str, float]) -> int:
    """How many of the job's render actors the cluster's resources hold now."""
    need = {"CPU": placement.cpus_per_actor, "GPU": placement.gpus_per_actor}
    need.update(spec.compute.resources or {})
    have = dict(cluster)
    have["CPU"] = have.get("CPU", 0.0) - STAGE_TASKS * CPU_STAGE_CPUS
    fits = placement.actors
    for name, amount in need.items():
        if amount and amount > 0:
            fits = min(fits, int(max(0.0, have.get(name, 0.0)) / amount + 1e-9))
    return fits

"""Placing the render pool on the resources Ray reports (no Ray needed)."""

from __future__ import annotations

import pytest

from sdbatch.errors import UserError
from sdbatch.session import CPU_STAGE_CPUS, STAGE_TASKS, place
from sdbatch.spec import parse_spec


def spec(**compute):
    return parse_spec(
        {"name": "t", "manifest": "/m.parquet", "output": "/o", "model": "/m", "compute": compute}
    )


def fits(placement, cpus: float) -> bool:
    """The pool plus one prepare and one write task fit in the CPUs Ray counts."""
    return placement.actors * placement.cpus_per_actor + STAGE_TASKS * CPU_STAGE_CPUS <= cpus + 1e-9


@pytest.mark.parametrize("cpus", [1, 2, 3, 16])
def test_cpu_auto_uses_every_core_and_leaves_room_for_the_cpu_stages(cpus) -> None:
    placed = place(spec(), {"CPU": float(cpus)})
    assert (placed.device, placed.actors, placed.torch_threads) == ("cpu", cpus, 1)
    assert placed.gpus_per_actor == 0 and fits(placed, cpus)


def test_cpu_auto_with_more_threads_per_actor() -> None:
    placed = place(spec(cpus_per_actor=4), {"CPU": 16.0})
    assert (placed.actors, placed.torch_threads) == (4, 4) and fits(placed, 16)


def test_explicit_actor_count_is_kept_and_still_fits() -> None:
    placed = place(spec(actors=2, cpus_per_actor=1), {"CPU": 2.0})
    # Three CPU stages (plan, prepare, write) keep 0.25 CPU each: (2 - 0.75) / 2 per actor.
    assert placed.actors == 2 and placed.cpus_per_actor == 0.625 and fits(placed, 2)


def test_gpu_auto_counts_gpus_and_fractions() -> None:
    assert place(spec(), {"CPU": 16.0, "GPU": 4.0}).actors == 4
    half = place(spec(gpus_per_actor=0.5), {"CPU": 16.0, "GPU": 2.0})
    assert (half.device, half.actors, half.gpus_per_actor) == ("cuda", 4, 0.5)


def test_gpu_auto_without_gpus_says_what_to_do() -> None:
    with pytest.raises(UserError, match="set compute.actors"):
        place(spec(device="cuda"), {"CPU": 8.0})


def test_lost_capacity_tells_a_lost_node_from_a_dead_actor_and_a_failed_start() -> None:
    import ray.exceptions as rex

    from sdbatch.capacity import lost_capacity

    gone = rex.ActorUnavailableError(
        "RpcError: ipv4:10.0.1.7:40875: Failed to connect to remote host", None
    )
    assert lost_capacity(gone) == "node 10.0.1.7 lost (ActorUnavailableError)"
    died = rex.ActorDiedError()
    assert lost_capacity(died) == "a render actor died (ActorDiedError)"
    failed_start = rex.ActorDiedError()
    failed_start._actor_init_failed = True  # its constructor raised: no retry mends that
    assert lost_capacity(failed_start) is None
    assert lost_capacity(ValueError("a bug")) is None


def test_loss_watch_tells_actors_waiting_for_a_node_from_finished_ones(monkeypatch) -> None:
    """A node gone with no replacement: Ray keeps its actors RESTARTING and the stream
    goes quiet; only that (not actors Ray Data ended, nor a table it cannot read) counts
    as having no render actor."""
    from collections import Counter

    from sdbatch import capacity

    clock = [100.0]
    monkeypatch.setattr(capacity.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(capacity.LossWatch, "nodes_lost", lambda self: 0)
    monkeypatch.setattr(capacity.LossWatch, "render_actors", lambda self: [])
    table: list = [Counter(ALIVE=2)]
    monkeypatch.setattr(capacity.LossWatch, "_render_actors", lambda self: table[0])
    watch = capacity.LossWatch()
    watch.new_pass()
    table[0] = Counter(PENDING_CREATION=2)  # the pass's actors load their model
    clock[0] += 60
    assert watch.none_alive_for() == 0.0  # none was alive yet: Ray Data's start-up wait
    watch.progress()
    table[0] = Counter(RESTARTING=2)  # their node is gone
    waited = []
    for _ in range(6):
        clock[0] += 5
        waited.append(watch.none_alive_for())
    assert waited == [0.0, 0.0, 15.0, 20.0, 25.0, 30.0]
    table[0] = Counter(ALIVE=1, RESTARTING=1)  # a replacement node took one
    clock[0] += 5
    assert watch.none_alive_for() == 0.0
    table[0] = Counter(DEAD=2)  # Ray Data ended them: the last writes still run
    clock[0] += 60
    assert watch.none_alive_for() == 0.0
    table[0] = None  # the table cannot be read: the watchdog alone decides
    clock[0] += 60
    assert watch.none_alive_for() == 0.0

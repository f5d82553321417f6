"""Faults injected into a job's render actors, for the resilience tests (not part of sdbatch).

A fault is a subclass of the job's actor class, `BlockRenderer`, that misbehaves at one
item; the job builds its render stage from that class instead (`sdbatch.pipeline`
looks the class up when it builds the stage). Ray ships the subclass to the actors by
value, fault and all, so nothing has to be set in their environment.

- `with injected(FAULT): run_job(spec)` in the test process (the session's Ray);
- `python -m tests.faults FAULT run JOB.yaml ...` runs `sdbatch run ...` with the fault
  in place, for tests that drive the CLI in a subprocess.

FAULT is one of:
`crash:ID:MARKER` kills the actor process at item ID once (MARKER is a file created on
the first crash), `crashloop:ID` kills it every time, `hang:ID` blocks forever,
`raise:ID` makes every pipeline call that contains ID raise (as a CUDA OOM would),
`pace:SECONDS` makes every block take at least that long (a slow GPU: a job that lasts,
without the CPU that more steps would cost).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

KINDS = ("crash", "crashloop", "hang", "raise", "pace")


def faulty_renderer(fault: str) -> type:
    """`BlockRenderer` with `fault` (see the module docstring)."""
    from sdbatch.render import BlockRenderer

    kind, _, rest = fault.partition(":")
    target, _, marker = rest.partition(":")
    assert kind in KINDS and target, f"unknown fault {fault!r}"

    # Defined here, not at module level: Ray then pickles the class by value, with the
    # fault it closes over.
    class FaultyBlockRenderer(BlockRenderer):
        def render(self, items: list[dict[str, Any]], position: int | None = None) -> Any:
            if kind == "pace":
                time.sleep(float(target))
            elif kind != "raise" and any(item["id"] == target for item in items):
                if kind == "crash" and marker and not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(17)
                if kind == "crashloop":
                    os._exit(17)
                if kind == "hang":
                    time.sleep(10**6)
            return super().render(items, position)

        def _call(self, items: list[dict[str, Any]], position: int | None = None) -> Any:
            if kind == "raise" and any(item["id"] == target for item in items):
                raise RuntimeError(f"injected failure for {target} (tests.faults)")
            return super()._call(items, position)

    return FaultyBlockRenderer


@contextlib.contextmanager
def injected(fault: str) -> Iterator[None]:
    """Jobs run inside the block render with `fault`."""
    import sdbatch.pipeline

    original = sdbatch.pipeline.BlockRenderer
    sdbatch.pipeline.BlockRenderer = faulty_renderer(fault)
    try:
        yield
    finally:
        sdbatch.pipeline.BlockRenderer = original


def main(argv: list[str]) -> None:
    """`python -m tests.faults FAULT ARGS...`: `sdbatch ARGS...` with FAULT injected."""
    from sdbatch.cli import main as sdbatch_main

    fault, *args = argv
    sys.argv = ["sdbatch", *args]
    with injected(fault):
        sdbatch_main()


if __name__ == "__main__":
    main(sys.argv[1:])

"""The example jobs in jobs/ stay valid specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sdbatch.spec import parse_spec

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_example_job_is_a_valid_spec(path: Path) -> None:
    parse_spec(yaml.safe_load(path.read_text()), str(path))


def test_all_examples_are_checked() -> None:
    assert {p.name for p in JOBS} >= {"demo.yaml", "modes.yaml", "sweep.yaml", "s3.yaml"}

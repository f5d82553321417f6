from __future__ import annotations

from pathlib import Path

import pytest

from sdbatch.spec import load_spec
from tests.helpers import prompts, write_manifest, write_spec


@pytest.fixture
def make_job(tmp_path: Path, tiny_models, ray_session):
    """Write a manifest + spec under tmp_path; returns (spec_path, loaded spec)."""

    def make(rows=None, name="job", **spec_fields):
        rows = prompts(18) if rows is None else rows
        manifest = write_manifest(tmp_path / f"{name}.parquet", rows)
        spec_fields.setdefault("model", str(tiny_models["base"]))
        spec_fields.setdefault("output", str(tmp_path / f"out-{name}"))
        path = write_spec(tmp_path / f"{name}.yaml", manifest=str(manifest), **spec_fields)
        return path, load_spec(path)

    return make

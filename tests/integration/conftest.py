from __future__ import annotations

from pathlib import Path

import pytest

from sdbatch.spec import load_spec
from tests.helpers import write_job


@pytest.fixture
def make_job(tmp_path: Path, tiny_models, ray_session):
    """write_job under tmp_path on the base model (18 prompts unless `rows`), on the
    session's Ray; returns (spec_path, loaded spec)."""

    def make(rows=None, name="job", **spec_fields):
        model = spec_fields.pop("model", None if "models" in spec_fields else tiny_models["base"])
        path = write_job(tmp_path, model, 18 if rows is None else rows, name=name, **spec_fields)
        return path, load_spec(path)

    return make

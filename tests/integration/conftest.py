from __future__ import annotations

from pathlib import Path

import pytest

from sdbatch.spec import load_spec
from tests.helpers import cluster_job, local_ray, sha_by_item, write_job


@pytest.fixture(scope="session")
def cluster_reference(tmp_path_factory, tiny_models) -> dict:
    """sha_by_item of `cluster_job` on a one-node Ray of its own, nothing lost: what
    every cluster run of it must match (own-Ray tests use it: no session Ray)."""
    from sdbatch.runner import run_job

    tmp = tmp_path_factory.mktemp("cluster-reference")
    spec = load_spec(cluster_job(tmp, tiny_models["base"], "reference"))
    spec = spec.model_copy(update={"compute": spec.compute.model_copy(update={"resources": {}})})
    with local_ray():
        run_job(spec)
    return sha_by_item(spec.output)


@pytest.fixture
def make_job(tmp_path: Path, tiny_models, ray_session):
    """write_job under tmp_path on the base model (18 prompts unless `rows`), on the
    session's Ray; returns (spec_path, loaded spec)."""

    def make(rows=None, name="job", **spec_fields):
        model = spec_fields.pop("model", None if "models" in spec_fields else tiny_models["base"])
        path = write_job(tmp_path, model, 18 if rows is None else rows, name=name, **spec_fields)
        return path, load_spec(path)

    return make

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from sdbatch.spec import load_spec
from tests.helpers import cluster_job, local_ray, sha_by_item, write_job


@pytest.fixture(scope="session")
def cluster_reference(tmp_path_factory, tiny_models) -> dict:
    """sha_by_item of `cluster_job` on a one-node Ray of its own, nothing lost: what
    every cluster run of it must match (own-Ray tests use it: no session Ray). Rendered
    once per session: under pytest-xdist the first worker to need it renders it, the
    others wait for its file."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _cluster_reference(tmp_path_factory.mktemp("cluster-reference"), tiny_models)
    shared = tmp_path_factory.getbasetemp().parent  # this session's, for every worker
    saved = shared / "cluster-reference.json"
    with open(shared / "cluster-reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not saved.exists():
            reference = _cluster_reference(
                tmp_path_factory.mktemp("cluster-reference"), tiny_models
            )
            rows = [[item, index, sha] for (item, index), sha in sorted(reference.items())]
            saved.write_text(json.dumps(rows))
    return {(item, index): sha for item, index, sha in json.loads(saved.read_text())}


def _cluster_reference(tmp: Path, tiny_models) -> dict:
    from sdbatch.runner import run_job

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

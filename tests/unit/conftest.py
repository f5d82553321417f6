"""tests/unit is `make test-fast`: no Ray. A unit test that asks for the session's Ray
fails, and so does one that starts a Ray some other way."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="session")
def ray_session():
    pytest.fail("tests/unit runs without Ray (make test-fast); Ray tests go in tests/integration")


@pytest.fixture(autouse=True)
def no_ray_started(request):
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray; unit tests run without it")

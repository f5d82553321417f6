"""tests/unit is `make test-fast`: no Ray. A unit test that asks for it fails here."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    pytest.fail("tests/unit runs without Ray (make test-fast); Ray tests go in tests/integration")

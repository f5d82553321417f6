"""Shared fixtures: offline HF, tiny models built once, one local Ray per session."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.s3server import S3Server, use_fake_aws_env

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# File hashes cached per test session, not in the user's ~/.cache/sdbatch.
os.environ.setdefault("SDBATCH_CACHE_DIR", tempfile.mkdtemp(prefix="sdbatch-cache-"))
# Fake AWS credentials before Ray starts (its local workers inherit this environment).
use_fake_aws_env()

ROOT = Path(__file__).resolve().parents[1]


def tiny_models_dir() -> Path:
    """Where the tiny models are kept between sessions (building them costs ~30 s): one
    folder per version of the code that builds them and of the libraries that write them,
    so an edit to tiny.py builds afresh instead of testing old weights. Tests copy a model
    before changing it. SDBATCH_TEST_MODELS moves the folder."""
    from importlib.metadata import version

    key = hashlib.sha256()
    for source in ("sdbatch/tiny.py", "sdbatch/ldm.py"):
        key.update((ROOT / source).read_bytes())
    for package in ("torch", "diffusers", "transformers", "safetensors", "peft"):
        key.update(f"{package}=={version(package)}\n".encode())
    base = os.environ.get("SDBATCH_TEST_MODELS") or Path(
        tempfile.gettempdir(), "sdbatch-test-models"
    )
    return Path(base) / key.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Tiny random pipelines (every variant of `sdbatch models tiny`), built with `sdbatch
    models tiny`'s code once per version of that code (see tiny_models_dir)."""
    import fcntl

    from sdbatch.tiny import build_tiny

    folder = tiny_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # Sessions started together (worktrees, CI jobs) build it once: the others wait, then
    # build_tiny finds every variant complete and skips it.
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_tiny(folder)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests without Ray first (quick failures), then those that start a Ray of their own
    (marked own_ray: `sdbatch run` processes, clusters), then those on the session's Ray,
    which the first of them starts: in one pytest process, a test's own Ray (whose
    `--address auto` must find it alone) never runs beside the session's. Stable: files
    keep their order. Under xdist (`make test`: -n 2) each worker is handed tests in this
    order, so each worker runs its own-Ray tests before it starts its session Ray."""

    def group(item: pytest.Item) -> tuple[int, bool]:
        if item.get_closest_marker("own_ray"):
            return 1, True
        if "ray_session" in getattr(item, "fixturenames", ()):
            return 2, True
        return 0, item.get_closest_marker("integration") is not None  # tests/unit first

    items.sort(key=group)


@pytest.fixture(autouse=True)
def _own_ray_runs_alone(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("own_ray"):
        ray = sys.modules.get("ray")
        assert ray is None or not ray.is_initialized(), "a Ray is running in the test process"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (dashboard off), shut down at the end; started
    by the first test that needs it, after every own_ray test (see above)."""
    import ray

    from sdbatch.session import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 over HTTP on 127.0.0.1:<free port> for the whole session."""
    server = S3Server()
    yield server
    server.stop()

"""Shared fixtures: offline HF, tiny models built once, one local Ray per session."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random pipelines (every variant of `sdbatch models tiny`), built with `sdbatch models tiny`'s code."""
    from sdbatch.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (dashboard off), shut down at the end."""
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

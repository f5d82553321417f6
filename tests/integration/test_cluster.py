"""The same job on a multi-node cluster and on an existing `ray start` cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdbatch.spec import load_spec
from tests.helpers import CLUSTER_ITEMS, cluster_job, isolated_env, sha_by_item, write_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
HERE = Path(__file__).parent


def job(tmp_path: Path, model: Path, name: str, **compute) -> Path:
    compute = {"actors": 2, "cpus_per_actor": 1, **compute}
    return write_job(tmp_path, model, 16, name=name, steps=2, compute=compute)


@pytest.mark.own_ray
def test_multi_node_spreads_work_and_matches_single_node(
    tmp_path, tiny_models, cluster_reference
) -> None:
    spec_path = cluster_job(tmp_path, tiny_models["base"], "cluster")
    proc = subprocess.run(
        [sys.executable, str(HERE / "cluster_job.py"), str(spec_path)],
        capture_output=True,
        text=True,
        timeout=500,
        env=isolated_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    report = json.loads(line.removeprefix("RESULT "))
    assert report["done"] == CLUSTER_ITEMS
    workers = {w[:12] for w in report["workers"]}
    # Both worker nodes rendered (the custom resource keeps actors off the head).
    assert set(report["rendered_on"]) == workers, report
    # The same job on a one-node Ray: the same bits.
    assert sha_by_item(load_spec(spec_path).output) == cluster_reference


@pytest.mark.own_ray
def test_run_against_an_existing_ray_start_cluster(tmp_path, tiny_models) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = isolated_env()
    # Token auth off on both sides: with HOST:PORT Ray's client does not read the token
    # file the head found (~/.ray/auth_token), and that is not what this test is about
    # (session.py's hint covers it for users); seen failing beside another worker's Ray.
    env["RAY_AUTH_MODE"] = "disabled"
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--block",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        spec_path = job(tmp_path, tiny_models["base"], "attached", actors=1)
        deadline = time.monotonic() + 120
        while True:  # wait until the head answers
            probe = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import ray; ray.init(address='127.0.0.1:{port}'); print('up')",
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
            )
            if "up" in probe.stdout or time.monotonic() > deadline:
                break
            time.sleep(1)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sdbatch.cli",
                "run",
                str(spec_path),
                "--address",
                f"127.0.0.1:{port}",
                "--progress",
                "none",
            ],
            capture_output=True,
            text=True,
            timeout=400,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (
            "16 rendered" in proc.stdout.replace("\n", " ") or "16 images rendered" in proc.stdout
        )
        assert len(sha_by_item(load_spec(spec_path).output)) == 16
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()

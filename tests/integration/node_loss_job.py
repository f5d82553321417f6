"""Run a job on a local cluster whose render node is lost mid-job, as a spot preemption
loses it; print JSON.

Head (1 CPU: the driver and the CPU stages) + one render node (2 CPUs, the
`render_node` resource both actors need). After AFTER images are stored, the render node
is removed without warning; with --replace a new one joins 3 s later. With --resume, once
the run has stopped (no node came back), a render node joins and the same job runs again
on the same cluster: its counts are the report's "resumed".

Used by test_node_loss.py in a subprocess, so its Ray cluster never meets the test
session's own. Usage: python node_loss_job.py JOB.yaml AFTER [--replace | --resume]
"""

import json
import sys
import threading
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from sdbatch.errors import UserError
from sdbatch.runner import read_metadata, run_job
from sdbatch.spec import load_spec

HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


def stored(output: str) -> int:
    images = Path(output, "images")
    return len(list(images.glob("*/*.png"))) if images.exists() else 0


def main(spec_path: str, after: int, replace: bool, resume: bool) -> None:
    # Ray notices a dead node after HEALTH_CHECKS (~1.5 s) instead of its default ~15 s:
    # a cloud cluster tuned for spot fleets, and a test that does not wait on Ray.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": HEALTH_CHECKS},
    )
    node = cluster.add_node(num_cpus=2, resources={"render_node": 2})
    cluster.wait_for_nodes()
    spec = load_spec(spec_path)
    notes: list[str] = []
    report: dict = {}

    def run() -> None:
        try:
            result = run_job(spec, address=cluster.address, on_note=notes.append)
            report.update(done=result.done, failed=result.failed, skipped=result.skipped)
        except UserError as err:
            report.update(error=str(err))

    # The job in a thread: Ray adds nodes from the main thread only (signal handlers).
    job = threading.Thread(target=run, daemon=True)
    job.start()
    lost = False
    while job.is_alive() and stored(spec.output) < after:
        time.sleep(0.05)
    if job.is_alive():
        cluster.remove_node(node, allow_graceful=False)
        lost = True
        if replace:
            time.sleep(3)
            cluster.add_node(num_cpus=2, resources={"render_node": 2})
    job.join()
    record = Path(spec.output, "_RUN.json")
    run_record = json.loads(record.read_text()) if record.exists() else {}
    report.update(notes=notes, lost=lost, events=run_record.get("events", {}))
    if resume:  # the same command, once the cluster has its render node again
        report.update(
            stopped={
                "committed": read_metadata(spec.output).num_rows,
                "success": Path(spec.output, "_SUCCESS").exists(),
            }
        )
        cluster.add_node(num_cpus=2, resources={"render_node": 2})
        cluster.wait_for_nodes()
        again = run_job(spec, address=cluster.address)
        report.update(
            resumed={"done": again.done, "skipped": again.skipped, "failed": again.failed}
        )
    import ray

    ray.shutdown()  # disconnect first: Cluster refuses to remove the driver's node
    cluster.shutdown()
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--replace" in sys.argv, "--resume" in sys.argv)

"""Run a job on a local cluster whose render node is lost mid-job, as a spot preemption
loses it, twice; print JSON.

Head (1 CPU: the driver and the CPU stages) + one render node (2 CPUs, the
`render_node` resource both actors need). After REPLACED images are stored, the render
node is removed without warning and a new one joins 3 s later (the run carries on); after
GONE images, that one is removed too and none comes back (the run stops after
execution.capacity_wait_seconds). Then two render nodes of one CPU each join and the same
job runs again on the same cluster, an actor on each (a multi-node run): its counts are the
report's "resumed", the nodes its items were rendered on "resumed_on".

Used by test_node_loss.py in a subprocess, so its Ray cluster never meets the test
session's own. Usage: python node_loss_job.py JOB.yaml REPLACED GONE
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
RENDER_NODE = {"num_cpus": 2, "resources": {"render_node": 2}}
HALF_NODE = {"num_cpus": 1, "resources": {"render_node": 1}}  # room for one actor


def stored(output: str) -> int:
    images = Path(output, "images")
    return len(list(images.glob("*/*.png"))) if images.exists() else 0


def rows(output: str) -> dict[tuple[str, int], str]:
    """{(id, image_index): the node id (12 hex) its metadata's worker names} per item."""
    meta = read_metadata(output).to_pandas()
    nodes = meta["worker"].str.split(":").str[1]
    keys = zip(meta["id"], meta["image_index"].astype(int), strict=True)
    return dict(zip(keys, nodes, strict=True))


def main(spec_path: str, replaced: int, gone: int) -> None:
    # Ray notices a dead node after HEALTH_CHECKS (~1.5 s) instead of its default ~15 s:
    # a cloud cluster tuned for spot fleets, and a test that does not wait on Ray.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": HEALTH_CHECKS},
    )
    node = cluster.add_node(**RENDER_NODE)
    cluster.wait_for_nodes()
    spec = load_spec(spec_path)
    notes: list[str] = []
    report: dict = {"losses": []}

    def run() -> None:
        try:
            result = run_job(spec, address=cluster.address, on_note=notes.append)
            report.update(done=result.done, failed=result.failed, skipped=result.skipped)
        except UserError as err:
            report.update(error=str(err))

    # The job in a thread: Ray adds nodes from the main thread only (signal handlers).
    job = threading.Thread(target=run, daemon=True)
    job.start()
    for after, replace in ((replaced, True), (gone, False)):
        while job.is_alive() and stored(spec.output) < after:
            time.sleep(0.05)
        if not job.is_alive():
            break
        cluster.remove_node(node, allow_graceful=False)
        report["losses"].append({"stored": stored(spec.output), "replaced": replace})
        if replace:
            time.sleep(3)
            node = cluster.add_node(**RENDER_NODE)
    job.join()
    record = Path(spec.output, "_RUN.json")
    run_record = json.loads(record.read_text()) if record.exists() else {}
    report.update(notes=notes, events=run_record.get("events", {}))
    report.update(
        stopped={
            "committed": read_metadata(spec.output).num_rows,
            "success": Path(spec.output, "_SUCCESS").exists(),
        }
    )
    # The same command, once the cluster has render nodes again: two, one actor each.
    committed = set(rows(spec.output))
    fresh = [cluster.add_node(**HALF_NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    again = run_job(spec, address=cluster.address)
    report.update(resumed={"done": again.done, "skipped": again.skipped, "failed": again.failed})
    report.update(
        fresh=[n.node_id for n in fresh],
        resumed_on=sorted(
            {node for key, node in rows(spec.output).items() if key not in committed}
        ),
    )
    import ray

    ray.shutdown()  # disconnect first: Cluster refuses to remove the driver's node
    cluster.shutdown()
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

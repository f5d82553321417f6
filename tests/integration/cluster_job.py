"""Run a job on a local multi-node Ray cluster (head + 2 worker nodes); print JSON.

Used by test_cluster.py in a subprocess, so its Ray cluster never meets the test
session's own Ray. Usage: python cluster_job.py JOB.yaml
"""

import json
import sys

from ray.cluster_utils import Cluster

from sdbatch.runner import read_metadata, run_job
from sdbatch.spec import load_spec


def main(spec_path: str) -> None:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    workers = [cluster.add_node(num_cpus=1, resources={"render_node": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        spec = load_spec(spec_path)
        result = run_job(spec, address=cluster.address)
        meta = read_metadata(spec.output).to_pandas()
        print(
            "RESULT "
            + json.dumps(
                {
                    "done": result.done,
                    "head": cluster.head_node.node_id,
                    "workers": [w.node_id for w in workers],
                    "rendered_on": sorted(set(meta["worker"].str.split(":").str[1])),
                }
            )
        )
    finally:
        import ray

        ray.shutdown()  # disconnect first: Cluster refuses to remove the driver's node
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])

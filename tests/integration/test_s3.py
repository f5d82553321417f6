"""Jobs on S3 end to end, against moto's HTTP server (and a fault-injecting proxy).

Ray workers are separate processes: they reach the server over HTTP through the spec's
`storage.endpoint_url`, with the fake credentials the test session put in the
environment before Ray started.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from sdbatch.errors import StoreError, UserError
from sdbatch.plan import image_key
from sdbatch.runner import read_metadata, run_job
from sdbatch.spec import load_spec
from sdbatch.write import METADATA_SCHEMA
from tests.helpers import prompts, write_spec
from tests.s3server import FAKE_KEY_ID, FAKE_SECRET, REGION, FaultPlan, FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def manifest_rows() -> list[dict]:
    rows = prompts(8) + [{"id": "a/b", "prompt": "path-like"}, {"id": "ünï ✨", "prompt": "uni"}]
    for i, row in enumerate(rows):
        row["num_images"] = {0: 3, 1: 2}.get(i, 1)
    return rows  # 13 items


ROWS = manifest_rows()
EXPECTED = {(r["id"], k) for r in ROWS for k in range(r.get("num_images", 1))}
EXPECTED_KEYS = {image_key(i, k) for i, k in EXPECTED}


def make_spec(tmp: Path, tiny_models, manifest: str, output: str, storage: dict, name: str):
    path = write_spec(
        tmp / f"{name}.yaml",
        name=name,
        manifest=manifest,
        output=output,
        model=str(tiny_models["base"]),
        defaults={"steps": 2},
        storage=storage,
    )
    return load_spec(path)


def secret_free(text: str) -> bool:
    return FAKE_SECRET not in text and FAKE_KEY_ID not in text


@pytest.fixture(scope="module")
def s3_job(tmp_path_factory, tiny_models, ray_session, s3_server):
    """A manifest on S3 and one fault-free job writing to s3://bucket/clean/."""
    tmp = tmp_path_factory.mktemp("s3job")
    bucket = s3_server.bucket("sdbatch")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    s3_server.client.put_object(Bucket=bucket, Key="jobs/prompts.parquet", Body=buf.getvalue())
    manifest = f"s3://{bucket}/jobs/prompts.parquet"
    spec = make_spec(
        tmp, tiny_models, manifest, f"s3://{bucket}/clean/", s3_server.storage(), "clean"
    )
    result = run_job(spec)
    return dict(tmp=tmp, bucket=bucket, manifest=manifest, spec=spec, result=result)


def differences(a: dict[str, bytes], b: dict[str, bytes]) -> str:
    """Which images differ, and whether in pixels or in the embedded text."""
    import numpy as np
    from PIL import Image

    lines = []
    for key in sorted(k for k in a if a[k] != b.get(k)):
        with Image.open(io.BytesIO(a[key])) as x, Image.open(io.BytesIO(b[key])) as y:
            pixels = np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max()
            text = {k for k in x.text if x.text[k] != y.text.get(k)}
        lines.append(f"{key}: max pixel diff {pixels}, text chunks differing {sorted(text)}")
    return "\n".join(lines)


def images(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = s3_server.keys(bucket, f"{prefix}/images/")
    return {k.removeprefix(f"{prefix}/"): s3_server.get(bucket, k) for k in keys}


def test_job_reads_manifest_and_writes_everything_to_s3(s3_job, s3_server, ray_session) -> None:
    bucket, spec, result = s3_job["bucket"], s3_job["spec"], s3_job["result"]
    assert (result.done, result.failed, result.total) == (len(EXPECTED), 0, len(EXPECTED))
    assert result.output == f"s3://{bucket}/clean"

    # Exactly one object per item, under the deterministic keys, typed as PNG.
    objects = images(s3_server, bucket, "clean")
    assert set(objects) == EXPECTED_KEYS
    head = s3_server.client.head_object(Bucket=bucket, Key=f"clean/{next(iter(EXPECTED_KEYS))}")
    assert head["ContentType"] == "image/png"
    top = {k.split("/")[1] for k in s3_server.keys(bucket, "clean/")}
    assert {"images", "metadata", "job.yaml", "_SUCCESS"} <= top, top
    assert "failures" not in top and "_sdbatch_write_probe" not in top, top

    # Metadata on S3 points at the objects and hashes them.
    meta = read_metadata(spec.output, spec.storage.model_dump()).to_pandas()
    assert set(zip(meta["id"], meta["image_index"], strict=True)) == EXPECTED
    assert not meta.duplicated(["id", "image_index"]).any()
    for row in meta.itertuples():
        assert row.image_uri == f"s3://{bucket}/clean/{row.key}"
        assert hashlib.sha256(objects[row.key]).hexdigest() == row.sha256

    # Readable by other tools: pyarrow's own S3 filesystem and pandas.
    fs = pafs.S3FileSystem(
        access_key=FAKE_KEY_ID,
        secret_key=FAKE_SECRET,
        endpoint_override=s3_server.endpoint_url.removeprefix("http://"),  # path-style
        scheme="http",
        region=REGION,
    )
    table = pq.read_table(f"{bucket}/clean/metadata/", filesystem=fs)  # pyarrow: no s3://
    assert table.num_rows == len(EXPECTED)
    assert set(METADATA_SCHEMA.names) <= set(table.column_names)
    endpoint = s3_server.endpoint_url.removeprefix("http://")
    uri = f"s3://{bucket}/clean/metadata/?endpoint_override={endpoint}&scheme=http"
    assert pq.read_table(uri).num_rows == len(EXPECTED)
    df = pd.read_parquet(f"{bucket}/clean/metadata/", filesystem=fs)
    assert set(df["sha256"]) == set(meta["sha256"])

    # Credentials appear nowhere: job.yaml, _SUCCESS, metadata, Ray's logs.
    job_yaml = s3_server.get(bucket, "clean/job.yaml").decode()
    assert "endpoint_url" in job_yaml and secret_free(job_yaml)
    success = s3_server.get(bucket, "clean/_SUCCESS").decode()
    assert json.loads(success)["done"] == len(EXPECTED) and secret_free(success)
    assert secret_free(meta.astype(str).to_csv())
    session = ray_session._private.worker._global_node.get_session_dir_path()
    leaks = subprocess.run(["grep", "-rlF", FAKE_SECRET, session], capture_output=True, text=True)
    assert leaks.stdout == "", f"secret found in Ray logs: {leaks.stdout}"

    # Running the finished job again renders nothing and writes no new metadata.
    parts = s3_server.keys(bucket, "clean/metadata/")
    again = run_job(spec)
    assert (again.done, again.skipped) == (0, len(EXPECTED))
    assert s3_server.keys(bucket, "clean/metadata/") == parts


def test_job_through_20_percent_faults_matches_clean_run(s3_job, s3_server, tiny_models) -> None:
    bucket = s3_job["bucket"]
    # Every request of the job (manifest reads included) may fail: 503 SlowDown, 500,
    # a dropped connection, or a dropped response after S3 applied the request.
    plan = FaultPlan(rate=0.2, seed=11)
    with FaultProxy(s3_server.port, plan) as proxy:
        spec = make_spec(
            s3_job["tmp"],
            tiny_models,
            s3_job["manifest"],
            f"s3://{bucket}/faulty/",
            s3_server.storage(proxy.endpoint_url),
            "faulty",
        )
        result = run_job(spec)
    assert (result.done, result.failed) == (len(EXPECTED), 0)
    assert {"503", "500", "drop", "drop_after"} <= set(plan.counts), plan.counts

    clean, faulty = images(s3_server, bucket, "clean"), images(s3_server, bucket, "faulty")
    assert set(faulty) == EXPECTED_KEYS  # every image exactly once
    assert faulty == clean, differences(clean, faulty)  # byte for byte
    meta = read_metadata(spec.output, s3_server.storage()).to_pandas()
    assert len(meta) == len(EXPECTED) and not meta.duplicated(["id", "image_index"]).any()


def test_failing_output_bucket_stops_the_job_with_a_clear_error(
    s3_job, s3_server, tiny_models
) -> None:
    out = s3_server.bucket("out")

    def spec_for(endpoint: str, name: str):
        storage = s3_server.storage(endpoint, max_attempts=2)
        return make_spec(
            s3_job["tmp"], tiny_models, s3_job["manifest"], f"s3://{out}/{name}", storage, name
        )

    # 1. The output bucket refuses everything: caught before any model loads.
    with FaultProxy(s3_server.port, FaultPlan(rate=1.0, faults=("503",), bucket=out)) as proxy:
        with pytest.raises(StoreError) as err:
            run_job(spec_for(proxy.endpoint_url, "down"))
    message = str(err.value)
    assert message.startswith(f"s3://{out}/down: output is not writable: the endpoint kept failing")
    assert secret_free(message)

    # 2. It fails only once rendering is under way (every image PUT): the job stops with
    # an error naming the object, and no item is recorded as done.
    plan = FaultPlan(rate=1.0, faults=("503", "500", "drop"), bucket=out, path_contains="/images/")
    with FaultProxy(s3_server.port, plan) as proxy:
        with pytest.raises((StoreError, UserError)) as err:
            run_job(spec_for(proxy.endpoint_url, "late"))
    message = str(err.value)
    assert f"s3://{out}/late/images/" in message and "cannot write" in message, message
    assert secret_free(message)
    top = {k.split("/")[1] for k in s3_server.keys(out, "late/")}
    assert "job.yaml" in top, top
    assert not top & {"images", "metadata", "_SUCCESS"}, top  # nothing recorded as done
    assert read_metadata(f"s3://{out}/late", s3_server.storage()).num_rows == 0

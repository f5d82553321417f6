"""The one storage interface: LocalStore and S3Store (against moto over HTTP) agree.

No Ray here. The S3 side talks to a real HTTP endpoint (moto's server, and a
fault-injecting proxy in front of it for the error cases); boto3 is never mocked.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from sdbatch.errors import StoreError, UserError
from sdbatch.manifest import iter_rows, validate_manifest
from sdbatch.spec import StorageSpec, parse_spec
from sdbatch.store import PROBE_KEY, LocalStore, S3Store, describe_error, open_store, read_uri
from tests.s3server import FAKE_KEY_ID, FAKE_SECRET, FaultPlan, FaultProxy, free_port


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path, s3_server):
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    return open_store(f"s3://{s3_server.bucket()}/root/", s3_server.storage())


def sibling(store, name: str):
    """A store next to `store` whose root name starts with the same letters."""
    if isinstance(store, S3Store):
        return open_store(f"s3://{store.bucket}/{name}", store.options.model_dump())
    return open_store(str(Path(store.uri).parent / name))


def assert_clean(message: str) -> None:
    assert FAKE_SECRET not in message
    assert FAKE_KEY_ID not in message


# ---------------------------------------------------------------- same behaviour


def test_stores_are_what_open_store_says(tmp_path: Path, s3_server) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/a/b/", s3_server.storage())
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri) == ("bucket", "a/b", "s3://bucket/a/b")
    assert open_store("s3://bucket").uri == "s3://bucket"
    with pytest.raises(StoreError, match="gs://x/y: unsupported storage scheme 'gs'"):
        open_store("gs://x/y")
    with pytest.raises(StoreError, match="needs a bucket"):
        open_store("s3:///prefix")


def test_write_read_overwrite(store) -> None:
    store.write_bytes("images/ab/x.png", b"first", content_type="image/png")
    assert store.read_bytes("images/ab/x.png") == b"first"
    # Deterministic keys: a rerun overwrites the same key; one object remains.
    store.write_bytes("images/ab/x.png", b"second", content_type="image/png")
    assert store.read_bytes("images/ab/x.png") == b"second"
    assert list(store.list("images")) == ["images/ab/x.png"]
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""


def test_missing_object_is_file_not_found_naming_the_uri(store) -> None:
    for call in (store.read_bytes, store.open_input):
        with pytest.raises(FileNotFoundError) as err:
            call("nope/missing.bin")
        assert store.uri_of("nope/missing.bin") in str(err.value)


def test_exists_and_delete(store) -> None:
    assert not store.exists("a/b.txt")
    store.write_bytes("a/b.txt", b"x")
    assert store.exists("a/b.txt")
    assert not store.exists("a")  # a folder / common prefix is not an object
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    store.delete("a/b.txt")  # deleting what is gone is fine


def test_list_has_folder_semantics(store) -> None:
    for key in ("metadata/p-1.parquet", "metadata/p-2.parquet", "metadata-old/x", "job.yaml"):
        store.write_bytes(key, b"x")
    sibling(store, "root-other").write_bytes("metadata/p-9.parquet", b"x")
    expected = {"metadata/p-1.parquet", "metadata/p-2.parquet"}
    assert set(store.list("metadata/")) == expected
    assert set(store.list("metadata")) == expected
    assert list(store.list("meta")) == []
    assert list(store.list("job.yaml")) == ["job.yaml"]
    assert list(store.list("nothing/here")) == []
    assert set(store.list()) == expected | {"metadata-old/x", "job.yaml"}


def test_uri_of(store, tmp_path: Path) -> None:
    if isinstance(store, S3Store):
        assert store.uri_of("images/ab/c.png") == f"s3://{store.bucket}/root/images/ab/c.png"
    else:
        assert store.uri_of("images/ab/c.png") == str(tmp_path.resolve() / "root/images/ab/c.png")
    assert store.uri_of("a/./b") == store.uri_of("a/b")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "", "."])
def test_keys_cannot_escape_the_root(store, key: str) -> None:
    for call in (
        lambda: store.write_bytes(key, b"x"),
        lambda: store.read_bytes(key),
        lambda: store.open_input(key),
        lambda: store.uri_of(key),
    ):
        with pytest.raises(StoreError) as err:
            call()
        assert store.uri in str(err.value)
    if key not in ("", "."):
        with pytest.raises(StoreError):
            list(store.list(key))
    store.write_bytes("a/../b", b"inside")  # normalised, and still inside
    assert store.read_bytes("b") == b"inside"


def test_open_input_is_seekable_and_reads_parquet(store) -> None:
    table = pa.table({"id": [f"id-{i}" for i in range(5000)], "n": list(range(5000))})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=1000)
    data = buf.getvalue()
    store.write_bytes("m.parquet", data)
    with store.open_input("m.parquet") as f:
        assert f.seekable()
        f.seek(-4, io.SEEK_END)
        assert f.read() == b"PAR1"
        f.seek(10)
        assert f.read(5) == data[10:15]
        assert f.tell() == 15
        assert f.read(0) == b""
        f.seek(len(data) + 10)
        assert f.read(3) == b""
    with store.open_input("m.parquet") as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == 5
        assert pf.read().equals(table)


def test_check_writable_leaves_nothing_behind(store) -> None:
    store.check_writable()
    assert not store.exists(PROBE_KEY)
    assert list(store.list()) == []


def test_read_uri(store) -> None:
    store.write_bytes("inputs/cat.png", b"png bytes")
    options = store.options.model_dump() if isinstance(store, S3Store) else None
    assert read_uri(store.uri_of("inputs/cat.png"), options) == b"png bytes"


# ---------------------------------------------------------------- S3 specifics


def test_s3_puts_carry_content_type_and_land_under_the_prefix(s3_server) -> None:
    bucket = s3_server.bucket()
    store = open_store(f"s3://{bucket}/out", s3_server.storage())
    store.write_bytes("images/ab/c.png", b"\x89PNG...", content_type="image/png")
    store.write_bytes("blob", b"x")
    assert s3_server.keys(bucket) == ["out/blob", "out/images/ab/c.png"]
    head = s3_server.client.head_object(Bucket=bucket, Key="out/images/ab/c.png")
    assert head["ContentType"] == "image/png"
    assert s3_server.client.head_object(Bucket=bucket, Key="out/blob")["ContentType"] == (
        "application/octet-stream"
    )


def test_s3_store_pickles_without_client_or_secrets(s3_server) -> None:
    store = open_store(f"s3://{s3_server.bucket()}/out", s3_server.storage())
    store.write_bytes("x", b"x")
    payload = pickle.dumps(store)
    assert FAKE_SECRET.encode() not in payload and b"botocore" not in payload
    again = pickle.loads(payload)
    assert again.read_bytes("x") == b"x"
    # One client per process and options, reused by every store with those options.
    assert again.client is store.client
    other = open_store(store.uri, s3_server.storage(max_attempts=3))
    assert other.client is not store.client


def test_reads_survive_dropped_connections_and_5xx(s3_server) -> None:
    bucket = s3_server.bucket()
    direct = open_store(f"s3://{bucket}/in", s3_server.storage())
    table = pa.table({"n": list(range(20000))})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2000)
    direct.write_bytes("m.parquet", buf.getvalue())
    plan = FaultPlan(rate=0.3, seed=3)
    with FaultProxy(s3_server.port, plan) as proxy:
        store = open_store(direct.uri, s3_server.storage(proxy.endpoint_url))
        with store.open_input("m.parquet") as f:
            assert pq.read_table(f).equals(table)
        for i in range(30):
            store.write_bytes(f"k{i}", bytes([i]) * 100)
        assert sorted(store.list()) == sorted(["m.parquet", *(f"k{i}" for i in range(30))])
    assert {"503", "500", "drop", "drop_after"} <= set(plan.counts), plan.counts
    assert [direct.read_bytes(f"k{i}") for i in range(30)] == [bytes([i]) * 100 for i in range(30)]


def test_manifest_on_s3(s3_server, tmp_path: Path) -> None:
    bucket = s3_server.bucket()
    rows = [{"id": f"r{i}", "prompt": f"p {i}", "num_images": 2} for i in range(3)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    s3_server.client.put_object(Bucket=bucket, Key="jobs/m.parquet", Body=buf.getvalue())
    spec = parse_spec(
        {
            "name": "s3",
            "manifest": f"s3://{bucket}/jobs/m.parquet",
            "output": f"s3://{bucket}/out",
            "model": str(tmp_path),
            "storage": s3_server.storage(),
        }
    )
    info = validate_manifest(spec.manifest, spec)
    assert (info.num_rows, info.total_items) == (3, 6)
    assert [r["id"] for r in iter_rows(spec.manifest, ["id"], spec.storage.model_dump())] == [
        "r0",
        "r1",
        "r2",
    ]
    missing = spec.model_copy(update={"manifest": f"s3://{bucket}/jobs/none.parquet"})
    with pytest.raises(UserError, match=r"none\.parquet: manifest not found"):
        validate_manifest(missing.manifest, missing)


# ---------------------------------------------------------------- clear errors


def check_error(store, *fragments: str) -> str:
    with pytest.raises(StoreError) as err:
        store.check_writable()
    message = str(err.value)
    assert message.startswith(f"{store.uri}: output is not writable: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert_clean(message)
    return message


def test_error_bucket_does_not_exist(s3_server) -> None:
    store = open_store("s3://no-such-bucket-sdbatch/out", s3_server.storage())
    check_error(store, "bucket 'no-such-bucket-sdbatch' does not exist", s3_server.endpoint_url)


def test_error_no_credentials(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    store = open_store(f"s3://{s3_server.bucket()}/out", s3_server.storage())
    check_error(store, "no AWS credentials found")


def test_error_unknown_profile(s3_server) -> None:
    store = open_store(f"s3://{s3_server.bucket()}/out", s3_server.storage(profile="nope"))
    check_error(store, "AWS profile 'nope' not found")


def test_error_endpoint_unreachable(s3_server) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = open_store("s3://bucket/out", s3_server.storage(endpoint, max_attempts=2))
    check_error(store, f"endpoint {endpoint} is unreachable after 2 attempts")


def test_error_access_denied_from_the_wire(s3_server) -> None:
    bucket = s3_server.bucket()
    with FaultProxy(s3_server.port, FaultPlan(rate=1.0, faults=("403",))) as proxy:
        store = open_store(f"s3://{bucket}/out", s3_server.storage(proxy.endpoint_url))
        check_error(store, f"access denied to bucket {bucket!r}")
        with pytest.raises(StoreError, match=r"/out/k: cannot read: access denied"):
            store.read_bytes("k")


def test_error_endpoint_keeps_failing(s3_server) -> None:
    bucket = s3_server.bucket()
    plan = FaultPlan(rate=1.0, faults=("503",), bucket=bucket)
    with FaultProxy(s3_server.port, plan) as proxy:
        store = open_store(
            f"s3://{bucket}/out", s3_server.storage(proxy.endpoint_url, max_attempts=3)
        )
        check_error(
            store, "kept failing (SlowDown: Please reduce your request rate.) after 3 attempts"
        )
    assert plan.counts["503"] == 3  # botocore retried, then gave up


def client_error(code: str, message: str = "", status: int = 400, **extra) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": message, **extra},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}},
    }
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            client_error("NoSuchBucket", "The specified bucket does not exist", 404),
            "does not exist",
        ),
        (client_error("AccessDenied", "Access Denied", 403), "access denied to bucket 'bkt'"),
        (client_error("403", "Forbidden", 403), "access denied to bucket 'bkt'"),  # HEAD: no body
        (client_error("AllAccessDisabled", "", 403), "access denied"),
        (client_error("InvalidAccessKeyId", "", 403), "access key ID is not known"),
        (client_error("SignatureDoesNotMatch", "", 403), "wrong secret access key?"),
        (client_error("ExpiredToken", "", 400), "session token has expired"),
        (
            client_error("PermanentRedirect", "", 301, Region="eu-west-1"),
            "in another region (eu-west-1); set storage.region",
        ),
        (client_error("SlowDown", "Please reduce", 503), "kept failing (SlowDown: Please reduce)"),
        (client_error("PreconditionFailed", "", 412), "changed while it was being read"),
        (client_error("TeapotError", "short and stout", 418), "TeapotError (HTTP 418): short and"),
        (NoCredentialsError(), "no AWS credentials found"),
        (EndpointConnectionError(endpoint_url="http://h:1/x"), "is unreachable after 10 attempts"),
    ],
)
def test_error_classification(error: Exception, expected: str) -> None:
    text = describe_error(error, "bkt", StorageSpec(endpoint_url="https://user:pw@minio.lan:9000"))
    assert expected in text
    assert "pw@" not in text and "user:" not in text


def test_credentials_are_scrubbed_from_messages() -> None:
    echoed = client_error("SignatureDoesNotMatch", "", 403)
    odd = client_error("Weird", f"server echoed {FAKE_SECRET} and {FAKE_KEY_ID}", 400)
    for error in (echoed, odd, RuntimeError(f"boom {FAKE_SECRET}")):
        text = describe_error(error, "bkt")
        assert_clean(text)
    assert "***" in describe_error(odd, "bkt")


def test_s3_object_replaced_mid_read_fails_loudly(s3_server) -> None:
    store = open_store(f"s3://{s3_server.bucket()}/in", s3_server.storage())
    store.write_bytes("m.bin", b"a" * 3_000_000)
    with store.open_input("m.bin") as f:
        assert f.read(10) == b"a" * 10
        store.write_bytes("m.bin", b"b" * 3_000_000)
        f.seek(2_500_000)
        with pytest.raises(StoreError, match=r"/in/m\.bin: cannot read: the object changed"):
            f.read(10)

"""One writer per output: the lease's store primitives and rules, locally and on S3."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest

from sdbatch.errors import UserError
from sdbatch.lease import LEASE_KEY, Lease, live_lease, read
from sdbatch.store import LocalStore, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    server = request.getfixturevalue("s3_server")
    return open_store(f"s3://{server.bucket('lease')}/out", server.storage())


def test_exclusive_create_and_compare_and_swap(store) -> None:
    assert store.create_exclusive("k.json", b"first")
    assert not store.create_exclusive("k.json", b"second")
    assert store.read_bytes("k.json") == b"first"
    assert store.replace_if("k.json", b"third", expected=b"first")
    assert not store.replace_if("k.json", b"fourth", expected=b"first")  # stale expectation
    assert store.read_bytes("k.json") == b"third"
    assert not store.replace_if("missing.json", b"x", expected=b"y")


def test_second_run_is_refused_naming_the_holder(store) -> None:
    first = Lease(store, "run-A", 60).acquire()
    try:
        with pytest.raises(UserError) as info:
            Lease(store, "run-B", 60).acquire()
        message = str(info.value)
        assert "another sdbatch run is writing this output: run run-A on" in message
        assert "last heartbeat" in message and "--break-lease" in message
        assert live_lease(store)["run_id"] == "run-A"
    finally:
        first.release()
    assert read(store) == (None, None)  # released: the next run takes it at once
    Lease(store, "run-C", 60).acquire().release()


def test_stale_lease_is_taken_over_once(store) -> None:
    old = datetime.now(timezone.utc) - timedelta(hours=1)
    stale = {"run_id": "dead", "token": "t", "host": "h", "pid": 1, "heartbeat_at": old.isoformat()}
    data = json.dumps(stale).encode()
    store.write_bytes(LEASE_KEY, data)
    assert live_lease(store) is None
    taker = Lease(store, "run-B", 60).acquire()
    try:
        assert taker.took_over["run_id"] == "dead"
        # A second driver that read the same stale lease cannot also win it.
        assert not store.replace_if(LEASE_KEY, b"{}", expected=data)
    finally:
        taker.release()


def test_a_run_that_lost_its_lease_stops_committing(store) -> None:
    first = Lease(store, "run-A", 60).acquire()
    second = Lease(store, "run-B", 60).acquire(break_lease=True)  # someone broke it
    try:
        with pytest.raises(UserError, match="this run lost its lease on the output to run run-B"):
            first.check()
        second.check()
    finally:
        first.release()  # must not delete the new holder's lease
        assert read(store)[0]["run_id"] == "run-B"
        second.release()


def test_heartbeat_is_renewed(tmp_path) -> None:
    store = LocalStore(tmp_path / "out")
    lease = Lease(store, "run-A", 1.5).acquire()  # beats every 0.5 s
    try:
        first = read(store)[0]["heartbeat_at"]
        deadline = time.monotonic() + 10
        while read(store)[0]["heartbeat_at"] == first and time.monotonic() < deadline:
            time.sleep(0.2)
        assert read(store)[0]["heartbeat_at"] != first
        lease.check()
    finally:
        lease.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path) -> None:
    import socket
    import subprocess
    import sys

    store = LocalStore(tmp_path / "out")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    record = {"run_id": "killed", "token": "t", "host": socket.gethostname(), "pid": int(gone),
              "heartbeat_at": datetime.now(timezone.utc).isoformat()}  # fmt: skip
    store.write_bytes(LEASE_KEY, json.dumps(record).encode())
    lease = Lease(store, "run-B", 60).acquire()
    assert lease.took_over["run_id"] == "killed"
    lease.release()

"""One writer per output: a lease in `OUTPUT/_LEASE.json`, taken before planning.

Two `sdbatch run` of one job on one output (a resubmitted job, a retried RayJob, two
people) would each plan the same remaining items and commit them twice. A run
therefore takes the lease first:

- free output: an exclusive create (local: `O_CREAT | O_EXCL`; S3: a conditional put,
  `If-None-Match: *`, which AWS S3, MinIO, R2 and moto honour);
- held, with a heartbeat younger than `execution.lease_seconds`: refused, naming the
  holder (run, host, pid) and the heartbeat's age;
- held but stale (its heartbeat is older, or its driver ran on this host and its
  process is gone: a killed driver restarted on the same machine): taken over by a
  compare-and-swap on the stale content (local: under a lock file; S3: `If-Match: <ETag>`), so two
  drivers racing for one stale lease cannot both win; the takeover is reported.

While it runs, the holder renews the heartbeat every third of `lease_seconds` by the
same compare-and-swap, and checks before every metadata commit that the lease is still
its own (`check`); a driver that lost it stops before committing anything more. Where
an S3 endpoint does not implement conditional writes, the write is followed by a read
back: the later writer wins and the other one sees a foreign token at its next check.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import UserError
from .store import Store

LEASE_KEY = "_LEASE.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _age(record: dict[str, Any]) -> float:
    try:
        beat = datetime.fromisoformat(record["heartbeat_at"])
    except (KeyError, TypeError, ValueError):
        return float("inf")
    return (datetime.now(timezone.utc) - beat).total_seconds()


def describe(record: dict[str, Any]) -> str:
    return (
        f"run {record.get('run_id', '?')} on {record.get('host', '?')} "
        f"(pid {record.get('pid', '?')}, started {record.get('started_at', '?')}), "
        f"last heartbeat {_age(record):.0f} s ago"
    )


def read(store: Store) -> tuple[dict[str, Any] | None, bytes | None]:
    """(the lease record, its exact bytes) or (None, None) if the output has none."""
    try:
        data = store.read_bytes(LEASE_KEY)
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(data)
    except ValueError:
        record = {}
    return (record if isinstance(record, dict) else {}), data


def _holder_is_gone(record: dict[str, Any]) -> bool:
    """True if the holder ran on this host and its process no longer exists (a killed
    driver restarted on the same machine need not wait for its old lease to expire)."""
    if record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record.get("pid") or 0), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return int(record.get("pid") or 0) <= 0


@dataclass
class Lease:
    store: Store
    run_id: str
    seconds: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    took_over: dict[str, Any] | None = None  # the stale holder's record, if taken over
    _bytes: bytes = b""
    _lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _record(self, started_at: str | None = None) -> bytes:
        record = {
            "run_id": self.run_id,
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": started_at or _now(),
            "heartbeat_at": _now(),
            "lease_seconds": self.seconds,
        }
        return json.dumps(record, indent=1).encode()

    # ------------------------------------------------------------ taking and keeping

    def acquire(self, break_lease: bool = False) -> Lease:
        if break_lease:
            self.store.delete(LEASE_KEY)
        data = self._record()
        if self.store.create_exclusive(LEASE_KEY, data):
            return self._held(data)
        record, current = read(self.store)
        if record is None:  # released between our create and our read: try once more
            if self.store.create_exclusive(LEASE_KEY, data):
                return self._held(data)
            record, current = read(self.store)
        assert record is not None and current is not None
        if _age(record) <= self.seconds and not _holder_is_gone(record):
            raise UserError(
                f"{self.store.uri}: another sdbatch run is writing this output: "
                f"{describe(record)}. Wait for it, or if that run is gone, wait "
                f"{max(0.0, self.seconds - _age(record)):.0f} s for its lease "
                f"(execution.lease_seconds={self.seconds:g}) to expire, or use "
                "`sdbatch run --break-lease`"
            )
        if not self.store.replace_if(LEASE_KEY, data, expected=current):
            record, _ = read(self.store)
            raise UserError(
                f"{self.store.uri}: another sdbatch run took over this output's stale lease "
                f"first: {describe(record or {})}"
            )
        self.took_over = record
        return self._held(data)

    def _held(self, data: bytes) -> Lease:
        self._bytes = data
        self._verify()
        self._thread = threading.Thread(target=self._beat, name="sdbatch-lease", daemon=True)
        self._thread.start()
        return self

    def _verify(self) -> None:
        record, _ = read(self.store)
        if not record or record.get("token") != self.token:
            self._lost = (
                f"{self.store.uri}: this run lost its lease on the output to "
                f"{describe(record) if record else 'nobody (the lease was deleted)'}; "
                "stopping before committing anything more (what is committed stays)"
            )

    def _beat(self) -> None:
        interval = max(0.5, self.seconds / 3)
        while not self._stop.wait(interval):
            started = json.loads(self._bytes).get("started_at")
            data = self._record(started_at=started)
            try:
                if self.store.replace_if(LEASE_KEY, data, expected=self._bytes):
                    self._bytes = data
                else:
                    self._verify()
            except Exception:  # noqa: BLE001 - a store hiccup: the next beat retries
                continue
            if self._lost:
                return

    def check(self) -> None:
        """Raise UserError if another run holds the lease now (call before committing)."""
        if self._lost is None:
            self._verify()
        if self._lost:
            raise UserError(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lost is None:
            try:
                record, _ = read(self.store)
                if record and record.get("token") == self.token:
                    self.store.delete(LEASE_KEY)
            except Exception:  # noqa: BLE001 - an unreleased lease just expires
                pass


def live_lease(store: Store, seconds: float | None = None) -> dict[str, Any] | None:
    """The record of a lease whose heartbeat is fresh (for `status`), else None."""
    record, _ = read(store)
    if not record:
        return None
    limit = seconds if seconds is not None else float(record.get("lease_seconds") or 120)
    return {**record, "age_seconds": _age(record)} if _age(record) <= limit else None

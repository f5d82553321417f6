"""A real S3 endpoint for tests: moto's HTTP server, plus a fault-injecting proxy.

Both listen on 127.0.0.1 on free ports, so Ray workers (separate processes) reach them
over HTTP like any S3 endpoint. The proxy forwards path-style requests to moto and, for a
configurable fraction of them (optionally only for one bucket or key fragment), answers
`503 SlowDown`, `500 InternalError`, `403 AccessDenied` or drops the connection, either
before forwarding or after moto has applied the request (the response is lost).
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# Recognisable fake credentials: tests assert the secret never shows up anywhere.
FAKE_KEY_ID = "AKIASDBATCHTESTKEY01"
FAKE_SECRET = "sdbatch-FAKE-secret-6f1d2c9e-never-print-me"
REGION = "us-east-1"


def use_fake_aws_env() -> None:
    """Fake credentials and no AWS config files, IMDS off: tests never reach real AWS.

    Must run before Ray starts: local Ray workers inherit the driver's environment.
    """
    os.environ["AWS_ACCESS_KEY_ID"] = FAKE_KEY_ID
    os.environ["AWS_SECRET_ACCESS_KEY"] = FAKE_SECRET
    os.environ["AWS_DEFAULT_REGION"] = REGION
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 on 127.0.0.1:<free port>; `bucket()` makes a fresh bucket.

    In a thread of this process by default (starts in milliseconds); `process=True` runs
    `moto.server` as a child process instead, so that benchmarks don't measure a server
    sharing the client's GIL.
    """

    def __init__(self, process: bool = False) -> None:
        self._server: Any = None
        self._process: subprocess.Popen | None = None
        if process:
            self.port = free_port()
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait_for_port(self.port, self._process)
        else:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._server.start()
            self.port = self._server.get_host_and_port()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._client: Any = None

    @property
    def client(self) -> Any:
        """A plain boto3 client straight to moto (no sdbatch code in between)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=REGION,
                config=Config(s3={"addressing_style": "path"}),
            )
        return self._client

    def bucket(self, prefix: str = "b") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def storage(self, endpoint_url: str | None = None, **extra: Any) -> dict[str, Any]:
        """The spec's `storage:` section for this server (or a proxy in front of it)."""
        return {
            "endpoint_url": endpoint_url or self.endpoint_url,
            "addressing_style": "path",
            "region": REGION,
            **extra,
        }

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        return [
            obj["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", ())
        ]

    def get(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto.server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # polling a port we started, not synchronising work
    process.terminate()
    raise RuntimeError(f"moto.server did not listen on 127.0.0.1:{port} within {timeout} s")


_ERROR_BODIES = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
}
FAULTS = ("503", "500", "drop", "drop_after")


@dataclass
class FaultPlan:
    """Which requests fail and how. `rate` of the matching requests get a fault drawn
    from `faults` (seeded); `bucket`/`path_contains` narrow what matches."""

    rate: float = 0.0
    faults: tuple[str, ...] = FAULTS
    bucket: str | None = None
    path_contains: str | None = None
    seed: int = 0
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self, path: str) -> str | None:
        parts = urlsplit(path).path.lstrip("/").split("/", 1)
        with self._lock:
            self.counts["requests"] += 1
            if self.bucket is not None and parts[0] != self.bucket:
                return None
            if self.path_contains is not None and self.path_contains not in path:
                return None
            if self._rng.random() >= self.rate:
                return None
            fault = self._rng.choice(self.faults)
            self.counts[fault] += 1
            return fault


_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for botocore's PUTs
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _error(self, status: int) -> None:
        code, message = _ERROR_BODIES[status]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            conn.close()

    def _handle(self) -> None:
        body = self._body()
        fault = self.server.plan.draw(self.path)
        if fault == "drop":
            return self._drop()
        if fault in ("503", "500", "403"):
            return self._error(int(fault))
        status, reason, headers, data = self._forward(body)
        if fault == "drop_after":  # moto applied the request; the client never hears
            return self._drop()
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        length = dict((k.lower(), v) for k, v in headers).get("content-length")
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    target_port: int
    plan: FaultPlan


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `target_port` that injects `plan`'s faults."""

    def __init__(self, target_port: int, plan: FaultPlan | None = None):
        self._server = _ProxyServer(("127.0.0.1", 0), _Handler)
        self._server.target_port = target_port
        self._server.plan = plan or FaultPlan()
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def plan(self) -> FaultPlan:
        return self._server.plan

    @plan.setter
    def plan(self, plan: FaultPlan) -> None:
        self._server.plan = plan

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

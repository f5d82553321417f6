"""S3 through boto3: one client per process and options, and what an S3 failure means.

`client` keeps one boto3 client per (process, storage options, AWS environment);
`describe_error` turns a botocore failure into one line naming the bucket, endpoint and
likely cause, with every credential value this process loaded scrubbed (`redact`).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from typing import Any
from urllib.parse import urlparse

from .spec import StorageSpec

_SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()
# Credential values this process has loaded; scrubbed from any text we produce.
_secrets: set[str] = set()


def client(options: StorageSpec) -> Any:
    """The boto3 S3 client for these options in this process (clients are thread-safe)."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    # The AWS environment is part of the key (hashed: it holds secrets), so a changed
    # environment gets a new client instead of stale credentials.
    env_hash = hashlib.sha256(repr(env).encode()).hexdigest()
    key = (os.getpid(), *options.model_dump().items(), env_hash)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = _make_client(options)
    return client


def _make_client(options: StorageSpec) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=options.profile)
    extra: dict[str, Any] = {}
    if options.endpoint_url:
        # boto3 >= 1.36 sends CRC32 checksum headers that several S3-compatible servers
        # reject; other endpoints get them only where the API requires one (our PUTs
        # carry Content-MD5 instead). An explicit AWS_* setting still wins.
        if "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ:
            extra["request_checksum_calculation"] = "when_required"
        if "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ:
            extra["response_checksum_validation"] = "when_required"
    config = Config(
        region_name=options.region,
        # total_max_attempts counts the first try, as storage.max_attempts does
        # (botocore's own "max_attempts" key counts retries only).
        retries={"total_max_attempts": options.max_attempts, "mode": options.retry_mode},
        s3={"addressing_style": options.addressing_style},
        max_pool_connections=32,
        # A blackholed endpoint should fail in tens of seconds, not 10 × botocore's 60 s.
        connect_timeout=10,
        user_agent_extra="sdbatch",
        **extra,
    )
    client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        _secrets.update(s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s)
    return client


MISSING_OBJECT = {"NoSuchKey", "404", "NotFound"}
ACCESS_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_BAD_KEY_ID = {"InvalidAccessKeyId"}
_BAD_SIGNATURE = {"SignatureDoesNotMatch"}
_BAD_TOKEN = {"ExpiredToken", "TokenRefreshRequired", "InvalidToken", "ExpiredTokenException"}
_WRONG_REGION = {"PermanentRedirect", "AuthorizationHeaderMalformed", "301", "400 Redirect"}
_CHANGED = {"PreconditionFailed", "412"}
_SERVER_TROUBLE = {"SlowDown", "ServiceUnavailable", "InternalError", "503", "500", "502", "504"}


def error_code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return None
    return str(response.get("Error", {}).get("Code") or "") or None


def is_stream_error(err: BaseException) -> bool:
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    return isinstance(err, (ResponseStreamingError, IncompleteReadError))


def redact(text: str) -> str:
    """`text` with every AWS credential value this process knows replaced by '***'."""
    secrets = set(_secrets)
    secrets.update(os.environ[n] for n in _SECRET_ENV_VARS if os.environ.get(n))
    # Real key ids and secrets are 16+ characters; shorter test values such as "testing"
    # would only mangle ordinary words.
    for secret in sorted((x for x in secrets if len(x) >= 8), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _endpoint(options: StorageSpec) -> str:
    if not options.endpoint_url:
        return "the AWS S3 endpoint"
    parsed = urlparse(options.endpoint_url)
    host = parsed.hostname or ""
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}"  # never the user:password part


def describe_error(err: BaseException, bucket: str, options: StorageSpec | None = None) -> str:
    """One line saying what went wrong talking to S3, without any credential value."""
    from botocore import exceptions as bx

    options = options or StorageSpec()
    attempts = f"after {options.max_attempts} attempt{'s' if options.max_attempts > 1 else ''}"
    code = error_code(err)
    if isinstance(err, bx.ClientError) or code:
        response = getattr(err, "response", {}) or {}
        error = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.get("Message") or ""
        if code == "NoSuchBucket":
            text = f"bucket {bucket!r} does not exist at {_endpoint(options)}"
        elif code in ACCESS_DENIED:
            text = (
                f"access denied to bucket {bucket!r} (the credentials in use lack "
                "permission; check the IAM and bucket policies)"
            )
        elif code in _BAD_KEY_ID:
            text = f"the access key ID is not known to {_endpoint(options)} (wrong credentials?)"
        elif code in _BAD_SIGNATURE:
            text = "the request signature does not match (wrong secret access key?)"
        elif code in _BAD_TOKEN:
            text = "the session token has expired or is invalid"
        elif code in _WRONG_REGION:
            region = error.get("Region") or response.get("ResponseMetadata", {}).get(
                "HTTPHeaders", {}
            ).get("x-amz-bucket-region")
            where = f" ({region})" if region else ""
            text = f"bucket {bucket!r} is in another region{where}; set storage.region"
        elif code in _CHANGED:
            text = "the object changed while it was being read; run again"
        elif code in _SERVER_TROUBLE:
            text = (
                f"the endpoint kept failing ({code}{': ' + message if message else ''}) {attempts}"
            )
        else:
            text = f"{code} (HTTP {status}){': ' + message if message else ''}"
    elif isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        text = (
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE or storage.profile, or run where an instance role provides them"
        )
    elif isinstance(err, bx.ProfileNotFound):
        text = f"AWS profile {options.profile!r} not found in the AWS config files"
    elif isinstance(err, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        text = f"endpoint {_endpoint(options)} is unreachable {attempts} ({err})"
    elif isinstance(err, (bx.ConnectionClosedError, bx.ReadTimeoutError)):
        text = f"the connection to {_endpoint(options)} dropped or timed out {attempts} ({err})"
    elif isinstance(err, bx.SSLError):
        text = f"TLS error talking to {_endpoint(options)}: {err}"
    else:
        text = f"{type(err).__name__}: {err}"
    return redact(text)


class RangeReader(io.RawIOBase):
    """A read-only, seekable view of one S3 object through ranged GETs.

    Every GET carries the ETag seen when the file was opened, so an object replaced
    mid-read fails loudly instead of mixing two versions.
    """

    def __init__(self, store: Any, key: str, full_key: str, size: int, etag: str | None):
        self.store, self.key, self.full_key, self.size, self.etag = store, key, full_key, size, etag
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.store.uri_of(self.key)}: negative seek position")
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        extra = {"IfMatch": self.etag} if self.etag else {}
        with self.store._errors(self.store.uri_of(self.key), "cannot read"):
            data = self.store._get(
                self.full_key, Range=f"bytes={self.pos}-{self.pos + n - 1}", **extra
            )
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

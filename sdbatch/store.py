"""One storage interface for every byte sdbatch reads or writes.

`open_store(uri, options)` returns a Store rooted at a local folder or at
`s3://bucket/prefix` (any S3 endpoint: AWS, MinIO, R2, Ceph; `options` is the spec's
`storage` section). Keys are relative, '/'-separated and can never leave the root.

Writes are whole-object and atomic: a reader never sees a partial object under its final
key (temp file + rename locally; an S3 PUT is visible only once complete). Keys are
deterministic (plan.image_key), so a rerun, or a PUT that botocore retries because its
response was lost, overwrites the same key with the same bytes. We overwrite rather than
use a conditional `If-None-Match` put on purpose: after an interrupted run an image can
exist without its metadata row, and the rerun's overwrite keeps the metadata's sha256 the
hash of the object actually stored; conditional puts also aren't supported everywhere.

S3 goes through boto3 only, with one client per process and storage options, created
lazily on first use (never pickled from the driver to Ray workers). Credentials come
from the standard AWS chain and never appear in messages: every error is turned into a
StoreError (or FileNotFoundError for a missing object) naming the URI and the cause.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from .errors import StoreError
from .s3 import (
    ACCESS_DENIED,
    MISSING_OBJECT,
    RangeReader,
    client,
    describe_error,
    error_code,
    is_stream_error,
    redact,
)
from .spec import StorageSpec

PROBE_KEY = "_sdbatch_write_probe"
# Standard AWS settings (never credentials) that runner forwards to Ray workers through
# the runtime env. Credentials are deliberately not forwarded: Ray writes runtime-env
# variables in clear text to its logs (runtime_env_agent.log) and, on a cluster, to the
# job table. Local Ray workers inherit the driver's environment anyway; cluster nodes
# use their own credential chain (instance role, node env, shared files + AWS_PROFILE).
AWS_ENV_VARS = (
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


class Store:
    uri: str

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError naming its URI if there is none."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write the whole object atomically, replacing any object under `key`."""
        raise NotImplementedError

    def write_file(self, key: str, path: str | Path, content_type: str | None = None) -> None:
        """Write the local file at `path` as `key`, atomically, without holding it in memory."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys equal to `prefix` or under `prefix/`, relative to the root, in no order."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""
        raise NotImplementedError

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write `key` only if no object is there; True if this call created it."""
        raise NotImplementedError

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        """Replace `key` only if it still holds `expected` (compare and swap)."""
        raise NotImplementedError

    def uri_of(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{clean_key(key, self.uri)}"

    def open_input(self, key: str) -> IO[bytes]:
        """A seekable binary file to read `key` from (for Parquet); FileNotFoundError if absent."""
        raise NotImplementedError

    def check_writable(self) -> None:
        """Write and remove a probe object; raise StoreError naming the URI if we can't."""
        try:
            self.write_bytes(PROBE_KEY, b"probe")
            self.delete(PROBE_KEY)
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here means "not writable"
            raise StoreError(f"{self.uri}: output is not writable: {err}") from None


def clean_key(key: str, root: str, *, allow_root: bool = False) -> str:
    """`key` normalised ('a/./b' → 'a/b'); StoreError if it is absolute or leaves the root."""
    if key.startswith(("/", "\\")):
        raise StoreError(f"{root}: key {key!r} is absolute; keys are relative to the root")
    norm = posixpath.normpath(key) if key else "."
    if norm == ".." or norm.startswith("../"):
        raise StoreError(f"{root}: key {key!r} escapes the output folder")
    if norm == ".":
        if allow_root:
            return ""
        raise StoreError(f"{root}: empty key {key!r}")
    return norm


# ---------------------------------------------------------------- local folder


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str, allow_root: bool = False) -> Path:
        path = (self.root / clean_key(key, self.uri, allow_root=allow_root)).resolve()
        if path != self.root and self.root not in path.parents:  # e.g. through a symlink
            raise StoreError(f"{self.uri}: key {key!r} escapes the output folder")
        return path

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{self.uri_of(key)}: no such file") from None
        except OSError as err:
            raise StoreError(f"{self.uri_of(key)}: cannot read: {err.strerror}") from None

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as err:
            raise StoreError(f"{self.uri_of(key)}: cannot write: {err.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # mkstemp creates 0600; outputs are shared (web servers, other users): umask rules.
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError):  # disk full, permission revoked, folder gone
                raise StoreError(f"{self.uri_of(key)}: cannot write: {err.strerror}") from None
            raise

    def write_file(self, key: str, path: str | Path, content_type: str | None = None) -> None:
        target = self._path(key)
        tmp: str | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, target)
        except OSError as err:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    Path(tmp).unlink(missing_ok=True)
            raise StoreError(f"{self.uri_of(key)}: cannot write: {err.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix, allow_root=True)
        if base.is_file():
            yield base.relative_to(self.root).as_posix()
            return
        if not base.is_dir():
            return
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                yield Path(dirpath, name).relative_to(self.root).as_posix()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # Complete content under a temporary name, then a hard link: link() fails if the
        # name exists, so exactly one of several creators wins and nobody reads half a file.
        path = self._path(key)
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            raise StoreError(f"{self.uri_of(key)}: cannot write: {err.strerror}") from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        import fcntl

        path = self._path(key)
        with open(path.parent / f".{path.name}.lock.tmp", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if path.read_bytes() != expected:
                    return False
            except FileNotFoundError:
                return False
            self.write_bytes(key, data)
            return True

    def uri_of(self, key: str) -> str:
        return str(self.root / clean_key(key, self.uri))

    def open_input(self, key: str) -> IO[bytes]:
        try:
            return open(self._path(key), "rb")  # noqa: SIM115 - the caller owns the file
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"{self.uri_of(key)}: no such file") from None


# ---------------------------------------------------------------- S3


class S3Store(Store):
    """`s3://bucket/prefix` on any S3 endpoint, through boto3."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None):
        parsed = urlparse(uri)
        self.bucket = parsed.netloc
        if not self.bucket:
            raise StoreError(f"{uri}: an S3 URI needs a bucket: s3://bucket/prefix")
        self.prefix = clean_key(parsed.path.strip("/"), uri, allow_root=True)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        try:
            self.options = StorageSpec.model_validate(options or {})
        except ValueError as err:
            raise StoreError(f"{uri}: invalid storage options: {err}") from None

    # Stores are pickled into Ray tasks by callers; only the URI and options travel,
    # each process builds (and caches) its own client.
    @property
    def client(self) -> Any:
        return client(self.options)

    def _full(self, key: str) -> str:
        key = clean_key(key, self.uri)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, where: str, doing: str) -> Iterator[None]:
        try:
            yield
        except (StoreError, FileNotFoundError):
            raise
        except Exception as err:  # noqa: BLE001 - every botocore failure becomes readable
            if error_code(err) in MISSING_OBJECT:
                raise FileNotFoundError(f"{where}: no such file") from None
            cause = describe_error(err, self.bucket, self.options)
            raise StoreError(f"{where}: {doing}: {cause}") from None

    def _get(self, full_key: str, **kwargs: Any) -> bytes:
        # botocore retries a request until its response headers arrive; a connection
        # that drops mid-body is retried here, up to the same number of attempts.
        for attempt in range(1, self.options.max_attempts + 1):
            response = self.client.get_object(Bucket=self.bucket, Key=full_key, **kwargs)
            try:
                return response["Body"].read()
            except Exception as err:  # noqa: BLE001
                if attempt == self.options.max_attempts or not is_stream_error(err):
                    raise
        raise AssertionError("unreachable")

    def read_bytes(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors(self.uri_of(key), "cannot read"):
            return self._get(full)

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        full = self._full(key)
        with self._errors(self.uri_of(key), "cannot write"):
            self._put(full, data, content_type)

    def write_file(self, key: str, path: str | Path, content_type: str | None = None) -> None:
        full = self._full(key)
        with self._errors(self.uri_of(key), "cannot write"):
            # Multipart above boto3's threshold; S3 makes the object visible only whole.
            self.client.upload_file(
                str(path),
                self.bucket,
                full,
                ExtraArgs={"ContentType": content_type or "application/octet-stream"},
            )

    def _put(self, full_key: str, data: bytes, content_type: str | None) -> None:
        # Content-MD5 is checked by every S3 implementation, so a corrupted upload fails
        # (and is retried) rather than being stored.
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        self.client.put_object(
            Bucket=self.bucket,
            Key=full_key,
            Body=data,
            ContentType=content_type or "application/octet-stream",
            ContentMD5=md5,
        )

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            with self._errors(self.uri_of(key), "cannot check"):
                self.client.head_object(Bucket=self.bucket, Key=full)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        # Folder semantics, as LocalStore: 'meta' is 'meta' and 'meta/…', never 'metadata/…'.
        rel = clean_key(prefix, self.uri, allow_root=True)
        root = f"{self.prefix}/" if self.prefix else ""
        search = f"{root}{rel}" if rel else root
        with self._errors(self.uri_of(rel) if rel else self.uri, "cannot list"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=search
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(root) :]
                    if key.endswith("/"):  # a console's "folder" marker, not data
                        continue
                    if not rel or key == rel or key.startswith(f"{rel}/"):
                        yield key

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors(self.uri_of(key), "cannot delete"):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        full = self._full(key)
        with self._errors(self.uri_of(key), "cannot write"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
            except Exception as err:  # noqa: BLE001
                code = error_code(err)
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                if code not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                    raise
                # An endpoint without conditional writes: create if absent, then read back
                # (the later writer wins; the other one sees it at its next lease check).
                if self.exists(key):
                    return False
                self._put(full, data, "application/json")
            return self._get(full) == data

    def replace_if(self, key: str, data: bytes, expected: bytes) -> bool:
        full = self._full(key)
        with self._errors(self.uri_of(key), "cannot write"):
            try:
                head = self.client.get_object(Bucket=self.bucket, Key=full)
                current = head["Body"].read()
            except Exception as err:  # noqa: BLE001
                if error_code(err) in MISSING_OBJECT:
                    return False
                raise
            if current != expected:
                return False
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=full, Body=data, IfMatch=head["ETag"]
                )
            except Exception as err:  # noqa: BLE001
                code = error_code(err)
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    return False
                if code not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                    raise
                self._put(full, data, "application/json")
            return self._get(full) == data

    def uri_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def open_input(self, key: str) -> IO[bytes]:
        full = self._full(key)
        with self._errors(self.uri_of(key), "cannot read"):
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        raw = RangeReader(self, key, full, head["ContentLength"], head.get("ETag"))
        return io.BufferedReader(raw, buffer_size=1 << 20)

    def check_writable(self) -> None:
        from botocore.exceptions import ClientError

        with self._errors(self.uri, "output is not writable"):
            self._put(self._full(PROBE_KEY), b"probe", "text/plain")
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self._full(PROBE_KEY))
            except ClientError as err:
                # Writing is what a job needs; a role without s3:DeleteObject may keep
                # the 5-byte probe.
                if error_code(err) not in ACCESS_DENIED:
                    raise


def unwrap_task_error(err: BaseException) -> BaseException:
    """A StoreError raised in a Ray task reaches the driver as RayTaskError(StoreError),
    whose text is the worker's whole traceback; this returns the original one-line
    StoreError (anything else unchanged)."""
    if not isinstance(err, StoreError) or type(err) is StoreError:
        return err
    cause = getattr(err, "cause", None)
    source = cause if isinstance(cause, StoreError) else err
    text = str(source.args[0]) if source.args else str(source)
    return StoreError(text.splitlines()[0] if text else type(err).__name__)


# ---------------------------------------------------------------- opening stores


def open_store(uri: str, options: dict[str, Any] | None = None) -> Store:
    """The store for a URI: a local path, a `file://` URI or `s3://bucket/prefix`."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return LocalStore(parsed.path if parsed.scheme == "file" else uri)
    if parsed.scheme == "s3":
        return S3Store(uri, options)
    raise StoreError(
        f"{uri}: unsupported storage scheme {parsed.scheme!r} "
        "(use a local path or s3://bucket/prefix)"
    )


def split_uri(uri: str) -> tuple[str, str]:
    """('parent URI', 'name') of a file URI, for reading one object through a store."""
    uri = uri.rstrip("/")
    head, _, name = uri.rpartition("/")
    if head.endswith(":/"):  # 's3://bucket' has no parent folder above the bucket
        raise StoreError(f"{uri}: not an object URI (expected s3://bucket/key)")
    if not uri.startswith("/") and "://" not in uri and not head:
        return (".", name)  # a bare relative file name: the current folder
    return (head or "/", name)


def read_uri(uri: str, options: dict[str, Any] | None = None) -> bytes:
    """The bytes of one file or object (e.g. an init image named in a manifest)."""
    parent, name = split_uri(uri)
    return open_store(parent, options).read_bytes(name)


__all__: list[str] = [
    "AWS_ENV_VARS",
    "LocalStore",
    "S3Store",
    "Store",
    "describe_error",
    "open_store",
    "read_uri",
    "redact",
    "split_uri",
    "unwrap_task_error",
]

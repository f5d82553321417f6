"""One storage interface for every byte sdbatch reads or writes.

`open_store(uri)` returns a Store rooted at a local folder or an `s3://bucket/prefix`.
Keys are relative, '/'-separated. Writes are atomic: a reader never sees a partial object
under its final key (temp file + rename locally; S3 PUTs are atomic by nature).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


class StoreError(Exception):
    """A storage problem that stops the job; the message names the URI and the cause."""


class Store:
    uri: str

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix`, relative to the store root, in no particular order."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def uri_of(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def arrow_filesystem(self) -> tuple[Any, str]:
        """(pyarrow filesystem, root path in it) for reading Parquet parts."""
        raise NotImplementedError

    def check_writable(self) -> None:
        """Write and remove a probe object; raise StoreError naming the URI if we can't."""
        key = "_sdbatch_write_probe"
        try:
            self.write_bytes(key, b"probe")
            self.delete(key)
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure here means "not writable"
            raise StoreError(f"{self.uri}: output is not writable: {err}") from None


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"{self.uri}: key {key!r} escapes the output folder")
        return path

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri_of(key)}: no such file") from None

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
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            yield prefix
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

    def uri_of(self, key: str) -> str:
        return str(self.root / key)

    def arrow_filesystem(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(self.root)


_local = threading.local()


def open_store(uri: str, options: dict[str, Any] | None = None) -> Store:
    """The store for a URI: a local path or `file://` URI (S3 comes with the S3 backend)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return LocalStore(parsed.path if parsed.scheme == "file" else uri)
    raise StoreError(f"{uri}: unsupported storage scheme {parsed.scheme!r} (use a local path)")


def split_uri(uri: str) -> tuple[str, str]:
    """('parent URI', 'name') of a file URI, for reading one object through a store."""
    uri = uri.rstrip("/")
    head, _, name = uri.rpartition("/")
    return (head or "/", name)


def read_uri(uri: str, options: dict[str, Any] | None = None) -> bytes:
    parent, name = split_uri(uri)
    return open_store(parent, options).read_bytes(name)

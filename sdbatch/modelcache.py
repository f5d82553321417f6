"""Checkpoints on S3: copied once per node into a local cache before anything loads them.

`s3://bucket/prefix/` holding a diffusers folder (or a lone model: a ControlNet, a DPT),
or `s3://bucket/path/model.safetensors` (a single-file checkpoint, `local_file`), is
copied to `$SDBATCH_CACHE_DIR/models/<name>-<key>/` (default `~/.cache/sdbatch`),
where `key` hashes the URI and the (path, size, ETag) of every file copied: a changed
object is a new cache entry, an unchanged prefix is found again by the next job on that
node without a download. Only the files the pipeline loads are copied (the selection of
`weights.choose_files`), so a prefix that also holds fp16 variants or a root `.ckpt`
costs only what is used.

Processes of one node (the driver, several actors) share one copy: the first takes an
exclusive file lock and downloads into a `.partial` folder that is renamed into place
only when every file has its listed size; the others wait on the lock and then find it
complete. A partial download is never loaded, and a killed download leaves only a
`.partial` folder that the next attempt removes. Every download appends one line to
`downloads.log` in the cache (the URI, the files, the bytes, the pid).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import StoreError, UserError
from .singlefile import is_single_file
from .weights import cache_dir, choose_files, components_of

COMPLETE = ".sdbatch-complete"


def is_remote(ref: str) -> bool:
    return ref.startswith("s3://")


def _listing(
    uri: str, storage: dict[str, Any] | None, name: str = ""
) -> tuple[Any, list[dict[str, Any]]]:
    """The objects under prefix `uri` (whose names start with `name`, if given)."""
    from .store import S3Store

    try:
        store = S3Store(uri, storage)
        client = store.client
        root = f"{store.prefix}/" if store.prefix else ""
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=store.bucket, Prefix=root + name
        ):
            for obj in page.get("Contents", ()):
                rel = obj["Key"][len(root) :]
                if rel and not rel.endswith("/"):
                    objects.append({"rel": rel, "size": obj["Size"], "etag": obj.get("ETag", "")})
    except StoreError as err:
        raise UserError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - botocore's errors, made readable
        from .store import describe_error

        raise UserError(
            f"model {uri}: cannot list: {describe_error(err, store.bucket, store.options)}"
        ) from None
    return store, objects


def _select(store: Any, objects: list[dict[str, Any]], uri: str) -> list[dict[str, Any]]:
    """The objects a pipeline (or lone model) loads, by the same rule as hashing."""
    by_rel = {o["rel"]: o for o in objects}
    folders: dict[str, list[str]] = {}
    for rel in by_rel:
        parent = str(PurePosixPath(rel).parent)
        folders.setdefault("" if parent == "." else parent, []).append(PurePosixPath(rel).name)
    if "model_index.json" in by_rel:
        try:
            index = json.loads(store.read_bytes("model_index.json"))
        except ValueError as err:
            raise UserError(f"model {uri}: model_index.json: {err}") from None
        chosen = ["model_index.json"]
        for component in components_of(index):
            chosen += [f"{component}/{n}" for n in choose_files(folders.get(component, []))]
    elif "config.json" in by_rel:
        chosen = choose_files(folders.get("", []))
    else:
        raise UserError(
            f"model {uri}: no model_index.json or config.json under this prefix "
            f"({len(objects)} objects); give the prefix of a diffusers folder"
        )
    return [by_rel[rel] for rel in chosen]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_resolved: dict[str, Path] = {}  # uri + options → folder, for the life of this process
# uri → {"entry": cache folder name, "wanted": objects}: what this process (or the driver,
# handed over with `adopt`) listed; lets a warm actor find its copy without asking S3.
_plans: dict[str, dict[str, Any]] = {}


def local_copy(uri: str, storage: dict[str, Any] | None = None) -> Path:
    """The node-local folder holding `uri`'s loaded files (downloaded at most once).

    Within one process (a driver's job, an actor) a prefix is listed once: later calls
    return the same folder without asking S3 again.
    """
    memo = json.dumps([uri, storage], sort_keys=True, default=str)
    if memo in _resolved and (_resolved[memo] / COMPLETE).is_file():
        return _resolved[memo]
    _resolved[memo] = _local_copy(uri, storage)
    return _resolved[memo]


def local_file(uri: str, storage: dict[str, Any] | None = None) -> Path:
    """The node-local copy of one object (a single-file checkpoint), downloaded once."""
    return local_copy(uri, storage) / uri.rsplit("/", 1)[-1]


def plans(refs: list[str]) -> dict[str, dict[str, Any]]:
    """The listings this process made for `refs` (the driver hands them to its actors)."""
    return {ref: _plans[ref] for ref in refs if ref in _plans}


def adopt(listed: dict[str, dict[str, Any]] | None) -> None:
    """Use the driver's listings: an actor whose node already holds that content loads it
    without a request to S3; a cold node downloads exactly what the driver listed."""
    _plans.update(listed or {})


def _plan(uri: str, storage: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    from .store import S3Store

    single = is_single_file(uri)
    folder = uri.rsplit("/", 1)[0] + "/" if single else uri.rstrip("/") + "/"
    if uri in _plans:
        return S3Store(folder, storage), _plans[uri]
    if single:  # one object: list that name only, not the folder beside it
        name = uri.rsplit("/", 1)[-1]
        store, objects = _listing(folder, storage, name)
        wanted = [o for o in objects if o["rel"] == name]
        if not wanted:
            raise UserError(f"model {uri}: no such object")
    else:
        store, objects = _listing(folder, storage)
        wanted = _select(store, objects, uri)
    key = hashlib.sha256(
        json.dumps([uri.rstrip("/"), [(o["rel"], o["size"], o["etag"]) for o in wanted]]).encode()
    ).hexdigest()[:16]
    last = uri.rstrip("/").rsplit("/", 1)[-1] if single else store.prefix.rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", last or store.bucket)
    _plans[uri] = {"entry": f"{name}-{key}", "wanted": wanted}
    return store, _plans[uri]


def _local_copy(uri: str, storage: dict[str, Any] | None) -> Path:
    store, plan = _plan(uri, storage)
    wanted = plan["wanted"]
    dest = cache_dir() / "models" / plan["entry"]
    if (dest / COMPLETE).is_file():
        return dest
    with _locked(dest.parent / f".{dest.name}.lock"):
        if (dest / COMPLETE).is_file():  # another process of this node finished it
            return dest
        partial = dest.parent / f".{dest.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # an earlier attempt that was killed
        started = time.monotonic()
        for obj in wanted:
            target = partial / obj["rel"]
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(store, obj, target, uri)
        (partial / COMPLETE).write_text(json.dumps({"uri": uri, "files": len(wanted)}))
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(partial, dest)
        _log(uri, wanted, time.monotonic() - started)
    return dest


def _download(store: Any, obj: dict[str, Any], target: Path, uri: str) -> None:
    from .store import describe_error

    full = f"{store.prefix}/{obj['rel']}" if store.prefix else obj["rel"]
    try:
        store.client.download_file(store.bucket, full, str(target))
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"model {uri}: cannot download {obj['rel']}: "
            f"{describe_error(err, store.bucket, store.options)}"
        ) from None
    if target.stat().st_size != obj["size"]:
        raise UserError(
            f"model {uri}: {obj['rel']} downloaded {target.stat().st_size} bytes, "
            f"listed {obj['size']}; not used"
        )


def _log(uri: str, wanted: list[dict[str, Any]], seconds: float) -> None:
    line = {
        "uri": uri,
        "files": len(wanted),
        "bytes": sum(o["size"] for o in wanted),
        "seconds": round(seconds, 3),
        "pid": os.getpid(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(cache_dir() / "models" / "downloads.log", "a") as f:
        f.write(json.dumps(line) + "\n")

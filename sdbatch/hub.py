"""Hugging Face hub ids: `org/name` or `org/name@<revision>`, pinned to a commit per job.

A hub id is looked up in the local Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`, the
`models--org--name/snapshots/<commit>/` layout). When the cache lacks it and the
machine may go online (`HF_HUB_OFFLINE` unset), it is downloaded once into that cache
through `huggingface_hub`, only the files the pipeline loads (`weights.choose_files`:
no root single-file checkpoints, fp16 variants or `.bin` twins). `run` pins every hub id
to the commit it resolved (`org/name@<40 hex>`) before anything renders, so all actors
load the same files even if the branch moves mid-job, the commit is what `job.yaml` and
the metadata's model columns record, and a resume after the branch moved is refused as
a changed spec.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError
from .modelcache import is_remote
from .singlefile import is_single_file
from .weights import choose_files, components_of, is_weights

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_commit(name: str) -> bool:
    """A full git commit hash (what a snapshot folder of the HF cache is named)."""
    return bool(_COMMIT.match(name))


def split(ref: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `ref` is spelled as a hub id, else None."""
    m = _HUB_ID.match(ref)
    return (m["repo"], m["rev"]) if m else None


def is_hub_id(ref: str) -> bool:
    """`ref` names a hub repository (`org/name`, `org/name@rev`), not a local path or an
    `s3://` prefix: spelled as a hub id, and no such path exists (a folder that exists
    wins over a hub id of the same spelling, as in `from_pretrained`)."""
    return not is_remote(ref) and split(ref) is not None and not Path(ref).exists()


def at_commit(ref: str, snapshot: Path) -> str:
    """Hub id `ref` as `org/name@<commit>`, the commit its snapshot folder is named by
    (`ref` itself where the folder is not named by a commit)."""
    parts = split(ref)
    assert parts is not None, ref
    return f"{parts[0]}@{snapshot.name}" if is_commit(snapshot.name) else ref


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(ref: str, skip_weights_of: tuple[str, ...] = ()) -> Path:
    """The snapshot folder of a hub id: from the local cache, else downloaded once.

    `skip_weights_of`: components whose weights are not wanted (the layout of a single-file
    checkpoint needs only their configs): not downloaded. "" is a lone model's own folder.
    """
    from huggingface_hub import snapshot_download

    parts = split(ref)
    if parts is None:
        raise UserError(f"model {ref}: not a hub id (org/name or org/name@revision)")
    repo, revision = parts
    cached = _cached_snapshot(repo, revision)
    if cached is not None:
        return cached
    if offline():
        raise UserError(
            f"model {ref}: not a local folder and not in the local Hugging Face cache "
            "(HF_HUB_OFFLINE is set, so not downloaded); download it first or give a path"
        )
    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=[
                    f
                    for f in _loaded(repo, revision)
                    if not (
                        f.rpartition("/")[0] in skip_weights_of and is_weights(f.split("/")[-1])
                    )
                ],
            )
        )
    except Exception as err:  # noqa: BLE001 - network, auth, unknown repo or revision
        raise UserError(
            f"model {ref}: not in the local Hugging Face cache and the download failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot of `repo` at `revision`, if it holds a model_index.json (a
    pipeline) or config.json (a lone model). Not `snapshot_download(local_files_only=True)`:
    that refuses a snapshot downloaded with allow_patterns (only the loaded files) as
    incomplete."""
    from huggingface_hub import try_to_load_from_cache

    for marker in ("model_index.json", "config.json"):
        found = try_to_load_from_cache(repo, marker, revision=revision)
        if isinstance(found, str):
            return Path(found).parent
    return None


def _loaded(repo: str, revision: str | None) -> list[str]:
    """The repo's files that the pipeline (or lone model) loads, by the hashing rule."""
    import json

    from huggingface_hub import HfApi, hf_hub_download

    files = HfApi().list_repo_files(repo, revision=revision)
    folders: dict[str, list[str]] = {}
    for f in files:
        parent, _, name = f.rpartition("/")
        folders.setdefault(parent, []).append(name)
    if "model_index.json" in files:
        index = json.loads(
            Path(hf_hub_download(repo, "model_index.json", revision=revision)).read_text()
        )
        chosen = ["model_index.json"]
        for component in components_of(index):
            chosen += [f"{component}/{n}" for n in choose_files(folders.get(component, []))]
        return chosen
    return choose_files(folders.get("", []))


def pin(ref: str) -> str:
    """`org/name[@branch]` → `org/name@<commit>` (the snapshot it resolves to); a hub
    single file `org/name[@branch]/file` → `org/name@<commit>/file`."""
    file = split_file(ref)
    if file is not None:
        repo, _, name = file
        path = resolve_file(ref)
        commit = path.parents[len(Path(name).parts) - 1].name
        return f"{repo}@{commit}/{name}" if is_commit(commit) else ref
    return at_commit(ref, resolve(ref)) if is_hub_id(ref) else ref


# A single-file checkpoint in a hub repository, as users copy it: the file's page or
# download URL (`https://huggingface.co/ORG/NAME/blob/REV/PATH`, `.../resolve/REV/PATH`,
# also `huggingface.co/`, `hf.co/`), or `ORG/NAME/PATH` with an optional `@REV` after NAME.
_URL = re.compile(
    r"^(?:https?://)?(?:huggingface\.co|hf\.co)/(?P<repo>[\w.-]+/[\w.-]+)/"
    r"(?:blob|resolve)/(?P<rev>[^/]+)/(?P<path>.+)$"
)
_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w.-]+))?/(?P<path>[^@]+)$")


def split_file(ref: str) -> tuple[str, str | None, str] | None:
    """(repo id, revision or None, file path) if `ref` names a single-file checkpoint in
    a hub repository (and is not a local file), else None."""
    if not is_single_file(ref) or Path(ref).exists() or ref.startswith("/"):
        return None
    m = _URL.match(ref) or _FILE.match(ref)
    if m is None or ".." in m["path"].split("/"):
        return None
    return m["repo"], m["rev"], m["path"]


def resolve_file(ref: str) -> Path:
    """The local path of a hub single file: from the local HF cache, else downloaded
    once into it (huggingface_hub's lock: one download per node however many actors)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    parts = split_file(ref)
    if parts is None:
        raise UserError(f"model {ref}: not a hub file (org/name/file.safetensors or its URL)")
    repo, revision, name = parts
    cached = try_to_load_from_cache(repo, name, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if offline():
        raise UserError(
            f"model {ref}: not a local file and not in the local Hugging Face cache "
            "(HF_HUB_OFFLINE is set, so not downloaded); download it first or give a path"
        )
    try:
        return Path(hf_hub_download(repo, name, revision=revision))
    except Exception as err:  # noqa: BLE001 - network, auth, unknown repo, revision or file
        raise UserError(
            f"model {ref}: not in the local Hugging Face cache and the download failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None

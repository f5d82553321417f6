"""Which files of a checkpoint the pipeline loads, and their content hash.

A hub download of SD 1.5 holds 20-40 GB that `from_pretrained` never reads: root-level
single-file checkpoints, fp16 variants, `.bin` twins of `.safetensors` weights, Flax and
ONNX exports. Hashing every file would cost minutes and report an unused file's change as
changed weights. The selection here follows diffusers' and transformers' own rule for
`variant=None` (what sdbatch loads): in each component folder listed in `model_index.json`
the non-variant weights, `.safetensors` where they exist, else the pickled `.bin` (which
sdbatch refuses unless `models.allow_pickle`), plus its config, tokenizer and scheduler
files. A lone model folder (a ControlNet, a DPT) is one component at its root.

Each file is hashed once per content: a cache keyed by (real path, size, mtime), kept in
memory and in `$SDBATCH_CACHE_DIR/file-hashes.json` (default `~/.cache/sdbatch`), so a
second job on the same node hashes nothing again. No torch import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# The file names from_pretrained reads for weights, without a variant infix:
# diffusers' diffusion_pytorch_model, transformers' model / pytorch_model; sharded as
# NAME-00001-of-00003.EXT beside NAME.EXT.index.json.
_WEIGHT = re.compile(
    r"^(?P<stem>diffusion_pytorch_model|model|pytorch_model)"
    r"(?P<variant>\.[A-Za-z0-9_]+)?(?P<shard>-\d{5}-of-\d{5})?"
    r"\.(?P<ext>safetensors|bin)(?P<index>\.index\.json)?$"
)
# Files of other frameworks or formats that the PyTorch loaders never read.
_NOT_LOADED = (".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".tflite", ".ckpt", ".pt")
_NOT_LOADED_NAMES = ("README.md", "LICENSE", "LICENSE.md", ".gitattributes")


@dataclass(frozen=True)
class ModelHash:
    """Combined hash of what a checkpoint loads, per component, and per file."""

    sha256: str
    components: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path → sha256
    pickled: tuple[str, ...] = ()  # relative paths of pickled weight files it loads

    def as_json(self) -> dict:
        return {"sha256": self.sha256, "components": self.components, "files": self.files}


def choose_files(names: list[str]) -> list[str]:
    """Of the file names in one component folder, those from_pretrained(variant=None)
    reads: configs, tokenizer and scheduler files, and one set of weights."""
    others, weights = [], {"safetensors": [], "bin": []}
    for name in sorted(names):
        if name.startswith(".") or name in _NOT_LOADED_NAMES:
            continue
        m = _WEIGHT.match(name)
        if m:
            if not m["variant"]:
                weights[m["ext"]].append(name)
            continue
        suffix = os.path.splitext(name)[1]
        if suffix in _NOT_LOADED or suffix in PICKLE_SUFFIXES or suffix == ".safetensors":
            continue  # another format, or a stray checkpoint the loader does not look at
        others.append(name)
    return others + (weights["safetensors"] or weights["bin"])


def component_files(folder: Path) -> list[Path]:
    """The files from_pretrained(variant=None) reads in one component folder."""
    if not folder.is_dir():
        return []
    return [folder / n for n in choose_files([p.name for p in folder.iterdir() if p.is_file()])]


def components_of(index: dict) -> list[str]:
    """Component folders a model_index.json lists (null entries are not loaded)."""
    return sorted(
        name
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and entry[:1] != [None]
    )


def loaded_files(root: Path) -> dict[str, list[Path]]:
    """Component name → the files it loads ('' for a lone model or the pipeline's index)."""
    index_path = root / "model_index.json"
    if not index_path.is_file():
        return {"": component_files(root)}
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{index_path}: cannot read: {err}") from None
    found: dict[str, list[Path]] = {"": [index_path]}
    for name in components_of(index):
        found[name] = component_files(root / name)
    return found


# ---------------------------------------------------------------- file hashes, cached

_lock = threading.Lock()
_memory: dict[str, str] = {}
_disk_loaded = False


def cache_dir() -> Path:
    return Path(os.environ.get("SDBATCH_CACHE_DIR") or Path.home() / ".cache" / "sdbatch")


def _cache_file() -> Path:
    return cache_dir() / "file-hashes.json"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _load_disk() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    try:
        data = json.loads(_cache_file().read_text())
        if isinstance(data, dict):
            _memory.update({k: v for k, v in data.items() if isinstance(v, str)})
    except (OSError, ValueError):
        pass


def _save_disk() -> None:
    """Merge into the on-disk cache (atomic replace: a reader never sees half a file)."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            on_disk = json.loads(path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        merged = {**(on_disk if isinstance(on_disk, dict) else {}), **_memory}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".file-hashes-")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: hashes are recomputed next time, nothing else changes


def file_sha256(path: Path) -> str:
    key = _key(path)
    with _lock:
        _load_disk()
        if key in _memory:
            return _memory[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _memory[key] = digest
    return digest


def hash_folder(root: Path) -> ModelHash:
    """Hash what the checkpoint at `root` loads (see the module docstring)."""
    loaded = loaded_files(root)
    return _hash({c: [(p.relative_to(root).as_posix(), p) for p in ps] for c, ps in loaded.items()})


def is_weights(name: str) -> bool:
    """A weights file of a component (what a single-file checkpoint stands in for)."""
    return bool(_WEIGHT.match(name))


def hash_single_file(file: Path, layout: Path, provided: tuple[str, ...]) -> ModelHash:
    """Hash a single-file checkpoint with what it loads from its layout folder: every
    component's config, tokenizer and scheduler files, and the weights of components the
    file does not hold (SD 2 depth's DPT). A component the file provides hashes the file
    with its config, so two files never share a component hash."""
    entries: dict[str, list[tuple[str, Path]]] = {"": [(file.name, file)]}
    for component, paths in loaded_files(layout).items():
        entries.setdefault(component, [])
        if component in provided:
            entries[component].append((file.name, file))
        entries[component] += [
            (f"layout/{p.relative_to(layout).as_posix()}", p)
            for p in paths
            if not (component in provided and is_weights(p.name))
        ]
    return _hash(entries)


def _hash(entries: dict[str, list[tuple[str, Path]]]) -> ModelHash:
    files: dict[str, str] = {}
    components: dict[str, str] = {}
    pickled: list[str] = []
    new = False
    for component, named in entries.items():
        h = hashlib.sha256()
        for rel, p in named:
            before = len(_memory)
            files[rel] = file_sha256(p)
            new |= len(_memory) > before
            h.update(f"{rel}\0{files[rel]}\0".encode())
            if p.suffix in PICKLE_SUFFIXES and rel not in pickled:
                pickled.append(rel)
        if component:
            components[component] = h.hexdigest()
    combined = hashlib.sha256(
        "".join(f"{rel}\0{digest}\0" for rel, digest in sorted(files.items())).encode()
    ).hexdigest()
    if new:
        with _lock:
            _save_disk()
    return ModelHash(combined, components, files, tuple(pickled))

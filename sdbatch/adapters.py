"""LoRA adapters and textual-inversion embeddings: per-row choice, files, and actor state.

A job names its adapter files once (`loras: {NAME: URI}`, `embeddings: {NAME: URI}`); a
row picks LoRAs with A1111 tags in its prompt (`<lora:NAME:0.8>`, removed from the text
the text encoder sees) and/or a `loras` column (`"style:0.8,detail:0.4"`), over the
spec's `defaults.loras`. The plan writes the item's LoRAs as one canonical string
(`adapter_key`: names sorted, weights as given), which is part of the batch key: a
pipeline call never mixes adapter sets, so an image's bits do not depend on its
neighbours. Embeddings are loaded for the whole job; the names a prompt uses are
recorded per item.

The top half is torch-free (spec, manifest and plan checks, the driver's hashes); the
`Adapters` class is the render actor's: each file loaded once, switched per call with
`set_adapters`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

# `<lora:NAME>` or `<lora:NAME:WEIGHT>`; A1111's separate text-encoder/UNet weights
# (`<lora:NAME:TE:UNET>`) are refused by `parse_tags`.
_TAG = re.compile(r"<lora:([^:>]*)(?::([^>]*))?>")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]*")  # a LoRA or embedding name (spec keys)
MAX_WEIGHT = 10.0
SAFETENSORS = ".safetensors"
# In a LoRA folder (diffusers' `save_lora_weights`), the file `load_lora_weights` reads.
LORA_FILE = "pytorch_lora_weights.safetensors"


def _weight(name: str, text: str | None) -> float:
    if text is None or not text.strip():
        return 1.0
    try:
        weight = float(text)
    except ValueError:
        raise UserError(f"LoRA {name!r}: weight {text!r} is not a number") from None
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise UserError(
            f"LoRA {name!r}: weight {text} must be a finite number in "
            f"-{MAX_WEIGHT:g}..{MAX_WEIGHT:g}"
        )
    return weight


def parse_list(value: str | None) -> dict[str, float]:
    """A `loras` value (`"style:0.8, detail"`) → {name: weight}; weight defaults to 1."""
    out: dict[str, float] = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        name, _, weight = part.strip().partition(":")
        name = name.strip()
        if ":" in weight:
            raise UserError(f"{part.strip()!r}: expected NAME or NAME:WEIGHT")
        out[name] = _weight(name, weight)
    return out


def parse_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """The prompt without its `<lora:…>` tags, and the tags' {name: weight}."""
    found: dict[str, float] = {}

    def take(match: re.Match[str]) -> str:
        name, rest = match.group(1).strip(), match.group(2)
        if rest is not None and ":" in rest:
            raise UserError(
                f"{match.group(0)}: separate text-encoder and UNet weights are not "
                "supported; use <lora:NAME:WEIGHT>"
            )
        found[name] = _weight(name, rest)
        return " "

    if "<lora:" not in prompt:
        return prompt, found
    text = _TAG.sub(take, prompt)
    return re.sub(r" {2,}", " ", text).strip(), found


def choose(prompt: str, column: str | None, known: dict[str, str]) -> tuple[str, str | None]:
    """A row's prompt as encoded and its LoRAs as `adapter_key` (None without any).

    `column` is the row's `loras` value, or the spec's `defaults.loras`; a tag in the
    prompt overrides the same name there. Unknown names raise UserError."""
    text, tags = parse_tags(prompt)
    chosen = {**parse_list(column), **tags}
    unknown = sorted(n for n in chosen if n not in known)
    if unknown:
        listed = ", ".join(sorted(known)) or "none; add a loras: {NAME: URI} mapping to the spec"
        raise UserError(f"unknown LoRA {', '.join(map(repr, unknown))} (spec loras: {listed})")
    return text, adapter_key(chosen)


def adapter_key(chosen: dict[str, float]) -> str | None:
    """{name: weight} → `"a:0.5,b:1"` (sorted by name), None when empty."""
    if not chosen:
        return None
    return ",".join(f"{n}:{chosen[n]:g}" for n in sorted(chosen))


def embeddings_in(texts: list[str | None], names: list[str]) -> str | None:
    """The embedding names found in the texts, comma-joined (None if none). Anywhere, not
    only as words: the tokenizer splits an added token out of any text that holds it."""
    used = [n for n in names if any(t and n in t for t in texts)]
    return ",".join(used) or None


# ---------------------------------------------------------------------------------------
# Files: where they are, what they are, their hashes (no torch).


def resolve(uri: str, storage: dict[str, Any] | None = None) -> Path:
    """The local `.safetensors` file of an adapter: a file; a folder (diffusers'
    `save_lora_weights` output, or one holding a single .safetensors); an `s3://` file
    or a prefix holding `LORA_FILE` (copied once per node into the model cache); or a
    hub id (its HF cache snapshot, a folder as above)."""
    from . import hub
    from .modelcache import is_remote, local_file

    if is_remote(uri):
        # A prefix is a diffusers LoRA folder: its one file is what is loaded.
        file = uri if uri.endswith(SAFETENSORS) else f"{uri.rstrip('/')}/{LORA_FILE}"
        path = local_file(file, storage)
    elif hub.is_hub_id(uri):
        path = _hub_snapshot(uri)
    else:
        path = Path(uri)
    if path.is_dir():
        files = sorted(path.glob(f"*{SAFETENSORS}"))
        if (path / LORA_FILE).is_file():
            return path / LORA_FILE
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise UserError(
                f"{uri}: a folder needs {LORA_FILE} or exactly one {SAFETENSORS} file "
                f"(found: {found})"
            )
        return files[0]
    if not path.is_file():
        raise UserError(f"{uri}: file not found")
    if path.suffix != SAFETENSORS:
        raise UserError(
            f"{uri}: only {SAFETENSORS} adapters are loaded (pickled .pt/.ckpt/.bin files "
            "can run arbitrary code when opened; convert them to .safetensors)"
        )
    return path


def pin(uri: str) -> str:
    """A hub id (`org/name`, `org/name@branch`) as `org/name@<commit>`, the snapshot it
    resolves to now (so a rerun loads the same files after the branch moved); any other
    source as it is (its file's sha256 pins it)."""
    from . import hub

    return hub.at_commit(uri, _hub_snapshot(uri)) if hub.is_hub_id(uri) else uri


def _hub_snapshot(uri: str) -> Path:
    """A hub id's snapshot folder: from the local HF cache, else (online) its
    .safetensors and JSON files downloaded once into it. A job runs it pinned to its
    commit (`pin`); the file's sha256 is recorded as well."""
    from huggingface_hub import snapshot_download

    from . import hub

    parts = hub.split(uri)
    assert parts is not None
    repo, revision = parts
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or incompletely): download below
        if hub.offline():
            raise UserError(
                f"{uri}: not a local file or folder and not in the local Hugging Face cache "
                "(HF_HUB_OFFLINE is set, so not downloaded)"
            ) from None
    try:
        patterns = ["*.safetensors", "*.json"]
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - network, auth, unknown repo or revision
        raise UserError(
            f"{uri}: not in the local Hugging Face cache and the download failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None


def header(path: Path) -> dict[str, Any]:
    """The safetensors header: tensor name → {dtype, shape, data_offsets}."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2**20:
            raise UserError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            data = json.loads(f.read(size))
        except ValueError:
            raise UserError(f"{path}: not a safetensors file (unreadable header)") from None
    data.pop("__metadata__", None)
    return data


def addnet_hash(path: Path) -> str:
    """sha256 of a safetensors file's tensor data (after the header): the hash A1111
    writes in `Lora hashes:` (its "addnet" hash), so Civitai finds the same LoRA."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + size)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# Tensor names that carry the UNet's cross-attention input width (the text width): the
# down-projection of an `attn2.to_k` LoRA in the diffusers/PEFT and kohya layouts.
_TO_K = re.compile(r"attn2[._]to_k(?:\.lora)?[._](?:lora_A|lora_down|down)\.weight$")


def check_lora(name: str, uri: str, path: Path, text_width: int | None, model: str) -> None:
    """A file that is not a LoRA, or a LoRA for another family than the model's."""
    tensors = header(path)
    if not tensors or not all("lora" in key or key.endswith(".alpha") for key in tensors):
        raise UserError(f"loras.{name} {uri}: not a LoRA file (tensor names lack 'lora')")
    widths = {
        shape[1]
        for key, entry in tensors.items()
        if _TO_K.search(key) and len(shape := entry.get("shape", [])) == 2
    }
    if text_width is not None and widths and text_width not in widths:
        raise UserError(
            f"loras.{name} {uri}: a LoRA for a UNet with {_family_of_width(min(widths))} "
            f"text width {min(widths)}; the model {model} has {text_width} "
            f"({_family_of_width(text_width)}): it is for another model family"
        )


def _family_of_width(width: int) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(width, "a")


def check_embedding(name: str, uri: str, path: Path, widths: tuple[int, ...]) -> None:
    """An embedding file whose vectors do not fit the model's text encoder(s)."""
    tensors = header(path)
    if set(tensors) >= {"clip_l", "clip_g"}:
        found = (tensors["clip_l"]["shape"][-1], tensors["clip_g"]["shape"][-1])
    elif len(tensors) == 1:
        found = (next(iter(tensors.values()))["shape"][-1],)
    else:
        raise UserError(
            f"embeddings.{name} {uri}: not a textual-inversion embedding (expected one "
            f"tensor, or clip_l and clip_g for SDXL; found {len(tensors)} tensors)"
        )
    if found != widths:
        raise UserError(
            f"embeddings.{name} {uri}: vectors of width {'/'.join(map(str, found))}; the "
            f"model's text encoder(s) take {'/'.join(map(str, widths))}: it is for "
            "another model family"
        )


@dataclass(frozen=True)
class AdapterFile:
    kind: str  # lora | embedding
    name: str
    uri: str
    sha256: str  # of the whole file (model_sha256's counterpart; the resume check)
    short: str  # what A1111's infotext shows (12 hex)


def describe(kind: str, name: str, uri: str, path: Path) -> AdapterFile:
    from .weights import file_sha256

    sha256 = file_sha256(path)
    short = addnet_hash(path)[:12] if kind == "lora" else sha256[:12]
    return AdapterFile(kind, name, uri, sha256, short)


def record(item: dict[str, Any], files: dict[str, AdapterFile]) -> str | None:
    """The item's adapters as metadata JSON: LoRAs with weights, embeddings, file hashes."""
    loras = parse_list(item.get("loras"))
    used = [n for n in (item.get("embeddings") or "").split(",") if n]
    if not loras and not used:
        return None
    out: dict[str, Any] = {}
    if loras:
        out["loras"] = [_entry(files[f"lora:{n}"], weight=w) for n, w in loras.items()]
    if used:
        out["embeddings"] = [_entry(files[f"embedding:{n}"]) for n in used]
    return json.dumps(out, sort_keys=True)


def recorded(item: dict[str, Any]) -> dict[str, Any]:
    """Renderer keyword arguments that load the adapters an item's metadata names
    (`loras`, `embeddings`, `adapter_files`), for reruns."""
    data = json.loads(item["adapters"]) if item.get("adapters") else {}
    out: dict[str, Any] = {"loras": {}, "embeddings": {}, "adapter_files": {}}
    for kind, entries in (
        ("lora", data.get("loras", [])),
        ("embedding", data.get("embeddings", [])),
    ):
        for e in entries:
            out[f"{kind}s"][e["name"]] = e["uri"]
            f = AdapterFile(kind, e["name"], e["uri"], e["sha256"], e["short_hash"])
            out["adapter_files"][f"{kind}:{e['name']}"] = f
    return out


def _entry(f: AdapterFile, **extra: Any) -> dict[str, Any]:
    return {"name": f.name, "uri": f.uri, "sha256": f.sha256, "short_hash": f.short, **extra}


# ---------------------------------------------------------------------------------------
# The render actor's side (torch, diffusers, peft).


def _peft_name(name: str) -> str:
    """A LoRA name as a PEFT adapter name (module keys cannot hold '.' or spaces)."""
    return "sdb_" + re.sub(r"\W", "_", name) + "_" + hashlib.sha1(name.encode()).hexdigest()[:6]


class Adapters:
    """Every LoRA and embedding of the job, loaded once into the actor's pipelines.

    Modules shared between pipelines (a UNet, a text encoder) get each adapter once.
    `activate(pipe, key)` switches a pipeline to an item's LoRAs (`set_adapters`), or
    turns LoRA off for items without any.
    """

    def __init__(
        self,
        pipes: list[Any],
        loras: dict[str, str],
        embeddings: dict[str, str],
        storage: dict[str, Any] | None = None,
    ):
        self.loads = 0
        self.failed: dict[str, str] = {}  # LoRA name → why it did not load here
        self.pipes = [p for p in dict.fromkeys(pipes) if hasattr(p, "load_lora_weights")]
        self._loaded: set[tuple[int, str]] = set()  # (id(module), adapter)
        self.paths: dict[str, tuple[str, Path]] = {}  # `kind:name` → (uri, local file)
        for name, uri in sorted(embeddings.items()):
            self.paths[f"embedding:{name}"] = (uri, resolve(uri, storage))
            self._load_embedding(name, self.paths[f"embedding:{name}"][1])
        for name, uri in sorted(loras.items()):
            try:
                self.paths[f"lora:{name}"] = (uri, resolve(uri, storage))
                self._load_lora(name, self.paths[f"lora:{name}"][1])
            except Exception as err:  # noqa: BLE001 - items naming it fail, the rest render
                self.failed[name] = f"LoRA {name!r} ({uri}) did not load: {err}"

    def files(self, known: dict[str, AdapterFile]) -> dict[str, AdapterFile]:
        """`known` (hashed by the driver) plus what this actor loaded beyond it."""
        out = dict(known)
        for key, (uri, path) in self.paths.items():
            if key not in out:
                kind, _, name = key.partition(":")
                out[key] = describe(kind, name, uri, path)
        return out

    def _load_lora(self, name: str, path: Path) -> None:
        pipe0 = self.pipes[0]
        state, alphas, metadata = pipe0.lora_state_dict(str(path), return_lora_metadata=True)
        adapter = _peft_name(name)
        for pipe in self.pipes:
            if (id(pipe.unet), adapter) not in self._loaded:
                pipe.load_lora_into_unet(
                    dict(state),
                    network_alphas=alphas,
                    unet=pipe.unet,
                    adapter_name=adapter,
                    metadata=metadata,
                    _pipeline=pipe,
                )
                self._loaded.add((id(pipe.unet), adapter))
            for attr in ("text_encoder", "text_encoder_2"):
                encoder = getattr(pipe, attr, None)
                if encoder is None or (id(encoder), adapter) in self._loaded:
                    continue
                prefix = attr
                if any(k.startswith(f"{prefix}.") for k in state):
                    pipe.load_lora_into_text_encoder(
                        dict(state),
                        network_alphas=alphas,
                        text_encoder=encoder,
                        prefix=prefix,
                        adapter_name=adapter,
                        metadata=metadata,
                        _pipeline=pipe,
                    )
                self._loaded.add((id(encoder), adapter))
        self.loads += 1

    def _load_embedding(self, name: str, path: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        done: set[tuple[int, int]] = set()  # (tokenizer, text encoder) pairs loaded
        for pipe in self.pipes:
            pairs = [
                ("tokenizer", "text_encoder", "clip_l"),
                ("tokenizer_2", "text_encoder_2", "clip_g"),
            ]
            for tok_attr, enc_attr, key in pairs:
                tokenizer, encoder = getattr(pipe, tok_attr, None), getattr(pipe, enc_attr, None)
                if tokenizer is None or encoder is None or (id(tokenizer), id(encoder)) in done:
                    continue  # shared with a pipeline loaded earlier
                done.add((id(tokenizer), id(encoder)))
                # A name the tokenizer already holds is diffusers' error, not skipped.
                vectors = tensors[key] if key in tensors else next(iter(tensors.values()))
                pipe.load_textual_inversion(
                    vectors, token=name, tokenizer=tokenizer, text_encoder=encoder
                )
        self.loads += 1

    def activate(self, pipe: Any, key: str | None) -> None:
        """Switch `pipe` to the LoRAs of `key` (an `adapter_key`), or LoRA off for None.

        Set on every call: pipelines share modules, so another pipeline's switch may
        have moved this one's UNet (a switch costs microseconds to milliseconds)."""
        chosen = parse_list(key)
        broken = [self.failed[n] for n in chosen if n in self.failed]
        if broken:
            raise UserError("; ".join(broken))
        if not self._loaded or not hasattr(pipe, "set_adapters"):
            if chosen:
                raise UserError(f"LoRAs {key}: this pipeline has no LoRA loaded")
            return
        if chosen:
            pipe.enable_lora()
            pipe.set_adapters([_peft_name(n) for n in chosen], list(chosen.values()))
        else:
            pipe.disable_lora()

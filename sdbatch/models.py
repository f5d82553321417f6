"""Checkpoints: locate them, hash their weights, load pipelines once, build schedulers.

A checkpoint is a diffusers folder (local path) or a hub id already in the local HF
cache; both load through `from_pretrained(..., local_files_only=True)`. Heavy imports
happen inside functions so the CLI can import this module cheaply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

# name → (diffusers class, config overrides). Built from the checkpoint's own scheduler
# config, so betas and timestep spacing follow the model, as in A1111/diffusers docs.
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# Pipeline class per mode; txt2img and img2img share one set of components.
PIPELINE_CLASSES = {
    "txt2img": "StableDiffusionPipeline",
    "img2img": "StableDiffusionImg2ImgPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
    "depth2img": "StableDiffusionDepth2ImgPipeline",
}


class ModelError(Exception):
    """A checkpoint that cannot be used; the message names it and says why."""


def quiet_libraries() -> None:
    """Keep per-step bars and repeated library warnings out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "diffusers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*CPU autocast.*")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def resolve_checkpoint(ref: str) -> Path:
    """The local folder of a checkpoint: a path as-is, or a hub id from the HF cache."""
    path = Path(ref)
    # A folder that exists wins over a hub id of the same spelling, as in from_pretrained.
    if path.is_absolute() or ref.startswith(".") or path.is_dir():
        if not path.exists():
            raise ModelError(f"model {ref}: folder not found")
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"model {ref}: no model_index.json (not a diffusers pipeline folder; "
                "convert single-file checkpoints with diffusers first)"
            )
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any lookup failure means "not available offline"
        raise ModelError(
            f"model {ref}: not a local folder and not in the local Hugging Face cache "
            f"({type(err).__name__}); download it first or give a path"
        ) from None


def check_checkpoint(ref: str) -> str | None:
    """A problem with a checkpoint reference, without importing torch; None if usable."""
    try:
        resolve_checkpoint(ref)
    except ModelError as err:
        return str(err)
    return None


def weights_sha256(ref: str) -> str:
    """Content hash of a checkpoint: every config and weight file, by relative path.

    Scheduler and tokenizer files are included because they change pixels too.
    """
    root = resolve_checkpoint(ref)
    h = hashlib.sha256()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for p in files:
        rel = p.relative_to(root).as_posix()
        if rel.endswith(".md"):
            continue
        h.update(rel.encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def make_scheduler(name: str, base_config: Any) -> Any:
    """A scheduler built from `base_config` (the checkpoint's), or None for 'default'."""
    import diffusers

    if name == "default":
        return None
    cls_name, overrides = SCHEDULER_CLASSES[name]
    cls = getattr(diffusers, cls_name)
    return cls.from_config(base_config, **overrides)


def resolve_device(device: str, dtype: str) -> tuple[str, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("compute.device is 'cuda' but no CUDA device is visible to this actor")
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


def load_pipeline(
    mode: str, ref: str, device: str, torch_dtype: Any, shared: dict[str, Any]
) -> Any:
    """Load the pipeline for `mode`, reusing components already in `shared` when compatible.

    `shared` maps checkpoint ref → a loaded pipeline; txt2img/img2img on the same
    checkpoint share every module via `from_pipe`, an inpaint checkpoint reuses the
    base VAE, text encoder and tokenizer when their weights are identical.
    """
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[mode])
    path = resolve_checkpoint(ref)
    if ref in shared:
        pipe = cls.from_pipe(shared[ref])
    else:
        reuse = _reusable_components(path, shared)
        kwargs: dict[str, Any] = {"torch_dtype": torch_dtype, "local_files_only": True, **reuse}
        if "safety_checker" not in reuse and _has_component(path, "safety_checker") is False:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(str(path), **kwargs).to(device)
        shared[ref] = pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _has_component(path: Path, name: str) -> bool:
    index = json.loads((path / "model_index.json").read_text())
    entry = index.get(name)
    return bool(entry) and entry[0] is not None


def _component_digest(path: Path, name: str) -> str | None:
    folder = path / name
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _reusable_components(path: Path, shared: dict[str, Any]) -> dict[str, Any]:
    """Modules of already loaded pipelines whose files are byte-identical to `path`'s."""
    reuse: dict[str, Any] = {}
    for other_ref, pipe in shared.items():
        other = resolve_checkpoint(other_ref)
        for name in ("vae", "text_encoder", "tokenizer"):
            if name in reuse:
                continue
            mine = _component_digest(path, name)
            if mine is not None and mine == _component_digest(other, name):
                reuse[name] = getattr(pipe, name)
    return reuse


def loaded_modules(pipes: dict[str, Any]) -> dict[str, int]:
    """Distinct torch modules held by the pipelines: name → object id (for tests/metrics)."""
    import torch

    found: dict[str, int] = {}
    for mode, pipe in pipes.items():
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                found[f"{mode}.{name}"] = id(module)
    return found

"""Checkpoints: locate them, tell their family, hash their weights, load pipelines once.

A checkpoint is a diffusers folder (local path) or a hub id already in the local HF
cache; both load through `from_pretrained(..., local_files_only=True)`. Its family
(SD 1.x, SD 2.x, SDXL) is read from `model_index.json` and the UNet config without
importing torch, so `sdbatch validate` can refuse a pipeline sdbatch cannot run. Heavy
imports happen inside functions so the CLI can import this module cheaply. The lone
models beside the pipelines (ControlNet, depth estimator) are `lone`'s.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import hub, singlefile
from .errors import UserError
from .modelcache import is_remote, local_copy, local_file
from .schedulers import SAMPLERS
from .weights import ModelHash, hash_folder, hash_single_file

# Pipeline class per family and mode. txt2img and img2img share one set of components;
# SDXL has no depth2img pipeline, so its fourth mode is a depth ControlNet on img2img.
PIPELINE_CLASSES = {
    "sd": {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
        "depth2img": "StableDiffusionDepth2ImgPipeline",
    },
    "sdxl": {
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
        "depth2img": "StableDiffusionXLControlNetImg2ImgPipeline",
    },
}
# The SDXL refiner's second stage per mode (diffusers' documented ensemble of experts).
REFINER_CLASSES = {
    "txt2img": "StableDiffusionXLImg2ImgPipeline",
    "img2img": "StableDiffusionXLImg2ImgPipeline",
    "inpaint": "StableDiffusionXLInpaintPipeline",
}

# model_index.json `_class_name` → family kind; anything else is refused by validate.
_KNOWN_CLASSES = {
    **{cls: "sd" for cls in PIPELINE_CLASSES["sd"].values()},
    **{cls: "sdxl" for cls in PIPELINE_CLASSES["sdxl"].values()},
    "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionXLControlNetPipeline": "sdxl",
}
SUPPORTED = (
    "SD 1.x/2.x (StableDiffusionPipeline, …Img2Img, …Inpaint, …Depth2Img) and SDXL "
    "(StableDiffusionXLPipeline, …Img2Img incl. the refiner, …Inpaint)"
)
# Modules that may be shared between pipelines when their files are byte-identical.
SHAREABLE = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


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


_storage: dict[str, Any] | None = None


def use_storage(options: dict[str, Any] | None) -> None:
    """S3 options (endpoint, region, retries) for `s3://` checkpoints in this process."""
    global _storage
    _storage = options


_layouts: dict[str, str] = {}


def use_layouts(models: dict[str, Any] | None) -> None:
    """`models.config` of the job (`ModelsSpec.layouts`): single-file checkpoint → the
    diffusers folder, hub id or s3:// prefix giving its layout, in this process."""
    _layouts.clear()
    _layouts.update(models or {})


def layout_of(ref: str) -> str | None:
    """The layout `use_layouts` gave a single-file checkpoint, if any."""
    return _layouts.get(ref)


def resolve_file(ref: str) -> Path:
    """The local path of a single-file checkpoint: a path as-is, an `s3://` one copied
    into this node's cache, a hub one (`org/name/file.safetensors`, its URL) from the
    local HF cache or downloaded once into it."""
    if is_remote(ref):
        return local_file(ref, _storage)
    path = Path(ref)
    if path.is_file():
        return path
    if hub.split_file(ref):
        return hub.resolve_file(ref)
    raise UserError(f"model {ref}: file not found")


def resolve_checkpoint(ref: str, marker: str = "model_index.json") -> Path:
    """The local folder of a checkpoint: a path as-is, a hub id from the HF cache, or an
    `s3://` prefix copied once into this node's cache (`modelcache.local_copy`).

    `marker` is the file that makes the folder what it claims to be: `model_index.json`
    for a pipeline, `config.json` for a lone model (a ControlNet, a depth estimator).
    """
    if is_remote(ref):
        path = local_copy(ref, _storage)
        if not (path / marker).is_file():
            raise UserError(f"model {ref}: no {marker} under this prefix")
        return path
    path = Path(ref)
    if not hub.is_hub_id(ref):
        if not path.exists():
            raise UserError(f"model {ref}: folder not found")
        if not (path / marker).is_file():
            what = "a diffusers pipeline" if marker == "model_index.json" else "a model"
            raise UserError(
                f"model {ref}: no {marker} (not {what} folder; a single-file "
                "checkpoint is given as its .safetensors file)"
            )
        return path
    path = hub.resolve(ref)
    if not (path / marker).is_file():
        raise UserError(f"model {ref}: no {marker} in its hub snapshot ({path})")
    return path


def resolve_model_folder(ref: str) -> Path:
    """The folder of a pipeline (model_index.json) or of a lone model (config.json)."""
    try:
        return resolve_checkpoint(ref)
    except UserError:
        return resolve_checkpoint(ref, marker="config.json")


def check_checkpoint(ref: str) -> str | None:
    """A problem with a checkpoint reference, without importing torch; None if usable."""
    try:
        inspect_checkpoint(ref)
    except UserError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class Checkpoint:
    """What a pipeline folder (or single file) is, read from its JSON files (no torch)."""

    ref: str
    path: Path  # the diffusers folder; of a single file, the folder giving its layout
    pipeline_class: str
    family: str  # sd1 | sd2 | sdxl
    unet_in_channels: int
    has_text_encoder: bool  # the SDXL refiner has only text_encoder_2
    has_depth_estimator: bool
    has_safety_checker: bool
    file: Path | None = None  # a single-file checkpoint, loaded with from_single_file
    layout: str | None = None  # ... and where its layout came from (models.config or default)
    file_components: tuple[str, ...] = ()  # the components the single file provides

    @property
    def kind(self) -> str:
        """Key of PIPELINE_CLASSES: 'sd' (1.x and 2.x share pipeline classes) or 'sdxl'."""
        return "sdxl" if self.family == "sdxl" else "sd"


def read_json(path: Path, ref: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"model {ref}: cannot read {path.name}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"model {ref}: {path.name} is not a JSON object")
    return data


def inspect_checkpoint(ref: str) -> Checkpoint:
    """Family and layout of a pipeline checkpoint; UserError if sdbatch cannot run it."""
    if singlefile.is_single_file(ref):
        return _inspect_file(ref, _layouts.get(ref))
    return _inspect_folder(ref)


_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


@lru_cache(maxsize=64)
def _inspect_file(ref: str, config: str | None) -> Checkpoint:
    """A single file: its family from its tensor names, its layout from `config` (or the
    repository diffusers would use), which must be of the same family and channels."""
    try:
        info = singlefile.describe(resolve_file(ref))
    except singlefile.UserError as err:
        raise UserError(f"model {ref}: {err}") from None
    what = (  # "an": every family name starts with S ("es")
        f"{_FAMILY_NAMES[info.family]}{' refiner' if info.refiner else ''} single file "
        f"with a {info.unet_in_channels}-channel UNet"
    )
    layout_ref = config or info.default_config
    if layout_ref is None:
        raise UserError(
            f"model {ref}: an {what} has no default layout; set models.config for it "
            "(a diffusers folder or hub id of the same architecture)"
        )
    try:
        if hub.is_hub_id(layout_ref):
            hub.resolve(
                layout_ref, skip_weights_of=info.components
            )  # only its configs when downloaded: the file holds these weights
        layout = _inspect_folder(layout_ref)
    except UserError as err:
        source = "models.config" if config else "the default layout for such a file"
        hint = "" if config else "; or set models.config for it to a diffusers folder or hub id"
        raise UserError(
            f"model {ref}: an {what}; its layout (configs, tokenizers, scheduler) comes from "
            f"{source} {layout_ref}: {err}{hint}"
        ) from None
    refiner = layout.family == "sdxl" and not layout.has_text_encoder
    if (layout.family, layout.unet_in_channels, refiner) != (
        info.family,
        info.unet_in_channels,
        info.refiner,
    ):
        raise UserError(
            f"model {ref}: an {what}, but its layout {layout_ref} is "
            f"{_FAMILY_NAMES[layout.family]}{' refiner' if refiner else ''} with a "
            f"{layout.unet_in_channels}-channel UNet ({layout.pipeline_class}); set "
            "models.config for it to a diffusers folder of the same architecture"
        )
    return Checkpoint(
        ref=ref,
        path=layout.path,
        pipeline_class=layout.pipeline_class,
        family=info.family,
        unet_in_channels=info.unet_in_channels,
        has_text_encoder="text_encoder" in info.components,
        has_depth_estimator=layout.has_depth_estimator,
        has_safety_checker=False,  # from_single_file never loads one
        file=resolve_file(ref),
        layout=layout_ref,
        file_components=info.components,
    )


@lru_cache(maxsize=64)
def _inspect_folder(ref: str) -> Checkpoint:
    path = resolve_checkpoint(ref)
    index = read_json(path / "model_index.json", ref)
    cls = str(index.get("_class_name"))
    kind = _KNOWN_CLASSES.get(cls)
    if kind is None:
        raise UserError(
            f"model {ref}: pipeline class {cls} (model_index.json) is not supported; "
            f"sdbatch runs {SUPPORTED}"
        )
    if not _listed(index, "unet") or not (path / "unet" / "config.json").is_file():
        raise UserError(f"model {ref}: {cls} without a unet/ folder")
    unet = read_json(path / "unet" / "config.json", ref)
    if kind == "sdxl":
        family = "sdxl"
    else:
        # SD 2.x UNets use linear projections in their transformers; SD 1.x convolutions.
        family = "sd2" if unet.get("use_linear_projection") else "sd1"
    return Checkpoint(
        ref=ref,
        path=path,
        pipeline_class=cls,
        family=family,
        unet_in_channels=int(unet.get("in_channels", 4)),
        has_text_encoder=_listed(index, "text_encoder"),
        has_depth_estimator=_listed(index, "depth_estimator"),
        has_safety_checker=_listed(index, "safety_checker"),
    )


def family_of(ref: str) -> str | None:
    """The family of a checkpoint, or None where it cannot be inspected (plan-only use)."""
    try:
        return inspect_checkpoint(ref).family
    except UserError:
        return None


def _listed(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def model_hash(ref: str) -> ModelHash:
    """What a checkpoint loads, hashed per file, per component and combined (no torch).

    Only the files the pipeline reads count (`weights.loaded_files`): an unused file
    added or changed in the folder is not a change of weights; a loaded one is.
    Works for pipeline folders and for lone models (a ControlNet, a depth estimator).
    """
    try:
        if singlefile.is_single_file(ref) and singlefile.is_controlnet(resolve_file(ref)):
            from .lone import controlnet_file

            file, layout = controlnet_file(ref)
            return hash_single_file(file, layout, ("",))
        if singlefile.is_single_file(ref):
            checkpoint = inspect_checkpoint(ref)
            assert checkpoint.file is not None
            return hash_single_file(checkpoint.file, checkpoint.path, checkpoint.file_components)
        return hash_folder(resolve_model_folder(ref))
    except UserError as err:
        raise UserError(f"model {ref}: {err}") from None


def weights_sha256(ref: str) -> str:
    """The combined content hash of what `ref` loads (`model_sha256` in the metadata)."""
    return model_hash(ref).sha256


def pickle_problem(ref: str, field_name: str) -> str | None:
    """A message if `ref` would load pickled weights (.bin/.ckpt/.pt), else None."""
    try:
        pickled = model_hash(ref).pickled
    except UserError as err:
        return str(err)
    if not pickled:
        return None
    return (
        f"{field_name} {ref}: loads pickled weights ({', '.join(pickled[:3])}"
        f"{', ...' if len(pickled) > 3 else ''}); unpickling a .bin/.ckpt/.pt file can run "
        "arbitrary code. Convert it to .safetensors, or set models.allow_pickle: true if "
        "you trust where it came from"
    )


def make_scheduler(name: str, base_config: Any) -> Any:
    """A scheduler built from `base_config` (the checkpoint's), or None for 'default'."""
    import diffusers

    if name == "default":
        return None
    sampler = SAMPLERS[name]
    return getattr(diffusers, sampler.cls).from_config(base_config, **sampler.overrides)


def resolve_device(device: str, dtype: str) -> tuple[str, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("compute.device is 'cuda' but no CUDA device is visible to this actor")
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


def load_pipeline(
    mode: str,
    ref: str,
    device: str,
    torch_dtype: Any,
    shared: dict[str, Any],
    *,
    controlnet: Any = None,
    cls_name: str | None = None,
) -> Any:
    """Load the pipeline for `mode`, reusing components already in `shared` when compatible.

    `shared` maps checkpoint ref → a loaded pipeline; modes on the same checkpoint share
    every module via `from_pipe` (SDXL's depth2img adds `controlnet`), another checkpoint
    reuses the loaded VAE, text encoders and tokenizers whose files are byte-identical.
    `cls_name` overrides the family's class for `mode` (the refiner's second stage).
    """
    import diffusers

    checkpoint = inspect_checkpoint(ref)
    cls = getattr(diffusers, cls_name or PIPELINE_CLASSES[checkpoint.kind][mode])
    extra: dict[str, Any] = {"controlnet": controlnet} if controlnet is not None else {}
    if checkpoint.kind == "sdxl":
        # diffusers adds SDXL's invisible watermark whenever the `invisible-watermark`
        # package happens to be installed: pixels would then depend on a node's packages.
        # Off, always; a job that wants one applies it to the stored images.
        extra["add_watermarker"] = False
    if ref in shared:
        # from_pipe casts the new pipeline to float32 unless given a dtype, and with it
        # the modules it shares with the first one: an fp16 job with txt2img and img2img
        # would render every mode in fp32 (twice the memory), and differently from a
        # rerun that loads one mode.
        pipe = cls.from_pipe(shared[ref], torch_dtype=torch_dtype, **extra)
    elif checkpoint.file is not None:
        # The layout folder gives configs, tokenizers, the scheduler (and SD 2 depth's DPT);
        # from_single_file never loads a safety checker.
        pipe = cls.from_single_file(
            str(checkpoint.file),
            config=str(checkpoint.path),
            torch_dtype=torch_dtype,
            local_files_only=True,
            **_reusable_components(ref, shared),
            **extra,
        ).to(device)
        shared[ref] = pipe
    else:
        reuse = _reusable_components(ref, shared)
        kwargs: dict[str, Any] = {
            "torch_dtype": torch_dtype,
            "local_files_only": True,
            **reuse,
            **extra,
        }
        if checkpoint.kind == "sd" and not checkpoint.has_safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(str(checkpoint.path), **kwargs).to(device)
        shared[ref] = pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reusable_components(ref: str, shared: dict[str, Any]) -> dict[str, Any]:
    """Modules of already loaded pipelines whose loaded files are byte-identical to
    `ref`'s (per-component hashes, each file hashed once per content; a single file's
    components hash the file with their config, so they match only the same file)."""
    reuse: dict[str, Any] = {}
    mine = model_hash(ref).components
    for other_ref, pipe in shared.items():
        theirs = model_hash(other_ref).components
        for name in SHAREABLE:
            if name in reuse or getattr(pipe, name, None) is None:
                continue
            if mine.get(name) is not None and mine.get(name) == theirs.get(name):
                reuse[name] = getattr(pipe, name)
    return reuse


def loaded_modules(pipes: dict[str, Any]) -> dict[str, int]:
    """Torch modules held by the pipelines: 'mode.component' → object id (tests, metrics);
    equal ids are one module shared by several pipelines."""
    import torch

    found: dict[str, int] = {}
    for mode, pipe in pipes.items():
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                found[f"{mode}.{name}"] = id(module)
    return found

"""Single-file checkpoints (the A1111/Civitai `.safetensors` format), read without torch.

One file holds the UNet, the VAE and the text encoder(s) in the original (LDM) layout;
diffusers' `from_single_file` loads it with the *layout* of a diffusers folder: its
component configs, tokenizers and scheduler (and, for SD 2 depth, the DPT). sdbatch reads
the file's tensor names from the safetensors header (8 bytes of length, then JSON) to tell
its family and UNet input channels, then takes the layout from `models.config.<field>`
(a diffusers folder, hub id or `s3://` prefix) or, when none is given, from the hub
repository diffusers itself would pick for that family (`DEFAULT_CONFIGS`, resolved through
the local HF cache or downloaded when online), checked to be of the same family and
channels. The layout is hashed with the file: a changed scheduler config is a change.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UserError

SUFFIXES = (".safetensors", ".ckpt")
UNET = "model.diffusion_model."
_CONV_IN = UNET + "input_blocks.0.0.weight"

# (family, UNet input channels) → the hub repository whose layout diffusers' own
# `fetch_diffusers_config` uses for such a file (SD 2 depth added: diffusers has none).
DEFAULT_CONFIGS = {
    ("sd1", 4): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ("sd1", 9): "stable-diffusion-v1-5/stable-diffusion-inpainting",
    ("sd2", 4): "stabilityai/stable-diffusion-2-1",
    ("sd2", 9): "stabilityai/stable-diffusion-2-inpainting",
    ("sd2", 5): "stabilityai/stable-diffusion-2-depth",
    ("sdxl", 4): "stabilityai/stable-diffusion-xl-base-1.0",
    ("sdxl", 9): "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    ("sdxl-refiner", 4): "stabilityai/stable-diffusion-xl-refiner-1.0",
}


def is_single_file(ref: str) -> bool:
    return ref.lower().endswith(SUFFIXES)


# A ControlNet's conditioning embedding: in diffusers' names, in the original (LDM) names.
CONTROLNET_KEYS = ("controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight")


def is_controlnet(path: Path) -> bool:
    """A `.safetensors` file holding a ControlNet (diffusers or original layout, with or
    without the `control_model.` prefix), from its header."""
    if path.suffix.lower() != ".safetensors":
        return False
    names = tensor_shapes(path)
    return any(k.removeprefix("control_model.") in CONTROLNET_KEYS for k in names)


@dataclass(frozen=True)
class FileInfo:
    """What the tensor names of a single-file checkpoint say."""

    family: str  # sd1 | sd2 | sdxl
    refiner: bool  # SDXL refiner: OpenCLIP bigG alone
    unet_in_channels: int
    components: tuple[str, ...]  # the pipeline components the file provides

    @property
    def default_config(self) -> str | None:
        key = ("sdxl-refiner" if self.refiner else self.family, self.unet_in_channels)
        return DEFAULT_CONFIGS.get(key)


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name → shape, from the safetensors header (a few kB read, no torch); read
    once per file content (path, size, mtime) however many checks ask."""
    try:
        stat = path.stat()
    except OSError as err:
        raise UserError(f"not a readable .safetensors file ({err})") from None
    return dict(_header_shapes(str(path), stat.st_size, stat.st_mtime_ns))


@lru_cache(maxsize=64)
def _header_shapes(path: str, size: int, mtime_ns: int) -> dict[str, list[int]]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise UserError(f"not a readable .safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise UserError("not a readable .safetensors file (header is not an object)")
    return {
        name: list(entry.get("shape", []))
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


def pickled_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name → shape of a pickled `.ckpt`, read as diffusers loads it: torch's
    weights-only unpickler (tensors, numbers, lists and dicts; no code runs), memory-mapped
    where the file is in torch's zip format, the `state_dict` inside unwrapped. Whether
    such a file may be loaded at all is the spec's `models.allow_pickle` (checks.py)."""
    import pickle

    import torch

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle at all, or a pickle of other opcodes
            raise UserError("not a readable .ckpt file (not a torch checkpoint)") from None
        raise UserError(
            f"a .ckpt holding more than tensors is not loaded (it pickles {found[1]}, which "
            "would run code to load); convert it to .safetensors"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"not a readable .ckpt file ({type(err).__name__}: {err})") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"not a checkpoint: holds a {type(data).__name__}, not a state dict")
    return {str(k): list(v.shape) for k, v in data.items() if isinstance(v, torch.Tensor)}


def describe(path: Path) -> FileInfo:
    """Family, refiner-ness, UNet channels and provided components of a checkpoint file:
    a `.safetensors` file from its header (no torch), a pickled `.ckpt` through
    `pickled_shapes`."""
    ckpt = path.suffix.lower() == ".ckpt"
    shapes = pickled_shapes(path) if ckpt else tensor_shapes(path)
    names = list(shapes)

    def has(prefix: str) -> bool:
        return any(n.startswith(prefix) for n in names)

    if _CONV_IN not in shapes or len(shapes[_CONV_IN]) != 4:
        if has("down_blocks.") or has("text_model."):
            raise UserError(
                "holds diffusers-layout tensors of one model, not an original-layout "
                "checkpoint (model.diffusion_model.*); give its diffusers folder instead"
            )
        raise UserError(
            f"no UNet in the original layout ({_CONV_IN}); not a Stable Diffusion checkpoint"
        )
    in_channels = int(shapes[_CONV_IN][1])
    refiner = False
    if has("conditioner.embedders.1.model."):
        family, encoders = "sdxl", ["text_encoder", "text_encoder_2"]
    elif has("conditioner.embedders.0.model."):
        family, encoders, refiner = "sdxl", ["text_encoder_2"], True
    elif has("cond_stage_model.model."):
        family, encoders = "sd2", ["text_encoder"]
    elif has("cond_stage_model.transformer."):
        family, encoders = "sd1", ["text_encoder"]
    else:
        raise UserError(
            "no text encoder (cond_stage_model.* or conditioner.embedders.*); sdbatch runs "
            "SD 1.x, SD 2.x and SDXL checkpoints"
        )
    if not has("first_stage_model."):
        raise UserError("no VAE (first_stage_model.*) in the file")
    return FileInfo(family, refiner, in_channels, ("unet", "vae", *encoders))

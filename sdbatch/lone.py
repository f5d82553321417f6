"""Lone models beside the pipelines: SDXL's depth ControlNet and the DPT depth estimator
(checked without torch, loaded in the render actors).

A ControlNet is a diffusers folder (local, hub id, s3:// prefix) or one `.safetensors`
file in diffusers' layout, as SDXL ControlNets are shared, with its config from
`models.config.depth_controlnet` (or CONTROLNET_LAYOUT). Sources resolve as checkpoints'
do (`models`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from . import hub, singlefile
from .errors import UserError
from .models import layout_of, read_json, resolve_checkpoint, resolve_file, resolve_model_folder

# The layout of a single-file SDXL depth ControlNet without models.config.depth_controlnet.
CONTROLNET_LAYOUT = "diffusers/controlnet-depth-sdxl-1.0"


def check_controlnet(ref: str) -> str | None:
    """A problem with an SDXL depth ControlNet reference; None if usable."""
    try:
        if singlefile.is_single_file(ref):
            controlnet_file(ref)
            return None
        path = resolve_checkpoint(ref, marker="config.json")
        problem = _controlnet_config_problem(read_json(path / "config.json", ref))
        return f"models.depth_controlnet {ref}: {problem}" if problem else None
    except UserError as err:
        return str(err)


def _controlnet_config_problem(config: dict[str, Any]) -> str | None:
    cls = config.get("_class_name")
    if cls != "ControlNetModel":
        return f"config.json names {cls}, expected ControlNetModel"
    if config.get("addition_embed_type") != "text_time":
        return (
            "an SD 1.x/2.x ControlNet (no SDXL text_time embedding); an SDXL base needs an "
            "SDXL ControlNet"
        )
    return None


def controlnet_file(ref: str) -> tuple[Path, Path]:
    """(weights file, layout folder) of a single-file SDXL ControlNet: the file must hold
    diffusers-layout tensors (how SDXL ControlNets are shared as one file; diffusers
    cannot convert an SDXL one from the original layout), its config comes from
    models.config.depth_controlnet or CONTROLNET_LAYOUT, and the two must agree."""
    return _controlnet_file(ref, layout_of(ref))


@lru_cache(maxsize=16)
def _controlnet_file(ref: str, config: str | None) -> tuple[Path, Path]:
    where = f"models.depth_controlnet {ref}"
    file = resolve_file(ref)
    if file.suffix.lower() != ".safetensors":
        raise UserError(f"{where}: a single-file ControlNet is read from .safetensors only")
    try:
        shapes = singlefile.tensor_shapes(file)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    if not singlefile.is_controlnet(file):
        raise UserError(f"{where}: not a ControlNet (no controlnet_cond_embedding.* tensors)")
    if "controlnet_cond_embedding.conv_in.weight" not in shapes:
        raise UserError(
            f"{where}: a ControlNet in the original (LDM) layout; diffusers converts only "
            "SD 1.x/2.x ControlNets from it, so an SDXL base needs an SDXL ControlNet in "
            "diffusers' layout (one .safetensors file or its folder)"
        )
    if "add_embedding.linear_1.weight" not in shapes:
        raise UserError(
            f"{where}: an SD 1.x/2.x ControlNet (no SDXL text_time embedding); an SDXL base "
            "needs an SDXL ControlNet"
        )
    layout_ref = config or CONTROLNET_LAYOUT
    source = "models.config.depth_controlnet" if config else "the default layout"
    try:
        if hub.is_hub_id(layout_ref):
            hub.resolve(layout_ref, skip_weights_of=("",))  # its config; the file has the weights
        layout = resolve_checkpoint(layout_ref, marker="config.json")
        layout_config = read_json(layout / "config.json", layout_ref)
    except UserError as err:
        raise UserError(
            f"{where}: its config comes from {source} {layout_ref}: {err}"
            + ("" if config else "; or set models.config.depth_controlnet to a ControlNet folder")
        ) from None
    problem = _controlnet_config_problem(layout_config)
    if problem:
        raise UserError(f"{where}: its layout {layout_ref} ({source}): {problem}")
    expected = {  # tensor → (dimension, size): output channels, the text_time input width
        "conv_in.weight": (0, layout_config["block_out_channels"][0]),
        "controlnet_cond_embedding.conv_in.weight": (
            0,
            layout_config["conditioning_embedding_out_channels"][0],
        ),
        "add_embedding.linear_1.weight": (
            1,
            layout_config.get("projection_class_embeddings_input_dim"),
        ),
    }
    differs = [k for k, (dim, size) in expected.items() if shapes.get(k, [None, None])[dim] != size]
    differs += [k for k in _controlnet_weight_names(layout_config) if k not in shapes]
    if differs:
        raise UserError(
            f"{where}: its tensors do not fit the layout {layout_ref} ({source}): "
            f"{', '.join(differs[:3])}; set models.config.depth_controlnet to a ControlNet "
            "folder of the same architecture"
        )
    return file, layout


def _controlnet_weight_names(config: dict[str, Any]) -> list[str]:
    """A few tensors every ControlNet of this config has: one per down block output."""
    blocks = len(config["down_block_types"]) * (int(config["layers_per_block"]) + 1)
    return [f"controlnet_down_blocks.{i}.weight" for i in range(blocks)]


def depth_estimator_folders(ref: str) -> tuple[Path, Path]:
    """(model folder, image processor folder) of a depth estimator: a transformers DPT
    folder (e.g. Intel/dpt-hybrid-midas), or a depth2img pipeline's depth_estimator/."""
    path = resolve_model_folder(ref)
    if (path / "depth_estimator" / "config.json").is_file():
        return path / "depth_estimator", path / "feature_extractor"
    return path, path


def check_depth_estimator(ref: str) -> str | None:
    try:
        model, processor = depth_estimator_folders(ref)
    except UserError as err:
        return f"models.depth_estimator: {err}"
    if not (model / "config.json").is_file():
        return f"models.depth_estimator {ref}: no config.json (not a depth estimator)"
    if not (processor / "preprocessor_config.json").is_file():
        return f"models.depth_estimator {ref}: no preprocessor_config.json beside the model"
    return None


def load_controlnet(ref: str, device: str, torch_dtype: Any) -> Any:
    from diffusers import ControlNetModel

    if singlefile.is_single_file(ref):
        file, layout = controlnet_file(ref)
        model = ControlNetModel.from_single_file(
            str(file), config=str(layout), torch_dtype=torch_dtype, local_files_only=True
        )
        return model.to(device)
    path = resolve_checkpoint(ref, marker="config.json")
    return ControlNetModel.from_pretrained(
        str(path), torch_dtype=torch_dtype, local_files_only=True
    ).to(device)


def load_depth_estimator(ref: str, device: str) -> tuple[Any, Any]:
    """(DPT model, image processor) in float32: depth maps are min-max normalised, and a
    small DPT's depths can underflow in fp16."""
    import torch
    from transformers import AutoImageProcessor, DPTForDepthEstimation

    model_dir, processor_dir = depth_estimator_folders(ref)
    model = DPTForDepthEstimation.from_pretrained(
        str(model_dir), torch_dtype=torch.float32, local_files_only=True
    )
    processor = AutoImageProcessor.from_pretrained(str(processor_dir), local_files_only=True)
    return model.to(device).eval(), processor

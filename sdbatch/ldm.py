"""A diffusers pipeline folder written as one original-layout (LDM) `.safetensors` file.

This is the A1111/Civitai single-file format that `from_single_file` reads: the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.`, the text encoder(s) under
`cond_stage_model.transformer.` (SD 1.x, CLIP), `cond_stage_model.model.` (SD 2.x,
OpenCLIP) or SDXL's `conditioner.embedders.0.transformer.` (CLIP) and
`conditioner.embedders.{1,0}.model.` (OpenCLIP bigG of the base, of the refiner).

diffusers ships the reverse direction only (`single_file_utils.convert_ldm_*`), and its
scripts/convert_diffusers_to_original_*.py hardcode the real models' block counts. Here the
index arithmetic follows the folder's own UNet and VAE configs, so the tiny test models
export too; `to_original` checks every tensor by converting the result back with
diffusers' own converters (a round trip that must give the same tensors, bit for bit).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import UserError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _load(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(f"{folder}: expected one .safetensors weights file, found {len(files)}")
    return load_file(str(files[0]))


def _rename_first(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_original(sd: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    per = int(config["layers_per_block"]) + 1  # LDM blocks per diffusers block (+ sampler)
    ups = config["up_block_types"]
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda b, j, r: f"input_blocks.{b * per + j + 1}.0.{_rename_first(r, _RESNET)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda b, j, r: f"input_blocks.{b * per + j + 1}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.()(.+)",
         lambda b, _, r: f"input_blocks.{(b + 1) * per}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.()(.+)",
         lambda i, _, r: f"middle_block.{2 * i}.{_rename_first(r, _RESNET)}"),
        (r"mid_block\.attentions\.(0)\.()(.+)", lambda _, __, r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda b, j, r: f"output_blocks.{b * per + j}.0.{_rename_first(r, _RESNET)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda b, j, r: f"output_blocks.{b * per + j}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.()(.+)",
         lambda b, _, r: f"output_blocks.{b * per + per - 1}."
         f"{2 if 'CrossAttn' in ups[b] else 1}.conv.{r}"),
    ]  # fmt: skip
    out = {}
    for key, tensor in sd.items():
        out[UNET + _map(key, fixed, rules, "unet")] = tensor
    return out


def vae_to_original(sd: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    last = len(config["up_block_types"]) - 1  # LDM numbers the decoder's blocks backwards
    shortcut = {"conv_shortcut": "nin_shortcut"}
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"encoder.down.{i}.block.{j}.{_rename_first(r, shortcut)}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.()(.+)",
         lambda i, _, r: f"encoder.down.{i}.downsample.{r}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda e, i, r: f"{e}.mid.block_{int(i) + 1}.{_rename_first(r, shortcut)}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.()(.+)",
         lambda e, _, r: f"{e}.mid.attn_1.{_rename_first(r, _VAE_ATTENTION)}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"decoder.up.{last - i}.block.{j}.{_rename_first(r, shortcut)}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.()(.+)",
         lambda i, _, r: f"decoder.up.{last - i}.upsample.{r}"),
    ]  # fmt: skip
    out = {}
    for key, tensor in sd.items():
        new = _map(key, DIFFUSERS_TO_LDM_MAPPING["vae"], rules, "vae")
        if ".mid.attn_1." in new and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[VAE + new] = tensor
    return out


def clip_to_original(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    """transformers' CLIP text model as LDM stores it (HF names under a prefix)."""
    return {prefix + _with_text_model(k): v for k, v in sd.items()}


def open_clip_to_original(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    """transformers' CLIP text model in OpenCLIP's names: fused q/k/v (`in_proj`),
    `resblocks`, `ln_final`, a transposed `text_projection` matrix."""
    import torch

    sd = {_with_text_model(k): v for k, v in sd.items()}
    fixed = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, tensor in sd.items():
        if key in fixed:
            out[prefix + fixed[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            layer, rest = m.groups()
            base = f"{prefix}transformer.resblocks.{layer}."
            if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                fused.setdefault(f"{base}attn.in_proj_{q[2]}", {})[q[1]] = tensor
            else:
                out[base + _rename_first(rest, _CLIP_LAYER)] = tensor
        else:
            raise UserError(f"text encoder: no OpenCLIP name for {key}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _with_text_model(key: str) -> str:
    # transformers >= 5.6 saves CLIPTextModel without its `text_model.` wrapper.
    if key.startswith("text_model.") or key.startswith("text_projection"):
        return key
    return "text_model." + key


def _map(key: str, fixed: dict[str, str], rules: list, what: str) -> str:
    if key in fixed:
        return fixed[key]
    for pattern, build in rules:
        if m := re.fullmatch(pattern, key):
            a, b, rest = m.groups()
            return build(int(a) if a.isdigit() else a, int(b) if b.isdigit() else b, rest)
    raise UserError(f"{what}: no original-layout name for {key}")


def to_original(folder: str | Path) -> dict[str, Any]:
    """The state dict of a diffusers SD 1.x / 2.x / SDXL pipeline folder in LDM layout,
    checked against diffusers' own conversion back."""
    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text())
    unet_config = json.loads((root / "unet" / "config.json").read_text())
    vae_config = json.loads((root / "vae" / "config.json").read_text())
    sdxl = index["_class_name"].startswith("StableDiffusionXL")
    encoders: dict[str, tuple[str, Any]] = {}  # component → (prefix, converter)
    if sdxl:
        if (root / "text_encoder").is_dir() and index.get("text_encoder", [None])[0]:
            encoders["text_encoder"] = ("conditioner.embedders.0.transformer.", clip_to_original)
            encoders["text_encoder_2"] = ("conditioner.embedders.1.model.", open_clip_to_original)
        else:  # the refiner: OpenCLIP bigG alone, as the first embedder
            encoders["text_encoder_2"] = ("conditioner.embedders.0.model.", open_clip_to_original)
    elif unet_config.get("use_linear_projection"):  # SD 2.x: OpenCLIP ViT-H
        encoders["text_encoder"] = ("cond_stage_model.model.", open_clip_to_original)
    else:
        encoders["text_encoder"] = ("cond_stage_model.transformer.", clip_to_original)

    weights = {name: _load(root / name) for name in ("unet", "vae", *encoders)}
    out = {
        **unet_to_original(weights["unet"], unet_config),
        **vae_to_original(weights["vae"], vae_config),
    }
    for name, (prefix, convert) in encoders.items():
        out.update(convert(weights[name], prefix))
    _check_round_trip(out, weights, unet_config, vae_config, encoders)
    return out


def _check_round_trip(
    original: dict[str, Any],
    weights: dict[str, dict[str, Any]],
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    encoders: dict[str, tuple[str, Any]],
) -> None:
    """diffusers' converters must give back exactly the tensors we started from."""
    from diffusers.loaders import single_file_utils as sfu

    back = {
        "unet": sfu.convert_ldm_unet_checkpoint(original, unet_config),
        "vae": sfu.convert_ldm_vae_checkpoint(original, vae_config),
    }
    for name, (prefix, convert) in encoders.items():
        if convert is clip_to_original:
            got = sfu.convert_ldm_clip_checkpoint(original)
        else:
            # Stand-in for the model diffusers passes: only its config's width is read.
            width = weights[name][_width_key(weights[name])].shape[-1]
            stub = type("Stub", (), {"config": type("C", (), {"hidden_size": width})()})()
            got = sfu.convert_open_clip_checkpoint(stub, original, prefix=prefix)
        back[name] = {
            (k if k in weights[name] else k.removeprefix("text_model.")): v for k, v in got.items()
        }
    for name, sd in weights.items():
        got = back[name]
        missing = sorted(set(sd) - set(got))
        wrong = [k for k in sd if k in got and not _same(sd[k], got[k])]
        if missing or wrong:
            raise UserError(
                f"{name}: export does not round-trip through diffusers "
                f"(missing {missing[:3]}, different {wrong[:3]})"
            )


def _width_key(sd: dict[str, Any]) -> str:
    return next(k for k in sd if k.endswith("embeddings.position_embedding.weight"))


def _same(a: Any, b: Any) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def write_original(folder: str | Path, dest: str | Path) -> Path:
    """Write `folder` as one LDM-layout `.safetensors` file (deterministic bytes)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in sorted(to_original(folder).items())}
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.partial")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(dest)
    return dest

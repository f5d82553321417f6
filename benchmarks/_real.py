"""Real-size architectures with random weights, for throughput and memory at model scale.

The tiny test models say nothing about where time goes inside a call of an 860 M-parameter
UNet. These are SD 1.5's real component configs (UNet `block_out_channels=(320, 640, 1280,
1280)`, `cross_attention_dim=768`; the VAE; CLIP ViT-L/14's text encoder), seeded random
weights, the tiny models' tokenizer and SD 1.5's scheduler config, saved as a diffusers
folder under benchmarks/out/models/ (built once, ~4 GB; not shipped, not used by tests).
Pixels are noise; every FLOP is the real model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import MODELS

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


def sd15(dest: Path | None = None) -> Path:
    """benchmarks/out/models/sd15-real: SD 1.5's architecture, random weights."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdbatch import tiny

    dest = dest or MODELS / "sd15-real"
    if (dest / "model_index.json").is_file():
        return dest
    tokenizer = tiny._tokenizer()
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                bos_token_id=vocab[tiny.BOS],
                eos_token_id=vocab[tiny.EOS],
                pad_token_id=vocab[tiny.EOS],
                **CLIP_L,
            )
        )
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        scheduler=tiny._scheduler(tiny.SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tiny._save(pipe, dest, "model_index.json")
    return dest


# SDXL base 1.0 / refiner 1.0 UNet configs (the published unet/config.json values).
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_REFINER_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "block_out_channels": (384, 768, 1536, 1536),
    "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
    "transformer_layers_per_block": 4,
    "attention_head_dim": (6, 12, 24, 24),
    "cross_attention_dim": 1280,
    "projection_class_embeddings_input_dim": 2560,
}
OPENCLIP_BIGG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "vocab_size": 49408,
}


def parameter_counts() -> dict[str, int]:
    """Parameters per component of the real SD 1.5 and SDXL models, built on the meta
    device (no memory, no weights): what an actor holds, without downloading anything."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(module: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        sdxl_unet = UNet2DConditionModel(**SDXL_UNET)
        return {
            "sd15 unet": count(UNet2DConditionModel(**SD15_UNET)),
            "sd15 inpaint unet": count(UNet2DConditionModel(**{**SD15_UNET, "in_channels": 9})),
            "vae": count(AutoencoderKL(**SD15_VAE)),
            "clip-l text encoder": count(CLIPTextModel(CLIPTextConfig(vocab_size=49408, **CLIP_L))),
            "sdxl unet": count(sdxl_unet),
            "sdxl inpaint unet": count(UNet2DConditionModel(**{**SDXL_UNET, "in_channels": 9})),
            "sdxl refiner unet": count(UNet2DConditionModel(**SDXL_REFINER_UNET)),
            "sdxl depth controlnet": count(ControlNetModel.from_unet(sdxl_unet)),
            "openclip-bigG text encoder": count(
                CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))
            ),
        }


SDXL_REAL = ("sdxl-real", "sdxl-inpaint-real", "sdxl-refiner-real", "sdxl-controlnet-depth-real",
             "dpt-hybrid-real")  # fmt: skip
# Intel/dpt-hybrid-midas (SD 2 depth's estimator): ViT-B/16 on a BiT ResNet stem, 123 M.
DPT_HYBRID: dict[str, Any] = {
    "is_hybrid": True,
    "image_size": 384,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "backbone_out_indices": [2, 5, 8, 11],
    "backbone_featmap_shape": [1, 1024, 24, 24],
    "neck_hidden_sizes": [256, 512, 768, 768],
    "reassemble_factors": [1, 1, 1, 0.5],
    "readout_type": "project",
}


def sdxl_set(dest: Path | None = None) -> dict[str, Path]:
    """benchmarks/out/models/{SDXL_REAL}: SDXL base 1.0, its 9-channel inpainting UNet, the
    refiner, a full-size depth ControlNet (`from_unet`) and a DPT-hybrid depth estimator, at
    their real sizes, random weights stored in fp16 (~22 GB; built once, ~3 min on 2 cores).

    The three pipelines hold the same VAE and text encoders (the same tensors saved three
    times, so byte-identical files, as the published checkpoints' are): an actor that shares
    them loads them once. Built in fp16 (PyTorch's default dtype switched while the modules
    are made), one component at a time: building peaks at ~10 GB, not the 40 GB of fp32."""
    import gc

    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        DPTConfig,
        DPTForDepthEstimation,
    )

    from sdbatch import tiny

    root = dest or MODELS
    paths = {name: root / name for name in SDXL_REAL}
    markers = {name: "config.json" if name.endswith(("-depth-real", "dpt-hybrid-real"))
               else "model_index.json" for name in SDXL_REAL}  # fmt: skip
    if all((paths[n] / markers[n]).is_file() for n in SDXL_REAL):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    vocab = tiny._tokenizer().get_vocab()
    ids = {"bos_token_id": vocab[tiny.BOS], "eos_token_id": vocab[tiny.EOS],
           "pad_token_id": vocab[tiny.EOS]}  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            shared = {
                "vae": AutoencoderKL(**SD15_VAE, scaling_factor=0.13025, force_upcast=True),
                "text_encoder_2": CLIPTextModelWithProjection(
                    CLIPTextConfig(**{**OPENCLIP_BIGG, **ids})
                ),
                "tokenizer_2": tiny._tokenizer(),
                "scheduler": tiny._scheduler(tiny.SDXL_SCHEDULER),
            }
            text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **CLIP_L, **ids))
            first = {"text_encoder": text, "tokenizer": tiny._tokenizer()}

            def save(name: str, obj: Any) -> None:
                if not (paths[name] / markers[name]).is_file():
                    tiny._save(obj, paths[name], markers[name])

            unet = UNet2DConditionModel(**SDXL_UNET)
            save("sdxl-real", StableDiffusionXLPipeline(unet=unet, **first, **shared))
            save("sdxl-controlnet-depth-real", ControlNetModel.from_unet(unet))
            del unet
            gc.collect()
            unet = UNet2DConditionModel(**{**SDXL_UNET, "in_channels": 9})
            save("sdxl-inpaint-real", StableDiffusionXLInpaintPipeline(
                unet=unet, **first, **shared, requires_aesthetics_score=False))  # fmt: skip
            del unet
            gc.collect()
            unet = UNet2DConditionModel(**SDXL_REFINER_UNET)
            save("sdxl-refiner-real", StableDiffusionXLImg2ImgPipeline(
                unet=unet, text_encoder=None, tokenizer=None, **shared,
                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False))  # fmt: skip
            del unet
            gc.collect()
            torch.set_default_dtype(default)  # the estimator stays fp32, as sdbatch runs it
            dpt = DPTForDepthEstimation(DPTConfig(**DPT_HYBRID)).eval()
            save("dpt-hybrid-real", _with_processor(dpt))
    finally:
        torch.set_default_dtype(default)
    return paths


class _with_processor:  # noqa: N801 - a save_pretrained shim, used like a model
    """A DPT and its image processor saved into one folder, as the hub's DPT repos are."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def save_pretrained(self, folder: Path, **kwargs: Any) -> None:
        from sdbatch import tiny

        self.model.save_pretrained(folder, **kwargs)
        processor = tiny._depth_processor()
        processor.size = {"height": DPT_HYBRID["image_size"], "width": DPT_HYBRID["image_size"]}
        processor.save_pretrained(folder)


if __name__ == "__main__":
    import sys
    import time

    t = time.perf_counter()
    built = sdxl_set() if sys.argv[1:] == ["sdxl"] else {"sd15-real": sd15()}
    for name, path in built.items():
        print(name, path)
    print(f"{time.perf_counter() - t:.0f} s")

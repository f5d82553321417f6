"""Tiny, randomly initialised Stable Diffusion pipelines, built offline for tests and benchmarks.

Each variant is a real diffusers pipeline (UNet, VAE, CLIP text encoder(s) and tokenizer(s),
scheduler; plus a DPT depth estimator for `depth`) with tiny shapes and seeded random weights,
saved in diffusers layout. It therefore loads through `from_pretrained(path,
local_files_only=True)`, the same code path as a real checkpoint, and exercises the real
pipeline code; only the pictures are meaningless. Rebuilding gives byte-identical files.

    base                   StableDiffusionPipeline (SD 1.5 style)
    inpaint                StableDiffusionInpaintPipeline (9-channel UNet)
    depth                  StableDiffusionDepth2ImgPipeline (+ DPT depth estimator)
    sd2-v                  StableDiffusionPipeline, SD 2.1 style: v-prediction, OpenCLIP-like
    sdxl                   StableDiffusionXLPipeline (two text encoders)
    sdxl-inpaint           StableDiffusionXLInpaintPipeline (9-channel UNet)
    sdxl-refiner           StableDiffusionXLImg2ImgPipeline (text_encoder_2 only, aesthetic score)
    sdxl-controlnet-depth  a lone ControlNetModel for the sdxl UNet (config.json + weights)

The three SDXL pipelines hold byte-identical vae, text_encoder_2, tokenizer_2 and scheduler
files (sdxl and sdxl-inpaint also text_encoder and tokenizer), as the real ones share them.

    build_tiny("/tmp/tiny")  ->  /tmp/tiny/base, /tmp/tiny/inpaint, ...: one folder per variant,
                                 /tmp/tiny/base.safetensors, ...: SINGLE_FILES as one file each

To add a variant, write one function returning an unsaved pipeline (or a lone model, listed in
`_MODELS`) and register it in `_BUILDERS`.

Longer than our ~500-line guide on purpose: the component builders, the shapes and seeds they
share, and the variants built from them change together (a shape is tied to another model's),
and byte-identical rebuilds depend on all of them at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Shapes shared by every variant. Text width 32 ties the CLIP hidden size to the UNet's
# cross-attention width; a 4-block VAE gives latents at 1/8 of the image size, like real SD
# (a 2-block VAE makes 4× larger latents and renders 5–10× slower).
TEXT_WIDTH = 32
# SDXL's second text encoder (OpenCLIP bigG in the real model) is wider than its first, as
# in the real one (1280 vs 768): diffusers' single-file loader tells the two encoders of an
# SDXL checkpoint apart by their width, so equal widths would load one in place of the other.
TEXT2_WIDTH = 40
LATENT_CHANNELS = 4
UNET_SAMPLE_SIZE = 8  # latent side; × the VAE's factor 8 = the pipelines' default, 64 px
DEPTH_IMAGE_SIZE = 32  # the DPT processor resizes every input to this square
MODEL_MAX_LENGTH = 77  # CLIP's context; SD pipelines pad and truncate prompts to it
TIME_ID_WIDTH = 8  # SDXL embeds each micro-conditioning number (size, crop, score) this wide
SEED = 0

# Stable Diffusion 1.5's scheduler_config.json, verbatim. `clip_sample` is not a PNDM
# argument: `from_config` keeps it as a hidden key, so swapping in DDIM/Euler/DPM++ via
# `X.from_config(pipe.scheduler.config)` behaves as it does on a real checkpoint.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# Stable Diffusion 2.1's (768 px, v-prediction) scheduler_config.json, verbatim.
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# SDXL base 1.0's scheduler_config.json, verbatim (the refiner's is the same). Like SD 1.5's,
# it carries keys Euler does not take (clip_sample, set_alpha_to_one, skip_prk_steps,
# sample_max_value), kept as hidden keys for schedulers swapped in with `from_config`.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# Byte-level BPE merges of frequent English letter pairs and short words, in priority
# order, so that prompts take about one token per 2–3 letters instead of one per letter.
# A merge "a b" creates the symbol "ab"; both halves must already be symbols (a byte,
# a byte + "</w>" for a word's last letter, or the result of an earlier merge).
_MERGES = (
    "t h", "th e</w>", "o f</w>", "a n", "an d</w>", "i n", "in g</w>", "t o</w>", "i s</w>",
    "o n</w>", "a t</w>", "i n</w>", "i t</w>", "a n</w>", "o r</w>", "t h</w>", "e r</w>",
    "e d</w>", "e s</w>", "l y</w>", "h e", "e r", "r e", "o n", "e n", "n d", "t i", "o r",
    "t e", "e s", "a t", "a l", "a r", "s t", "n t", "n g", "s e", "h a", "a s", "o u", "i o",
    "l e", "v e", "c o", "m e", "d e", "h i", "r i", "r o", "i c", "n e", "e a", "r a", "c e",
    "l i", "c h", "l l", "b e", "m a", "s i", "o m", "u r", "p h", "o t", "o w", "a i", "g h",
    "gh t</w>", "u n", "o o",
)  # fmt: skip
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (printable bytes map to
    themselves, the rest to chars from U+0100 up), in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _vocab() -> dict[str, int]:
    """CLIP's vocabulary layout in miniature: bytes, bytes + "</w>", merges, then BOS, EOS."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    for merge in _MERGES:
        left, right = merge.split(" ")
        # Guards edits to _MERGES: BPE silently ignores a merge it cannot reach.
        assert left in tokens and right in tokens, f"merge {merge!r}: a half is not a symbol yet"
        assert left + right not in tokens, f"merge {merge!r} duplicates a symbol"
        tokens.append(left + right)
    return {token: i for i, token in enumerate([*tokens, BOS, EOS])}


@contextmanager
def _seeded(seed: int = SEED) -> Iterator[None]:
    """Seed torch's CPU RNG for one component without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------
# Components. Each is seeded on its own, so e.g. the VAE is identical in every variant
# (components are share-compatible across pipelines) and does not depend on build order.


def _unet(in_channels: int, cross_attention_dim: int = TEXT_WIDTH, **extra: Any) -> Any:
    """diffusers' own test UNet (`get_dummy_components`); 9 channels for inpainting
    (latent + masked-image latent + mask), 5 for depth (latent + depth). `extra` adds the
    UNet2DConditionModel arguments of SD 2.x and SDXL."""
    from diffusers import UNet2DConditionModel

    with _seeded():
        return UNet2DConditionModel(
            sample_size=UNET_SAMPLE_SIZE,
            in_channels=in_channels,
            out_channels=LATENT_CHANNELS,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=32,
            **extra,
        )


# SD 2.x's and SDXL's UNet style: linear projections into and out of the transformer blocks,
# and heads per block (diffusers calls the head count `attention_head_dim`, for history).
_SD2_UNET: dict[str, Any] = {"use_linear_projection": True, "attention_head_dim": (2, 4)}


def _sdxl_unet(in_channels: int, *, refiner: bool = False) -> Any:
    """diffusers' SDXL test UNet at our sizes. Its "text_time" micro-conditioning embeds six
    numbers (original size, crop top-left, target size) plus text_encoder_2's pooled
    projection; the refiner's embeds five (an aesthetic score instead of the target size) and
    it cross-attends to text_encoder_2 alone instead of both encoders' concatenated states."""
    time_ids = 5 if refiner else 6
    return _unet(
        in_channels,
        cross_attention_dim=TEXT2_WIDTH if refiner else TEXT_WIDTH + TEXT2_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_ID_WIDTH,
        projection_class_embeddings_input_dim=time_ids * TIME_ID_WIDTH + TEXT2_WIDTH,
        transformer_layers_per_block=(1, 1),
        **_SD2_UNET,
    )


# Std of the seeded weights given to a tiny ControlNet's zero convs (see `_controlnet`).
ZERO_CONV_STD = 0.05


def _controlnet() -> Any:
    """A ControlNet started the way diffusers trains one: a copy of the sdxl UNet's encoder
    (`from_unet`, so the two configs cannot drift apart), plus a conditioning embedding of four
    widths, i.e. three stride-2 convs, so it shrinks the control image by 8 like our VAE.

    Two inits are redone, or the control image would not reach the output and no test could
    tell whether it is used. ControlNet zero-initialises the convs through which it feeds the
    UNet (one per down block, the mid block's, the conditioning embedding's last): a fresh
    one is an exact no-op; they get seeded normal weights at ZERO_CONV_STD. And PyTorch's
    default conv init shrinks a signal about 3x per conv, so after the embedding's seven the
    image is lost under the biases: flipping a gradient control image moved a 64 px, 2-step
    img2img output by 0.004 levels of 255 on average; with He init, by 4 (at most 37)."""
    import torch
    from diffusers import ControlNetModel

    with _seeded():
        controlnet = ControlNetModel.from_unet(
            _sdxl_unet(LATENT_CHANNELS), conditioning_embedding_out_channels=(16, 32, 48, 64)
        )
        embedding = controlnet.controlnet_cond_embedding
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        with torch.no_grad():
            for conv in [embedding.conv_in, *embedding.blocks]:
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            for conv in [*zero_convs, embedding.conv_out]:
                torch.nn.init.normal_(conv.weight, std=ZERO_CONV_STD)
    return controlnet.eval()


def _vae(**extra: Any) -> Any:
    """`extra`: config values that differ between model families (`_SDXL_VAE`). They do not
    touch the weights, so every variant's VAE has the same ones."""
    from diffusers import AutoencoderKL

    with _seeded():
        return AutoencoderKL(
            sample_size=UNET_SAMPLE_SIZE * 8,  # pixels; only read when tiling
            in_channels=3,
            out_channels=3,
            latent_channels=LATENT_CHANNELS,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=32,
            **extra,
        )


# SDXL's VAE config: its latents are scaled differently from SD 1.x/2.x's, and it overflows
# in fp16, so its pipelines decode in fp32 (`force_upcast`, stated as the real config does).
_SDXL_VAE: dict[str, Any] = {"scaling_factor": 0.13025, "force_upcast": True}


def _tokenizer() -> Any:
    """A CLIP tokenizer on the hand-written vocabulary (nothing to download)."""
    from transformers import CLIPTokenizer

    # Annotated as list[str], but the tokenizers BPE model only takes (left, right) pairs.
    merges: Any = [tuple(m.split(" ")) for m in _MERGES]
    return CLIPTokenizer(
        vocab=_vocab(),
        merges=merges,
        model_max_length=MODEL_MAX_LENGTH,  # the default is "unlimited": SD would not pad
    )


def _text_encoder(
    hidden_act: str = "quick_gelu",
    *,
    projection: bool = False,
    seed: int = SEED,
    width: int = TEXT_WIDTH,
) -> Any:
    """SD 1.x's CLIP ViT-L/14 in miniature; OpenCLIP's (SD 2.x, SDXL's second encoder) uses
    "gelu". `projection` adds the projected pooled output that SDXL also conditions on."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = _vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        projection_dim=width,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    model = CLIPTextModelWithProjection if projection else CLIPTextModel
    with _seeded(seed):
        return model(config).eval()


def _scheduler(config: dict[str, Any]) -> Any:
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def _depth_estimator() -> Any:
    """A 2-layer ViT DPT (not the hybrid ResNet one SD 2 depth ships, which needs more
    config for nothing we test). One readout per layer; reassemble factors 2, 1 make the
    neck's feature maps differ by exactly ×2, as the fusion stage requires.

    At the default init (std 0.02) the signal fades through the neck and head to depths
    of ~1e-9, which underflow to all zeros in fp16; depth2img then normalises by
    max − min = 0 and renders NaN. Std 0.1 gives depths of ~0.01–0.1."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        image_size=DEPTH_IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        backbone_out_indices=(0, 1),
        reassemble_factors=(2, 1),
        neck_hidden_sizes=(16, 32),
        fusion_hidden_size=16,
        use_auxiliary_head=False,
        initializer_range=0.1,
    )
    with _seeded():
        return DPTForDepthEstimation(config).eval()


def _depth_processor() -> Any:
    # The PIL backend by name: `DPTImageProcessor` needs torchvision (which breaks CPU
    # torch) and otherwise falls back to this class with a warning. Naming it keeps the
    # saved model_index.json the same with or without torchvision.
    from transformers import DPTImageProcessorPil

    return DPTImageProcessorPil(
        size={"height": DEPTH_IMAGE_SIZE, "width": DEPTH_IMAGE_SIZE},
        keep_aspect_ratio=False,
    )


def _sd_parts(unet_in_channels: int) -> dict[str, Any]:
    return {
        "unet": _unet(unet_in_channels),
        "vae": _vae(),
        "text_encoder": _text_encoder(),
        "tokenizer": _tokenizer(),
        "scheduler": _scheduler(SD15_SCHEDULER),
    }


def _sdxl_shared() -> dict[str, Any]:
    """What all three SDXL pipelines hold alike, as the real base, inpainting and refiner
    checkpoints do. The second encoder gets its own seed: with the first one's, it would be
    the first encoder's weights again plus a projection, and a swap of the two would go
    unseen."""
    return {
        "vae": _vae(**_SDXL_VAE),
        "text_encoder_2": _text_encoder("gelu", projection=True, seed=SEED + 1, width=TEXT2_WIDTH),
        "tokenizer_2": _tokenizer(),
        "scheduler": _scheduler(SDXL_SCHEDULER),
    }


# ---------------------------------------------------------------------------------------
# Variants: one function each, returning an unsaved pipeline.

_NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _base() -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**_sd_parts(LATENT_CHANNELS), **_NO_SAFETY)


def _inpaint() -> Any:
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(**_sd_parts(2 * LATENT_CHANNELS + 1), **_NO_SAFETY)


def _depth() -> Any:
    from diffusers import StableDiffusionDepth2ImgPipeline

    return StableDiffusionDepth2ImgPipeline(
        **_sd_parts(LATENT_CHANNELS + 1),
        depth_estimator=_depth_estimator(),
        feature_extractor=_depth_processor(),
    )


def _sd2_v() -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=_unet(LATENT_CHANNELS, **_SD2_UNET),
        vae=_vae(),
        text_encoder=_text_encoder("gelu"),
        tokenizer=_tokenizer(),
        scheduler=_scheduler(SD21_SCHEDULER),
        **_NO_SAFETY,
    )


def _sdxl() -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        unet=_sdxl_unet(LATENT_CHANNELS),
        text_encoder=_text_encoder(),
        tokenizer=_tokenizer(),
        **_sdxl_shared(),
        force_zeros_for_empty_prompt=True,
    )


def _sdxl_inpaint() -> Any:
    from diffusers import StableDiffusionXLInpaintPipeline

    return StableDiffusionXLInpaintPipeline(
        unet=_sdxl_unet(2 * LATENT_CHANNELS + 1),
        text_encoder=_text_encoder(),
        tokenizer=_tokenizer(),
        **_sdxl_shared(),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )


def _sdxl_refiner() -> Any:
    """As the real refiner: no first text encoder, an aesthetic score among the time ids,
    and an empty negative prompt encoded rather than zeroed."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(
        unet=_sdxl_unet(LATENT_CHANNELS, refiner=True),
        text_encoder=None,
        tokenizer=None,
        **_sdxl_shared(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


_BUILDERS: dict[str, Callable[[], Any]] = {
    "base": _base,
    "inpaint": _inpaint,
    "depth": _depth,
    "sd2-v": _sd2_v,
    "sdxl": _sdxl,
    "sdxl-inpaint": _sdxl_inpaint,
    "sdxl-refiner": _sdxl_refiner,
    "sdxl-controlnet-depth": _controlnet,
}
VARIANTS = tuple(_BUILDERS)

# Variants that are one model, not a pipeline: saved as config.json + weights, like a real
# ControlNet repository, and handed to a pipeline as a component (`controlnet=`).
_MODELS = frozenset({"sdxl-controlnet-depth"})


def _marker(name: str) -> str:
    """The file that save_pretrained writes first into a variant's folder."""
    return "config.json" if name in _MODELS else "model_index.json"


# ---------------------------------------------------------------------------------------


def _save(obj: Any, dest: Path, marker: str) -> None:
    """Save a pipeline or a lone model into a sibling temp folder, then rename: save_pretrained
    writes `marker` (model_index.json, a model's config.json) first, so only a finished folder
    may appear under the final name."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        obj.save_pretrained(staging, safe_serialization=True)
        # Real SD checkpoints ship tokenizers as vocab.json + merges.txt; transformers 5
        # saves tokenizer.json only. Writing both keeps the folder loadable either way.
        for tok in (staging / "tokenizer", staging / "tokenizer_2"):
            if not tok.is_dir():
                continue  # a lone model, or the SDXL refiner (no first tokenizer)
            vocab = json.dumps(_vocab(), ensure_ascii=False) + "\n"
            (tok / "vocab.json").write_text(vocab, encoding="utf-8")
            merges = "#version: 0.2\n" + "\n".join(_MERGES) + "\n"
            (tok / "merges.txt").write_text(merges, encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(staging, dest)
        except OSError:
            # A concurrent builder (e.g. another test worker) won the race: keep its copy.
            if not (dest / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the libraries' chatter while building (progress bars, and the "requires
    torchvision; falling back to *ImageProcessorPil" warnings that importing diffusers'
    pipelines triggers); restore the caller's settings after."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    d_level, t_level = d_logging.get_verbosity(), t_logging.get_verbosity()
    t_bars = t_logging.is_progress_bar_enabled()
    d_logging.set_verbosity_error()
    t_logging.set_verbosity_error()
    t_logging.disable_progress_bar()  # "Writing model shards" on every save
    try:
        yield
    finally:
        d_logging.set_verbosity(d_level)
        t_logging.set_verbosity(t_level)
        if t_bars:
            t_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------
# Adapters: LoRAs and textual-inversion embeddings for the tiny models, written into
# DIR/loras and DIR/embeddings (seeded: byte-identical on rebuild).

_LORA_TARGETS_UNET = ["to_k", "to_q", "to_v", "to_out.0"]
_LORA_TARGETS_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_RANK = 4


def _lora_state(module: Any, targets: list[str], seed: int, prefix: str) -> dict[str, Any]:
    """A PEFT LoRA on `module` with random A and B (the default B is zero: no effect),
    as `get_peft_model_state_dict` gives it, keys under `prefix.`; the module is left as
    it was."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=False, target_modules=targets
    )
    with _seeded(seed):
        # peft's own injection: transformers' `add_adapter` wants a newer peft than PyPI has.
        inject_adapter_in_model(config, module, adapter_name="tiny")
    state = get_peft_model_state_dict(module, adapter_name="tiny")
    return {f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in state.items()}


def _diffusers_lora(state: dict[str, Any]) -> dict[str, Any]:
    """PEFT keys → the layout `save_lora_weights` writes (`unet.….lora.down.weight`…)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(state)


def _kohya_lora(state: dict[str, Any]) -> dict[str, Any]:
    """PEFT keys → the kohya/A1111 layout (`lora_unet_…lora_down.weight`, `.alpha`)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    return convert_state_dict_to_kohya(state)


def _tiny_loras() -> dict[str, dict[str, Any]]:
    """file name → tensors. SD 1.x: four UNet LoRAs (diffusers layout) and one with a
    text-encoder part (kohya layout); SDXL: one for the UNet and both text encoders."""
    out = {}
    for i, name in enumerate(("sd-style", "sd-light", "sd-dark", "sd-ink")):
        out[name] = _diffusers_lora(
            _lora_state(_unet(LATENT_CHANNELS), _LORA_TARGETS_UNET, 100 + i, "unet")
        )
    detail = _lora_state(_unet(LATENT_CHANNELS), _LORA_TARGETS_UNET, 110, "unet")
    detail.update(_lora_state(_text_encoder(), _LORA_TARGETS_TEXT, 111, "text_encoder"))
    out["sd-detail-kohya"] = _kohya_lora(detail)
    sdxl = _lora_state(_sdxl_unet(LATENT_CHANNELS), _LORA_TARGETS_UNET, 120, "unet")
    sdxl.update(_lora_state(_text_encoder(), _LORA_TARGETS_TEXT, 121, "text_encoder"))
    text2 = _text_encoder("gelu", projection=True, seed=SEED + 1, width=TEXT2_WIDTH)
    sdxl.update(_lora_state(text2, _LORA_TARGETS_TEXT, 122, "text_encoder_2"))
    out["sdxl-style"] = _diffusers_lora(sdxl)
    return out


def _tiny_embeddings() -> dict[str, dict[str, Any]]:
    """file name → tensors: A1111's layout (`emb_params`, two vectors) for SD 1.x, and
    SDXL's (`clip_l`, `clip_g`: one vector per text encoder)."""
    import torch

    with _seeded(130):
        sd = {"emb_params": torch.randn(2, TEXT_WIDTH)}
    with _seeded(131):
        sdxl = {"clip_l": torch.randn(1, TEXT_WIDTH), "clip_g": torch.randn(1, TEXT2_WIDTH)}
    return {"sd-token": sd, "sdxl-token": sdxl}


def _write_adapters(out: Path, force: bool) -> None:
    from safetensors.torch import save_file

    for folder, build in (("loras", _tiny_loras), ("embeddings", _tiny_embeddings)):
        dest = out / folder
        if not force and (dest / ".complete").is_file():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        with _quiet():
            tensors = build()
        for name, state in tensors.items():
            tmp = dest / f".{name}.tmp"
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            tmp.chmod(0o644)
            os.replace(tmp, dest / f"{name}.safetensors")
        (dest / ".complete").write_text("")


# Pipelines also written as one original-layout file (`DIR/<variant>.safetensors`, the
# A1111/Civitai format), for `from_single_file`; exported from the saved folder (`ldm`).
# The ControlNet as one file too, in diffusers' layout: how SDXL ControlNets are shared.
SINGLE_FILES = (
    "base",
    "inpaint",
    "sd2-v",
    "sdxl",
    "sdxl-inpaint",
    "sdxl-refiner",
    "sdxl-controlnet-depth",
)
# Bumped whenever a variant's weights or layout change: an older DIR is rebuilt in full.
# 2: SDXL's second text encoder is wider than its first (TEXT2_WIDTH); single files.
TINY_VERSION = 2
_VERSION_FILE = ".sdbatch-tiny-version"


def build_tiny(
    out_dir: str | Path, variants: Iterable[str] = VARIANTS, *, force: bool = False
) -> dict[str, Path]:
    """Write out_dir/<variant> for each of `variants` (default: all of VARIANTS), and
    out_dir/<variant>.safetensors for those in SINGLE_FILES; skip what is already complete
    (a folder with model_index.json, or config.json for a lone model) unless force; a
    DIR built by another TINY_VERSION is cleared first. Returns {variant: path} (folders)."""
    from .ldm import write_original

    # 1. Check every name before building anything.
    names = list(dict.fromkeys(variants))
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown tiny variant(s) {unknown}; valid: {', '.join(VARIANTS)}")

    # 2. Build what is missing (or everything, with force); keep what is complete.
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    version = out / _VERSION_FILE
    if not version.is_file() or version.read_text().strip() != str(TINY_VERSION):
        for name in VARIANTS:  # built by an older sdbatch: none of them may be reused
            shutil.rmtree(out / name, ignore_errors=True)
            (out / f"{name}.safetensors").unlink(missing_ok=True)
        for folder in ("loras", "embeddings"):
            shutil.rmtree(out / folder, ignore_errors=True)
    paths = {}
    for name in names:
        dest = out / name
        if force or not (dest / _marker(name)).is_file():
            with _quiet():
                _save(_BUILDERS[name](), dest, _marker(name))
        single = out / f"{name}.safetensors"
        if name in SINGLE_FILES and (force or not single.is_file()):
            if name in _MODELS:  # a lone model: its weights file as it is
                tmp = single.with_name(f".{single.name}.partial")
                shutil.copyfile(dest / "diffusion_pytorch_model.safetensors", tmp)
                tmp.replace(single)
            else:
                with _quiet():
                    write_original(dest, single)
        paths[name] = dest
    _write_adapters(out, force)
    version.write_text(f"{TINY_VERSION}\n")
    return paths

"""Tiny, randomly initialised Stable Diffusion pipelines, built offline for tests and benchmarks.

Each variant is a real diffusers pipeline (UNet, VAE, CLIP text encoder and tokenizer, scheduler;
plus a DPT depth estimator for `depth`) with tiny shapes and seeded random weights, saved in
diffusers layout. It therefore loads through `from_pretrained(path, local_files_only=True)`,
the same code path as a real checkpoint, and exercises the real pipeline code; only the
pictures are meaningless. Rebuilding gives byte-identical weight files.

    build_tiny("/tmp/tiny")  ->  /tmp/tiny/base, /tmp/tiny/inpaint, /tmp/tiny/depth

To add a variant, write one function returning an unsaved pipeline and register it in
`_BUILDERS`.
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
LATENT_CHANNELS = 4
UNET_SAMPLE_SIZE = 8  # latent side; × the VAE's factor 8 = the pipelines' default, 64 px
DEPTH_IMAGE_SIZE = 32  # the DPT processor resizes every input to this square
MODEL_MAX_LENGTH = 77  # CLIP's context; SD pipelines pad and truncate prompts to it
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
def _seeded() -> Iterator[None]:
    """Seed torch's CPU RNG for one component without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


# ---------------------------------------------------------------------------------------
# Components. Each is seeded on its own, so e.g. the VAE is identical in every variant
# (components are share-compatible across pipelines) and does not depend on build order.


def _unet(in_channels: int) -> Any:
    """diffusers' own test UNet (`get_dummy_components`); 9 channels for inpainting
    (latent + masked-image latent + mask), 5 for depth (latent + depth)."""
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
            cross_attention_dim=TEXT_WIDTH,
            norm_num_groups=32,
        )


def _vae() -> Any:
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
        )


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


def _text_encoder() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = _vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        projection_dim=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",  # as in SD's CLIP ViT-L/14
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    with _seeded():
        return CLIPTextModel(config).eval()


def _scheduler() -> Any:
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(SD15_SCHEDULER)


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
        "scheduler": _scheduler(),
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


_BUILDERS: dict[str, Callable[[], Any]] = {"base": _base, "inpaint": _inpaint, "depth": _depth}
VARIANTS = tuple(_BUILDERS)


# ---------------------------------------------------------------------------------------


def _save(pipe: Any, dest: Path) -> None:
    """Save into a sibling temp folder, then rename: model_index.json is written first by
    save_pretrained, so only a finished folder may appear under the final name."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        # Real SD checkpoints ship the tokenizer as vocab.json + merges.txt; transformers 5
        # saves tokenizer.json only. Writing both keeps the folder loadable either way.
        tok = staging / "tokenizer"
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
            if not (dest / "model_index.json").is_file():
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


def build_tiny(
    out_dir: str | Path, variants: Iterable[str] = VARIANTS, *, force: bool = False
) -> dict[str, Path]:
    """Write out_dir/base, out_dir/inpaint, out_dir/depth; skip a variant whose folder already
    has model_index.json unless force. Returns {variant: path}."""
    # 1. Check every name before building anything.
    names = list(dict.fromkeys(variants))
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown tiny variant(s) {unknown}; valid: {', '.join(VARIANTS)}")

    # 2. Build what is missing (or everything, with force); keep what is complete.
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        dest = out / name
        if force or not (dest / "model_index.json").is_file():
            with _quiet():
                _save(_BUILDERS[name](), dest)
        paths[name] = dest
    return paths

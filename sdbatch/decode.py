"""From the pipeline's output to checked pixels: the one place sdbatch decodes latents
itself, and the checks that turn a decoded image into a failure row.

A pipeline decodes its own latents (VAE, safety checker, postprocessing), except where
float16 can overflow: the VAEs of SD 1.x/2.x may decode to NaN in float16 (SDXL
pipelines upcast their VAE themselves, `force_upcast`). For those the call stops at
latents and `call_decoding_in_fp32_on_overflow` does what the pipeline would have done
next, with the pipeline's own public parts, decoding again in float32 when float16
overflowed; every image decoded that way carries `UPCAST_NOTE` in its metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np

UPCAST_NOTE = "fp16 VAE decode overflowed to NaN; decoded again in float32"


def call_decoding_in_fp32_on_overflow(
    pipe: Any, kwargs: dict[str, Any], dtype: Any
) -> tuple[Any, bool]:
    """Run `pipe` to latents, then decode as diffusers does; decode again in float32
    if `dtype` (the pipeline's) overflows to NaN. Returns the pipeline output (images
    as float arrays, nsfw flags) and whether float32 was needed."""
    import torch
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    latents = pipe(**{**kwargs, "output_type": "latent"}).images
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    image = vae.decode(scaled, return_dict=False, generator=kwargs["generator"])[0]
    upcast = False
    if not torch.isfinite(image).all():
        vae.to(torch.float32)
        try:
            image = vae.decode(scaled.float(), return_dict=False, generator=kwargs["generator"])[0]
        finally:
            vae.to(dtype)
        upcast = True
    nsfw = None
    if "safety_checker" in pipe.components:  # SD 2 depth2img's pipeline has none
        # The decoded image lies where the pipeline computes (its execution device, also
        # under CPU offload), which is where its safety checker runs.
        image, nsfw = pipe.run_safety_checker(image, image.device, latents.dtype)
    denormalize = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
    images = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=denormalize)
    return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw), upcast


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] → uint8, exactly as diffusers' `numpy_to_pil` rounds."""
    return (images * 255).round().astype("uint8")


def checked_pixels(
    image: np.ndarray, nsfw: bool
) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """One decoded image (floats in [0, 1]) as uint8 pixels, or the failure it is
    (error type, message): NaN/inf anywhere, blacked out by the checkpoint's safety
    checker, or all black (a broken VAE, or an fp16 overflow nobody caught)."""
    if not np.isfinite(image).all():
        return None, ("NonFiniteOutput", "NaN/inf in the decoded image")
    if nsfw:
        return None, ("SafetyChecker", "the checkpoint's safety checker blacked out this image")
    pixels = to_uint8(image)
    if not pixels.any():
        return None, ("BlackImage", "decoded image is all black")
    return pixels, None

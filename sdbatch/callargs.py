"""What one pipeline call is given: its keyword arguments, built from its planned items.

A call's items share one batch key, so the call's settings (steps, guidance, size, the
mode's inputs' kind) come from its first item; per-image values (prompts, seeds, input
images) come from each item. A1111-syntax prompts are encoded here by compel (`prompts`),
once per item and pipeline, and padded to the call's longest prompt; the SDXL
refiner's second stage takes its arguments from the first stage's (`second_stage`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ItemFailure
from .plan import SIZE_CONDITIONING

# What the refiner's second stage takes from the first stage's arguments.
_REFINER_ARGS = (
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "generator",
    "output_type",
    *SIZE_CONDITIONING,
)


class CallArgs:
    """Builds pipeline arguments for one renderer (its dtype, device, depth estimator);
    keeps each pipeline's A1111 prompt encoder."""

    def __init__(self, torch_dtype: Any, device: str, depth_estimator: Any = None):
        self.torch_dtype = torch_dtype
        self.device = device
        self.depth_estimator = depth_estimator
        self.prompt_encoders: dict[int, Any] = {}

    def build(self, pipe: Any, padded: list[dict[str, Any]], sdxl: bool) -> dict[str, Any]:
        """The arguments of a call of `padded` (batch_size items) to `pipe`, with the items'
        LoRAs already active (they may change the text encoder)."""
        import torch

        first = padded[0]
        kwargs: dict[str, Any] = dict(
            **self.prompt_args(pipe, padded, sdxl),
            num_inference_steps=first["steps"],
            guidance_scale=first["guidance_scale"],
            generator=[torch.Generator("cpu").manual_seed(it["seed"]) for it in padded],
            output_type="np",
        )
        if sdxl:
            kwargs.update({c: tuple(first[c]) for c in SIZE_CONDITIONING})
        kwargs.update(self.mode_inputs(padded))
        return kwargs

    def second_stage(
        self, refiner: Any, kwargs: dict[str, Any], padded: list[dict[str, Any]], latents: Any
    ) -> dict[str, Any]:
        """The SDXL refiner's arguments: the first stage's, continuing from its latents at
        `refiner_switch` (A1111 prompts encoded again, for the refiner's text encoder)."""
        first = padded[0]
        second = {k: kwargs[k] for k in _REFINER_ARGS if k in kwargs}
        if first.get("prompt_syntax") == "a1111":
            second.update(self.prompt_args(refiner, padded, sdxl=True))
        second.update(image=latents, denoising_start=first["refiner_switch"])
        if first["mode"] == "inpaint":
            second.update(mask_image=kwargs["mask_image"], width=kwargs["width"])
            second.update(height=kwargs["height"], strength=kwargs["strength"])
        return second

    def prompt_args(self, pipe: Any, padded: list[dict[str, Any]], sdxl: bool) -> dict[str, Any]:
        """The call's prompt arguments: the texts (`plain`, diffusers encodes them), or
        A1111-syntax prompts encoded by compel (`prompts`), padded to one length."""
        negative: list[str] | None = [it["negative_prompt"] or "" for it in padded]
        # SDXL without any negative prompt: None, as a plain call without one; it then
        # uses zeros, not the encoded "" (force_zeros_for_empty_prompt).
        zeros = sdxl and not any(negative or []) and pipe.config.get("force_zeros_for_empty_prompt")
        if padded[0].get("prompt_syntax") != "a1111":
            if sdxl and not any(negative or []):
                negative = None
            return dict(prompt=[it["prompt"] for it in padded], negative_prompt=negative)
        import torch

        encoder = self._prompt_encoder(pipe)
        pairs = [self._encoded(pipe, it) for it in padded]
        length = max(max(p.embeds.shape[1], n.embeds.shape[1]) for p, n in pairs)
        args = {"prompt_embeds": torch.cat([encoder.pad(p.embeds, length) for p, _ in pairs])}
        if not zeros:
            args["negative_prompt_embeds"] = torch.cat(
                [encoder.pad(n.embeds, length) for _, n in pairs]
            )
        if encoder.pooled:
            args["pooled_prompt_embeds"] = torch.cat([p.pooled for p, _ in pairs])
            if not zeros:
                args["negative_pooled_prompt_embeds"] = torch.cat([n.pooled for _, n in pairs])
        return args

    def prompt_length(self, pipe: Any, item: dict[str, Any]) -> int:
        """An A1111-syntax item's encoded length (tokens, in 75-token chunks)."""
        positive, negative = self._encoded(pipe, item)
        return max(positive.embeds.shape[1], negative.embeds.shape[1])

    def _prompt_encoder(self, pipe: Any) -> Any:
        from .prompts import PromptEncoder

        if id(pipe) not in self.prompt_encoders:
            self.prompt_encoders[id(pipe)] = PromptEncoder(pipe, self.torch_dtype)
        return self.prompt_encoders[id(pipe)]

    def _encoded(self, pipe: Any, item: dict[str, Any]) -> tuple[Any, Any]:
        """An A1111-syntax item's (prompt, negative prompt) embeddings for `pipe`, encoded
        once per item (with the item's LoRAs active: they may change the text encoder)."""
        import torch

        cache = item.setdefault("_encoded", {})
        if id(pipe) not in cache:
            encoder = self._prompt_encoder(pipe)
            with torch.inference_mode():
                cache[id(pipe)] = (
                    encoder.encode(item["prompt"]),
                    encoder.encode(item["negative_prompt"] or ""),
                )
        return cache[id(pipe)]

    def mode_inputs(self, padded: list[dict[str, Any]]) -> dict[str, Any]:
        """The pipeline arguments that differ between the four modes."""
        import torch
        from PIL import Image

        first = padded[0]
        size = (first["width"], first["height"])
        if first["mode"] == "txt2img":
            return {"width": size[0], "height": size[1]}
        inputs: dict[str, Any] = {
            "image": [Image.frombytes("RGB", size, it["init_pixels"]) for it in padded],
            "strength": first["strength"],
        }
        if first["mode"] == "inpaint":
            inputs["mask_image"] = [Image.frombytes("L", size, it["mask_pixels"]) for it in padded]
            inputs.update(width=size[0], height=size[1])
        elif first["mode"] == "depth2img" and first.get("controlnet"):
            controls: dict[int, Any] = {}  # padding repeats the first item: estimate once
            for it in padded:
                if id(it) not in controls:
                    controls[id(it)] = self._control_image(it)
            inputs["control_image"] = [controls[id(it)] for it in padded]
            inputs["controlnet_conditioning_scale"] = first["controlnet_conditioning_scale"]
        elif first["mode"] == "depth2img" and first["depth_source"] == "provided":
            maps = [
                np.frombuffer(it["depth_pixels"], np.float32).reshape(size[1], size[0])
                for it in padded
            ]
            inputs["depth_map"] = torch.from_numpy(np.stack(maps))
        return inputs

    def _control_image(self, item: dict[str, Any]) -> Any:
        """The depth ControlNet's conditioning image (RGB, the item's size).

        A provided 8-bit depth map is used as it is, as a plain diffusers call given that
        image would; other maps are min-max scaled to 0..255. Without a map, depth is
        estimated as diffusers' SDXL depth ControlNet example does: DPT, bicubic resize to
        the image size, min-max normalised, replicated to 3 channels, truncated to uint8.
        Each image is estimated on its own, so its depth never depends on its batch.
        """
        import torch
        from PIL import Image

        width, height = item["width"], item["height"]
        if item["depth_source"] == "provided":
            values = np.frombuffer(item["depth_pixels"], np.float32).reshape(height, width)
            integral = bool((values == np.round(values)).all())
            if not (integral and values.min() >= 0 and values.max() <= 255):
                values = (values - values.min()) / (values.max() - values.min()) * 255.0
            gray = Image.fromarray(values.round().astype(np.uint8), "L")
            return gray.convert("RGB")
        assert self.depth_estimator is not None, "planned without models.depth_estimator"
        model, processor = self.depth_estimator
        init = Image.frombytes("RGB", (width, height), item["init_pixels"])
        pixel_values = processor(images=init, return_tensors="pt").pixel_values
        with torch.inference_mode():
            depth = model(pixel_values.to(self.device)).predicted_depth
        depth = torch.nn.functional.interpolate(
            depth.unsqueeze(1), size=(height, width), mode="bicubic", align_corners=False
        )
        low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
        high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
        if not torch.isfinite(depth).all() or bool((high == low).all()):
            raise ItemFailure(
                "FlatDepthMap", "estimated depth is constant; nothing to condition on"
            )
        depth = (depth - low) / (high - low)
        image = torch.cat([depth] * 3, dim=1).permute(0, 2, 3, 1).float().cpu().numpy()[0]
        return Image.fromarray((image * 255.0).clip(0, 255).astype(np.uint8))

"""The render stage: a Ray Data actor that holds the pipelines and renders batches.

`Renderer.__init__` loads every pipeline the job needs once; `__call__` takes a batch of
work items (a pyarrow table), groups them by batch key, and renders each group in
pipeline calls of exactly `batch_size` images, padding short groups with copies of their
first item. On CPU an image's bits depend on the batch size it was rendered in but not on
its neighbours, so padding makes every image a function of (item, batch size, threads)
only — which is what lets reruns and resumes reproduce it bit for bit.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
import traceback
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from . import __version__
from .adapters import record as record_adapters
from .adapters import recorded as recorded_adapters
from .errors import ItemFailure
from .plan import SIZE_CONDITIONING

# Decoded inputs from the prepare stage; consumed here, never copied into metadata.
IMAGE_INPUTS = (
    "init_image",
    "mask_image",
    "depth_map",
    "init_pixels",
    "mask_pixels",
    "depth_pixels",
)


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


def environment_fingerprint(device: str) -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    if device == "cuda":
        hardware = torch.cuda.get_device_name(0)
    else:
        hardware = _cpu_model()
    return {
        "sdbatch": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hardware": hardware,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] → uint8, exactly as diffusers' `numpy_to_pil` rounds."""
    return (images * 255).round().astype("uint8")


def models_of(item: dict[str, Any]) -> dict[str, Any]:
    """Renderer keyword arguments that load what one item needs (reruns, calibration)."""
    return {
        "models": {item["mode"]: item["model"]},
        "refiner": item.get("refiner"),
        "depth_controlnet": item.get("controlnet"),
        "depth_estimator": item.get("depth_estimator"),
        **recorded_adapters(item),
    }


# Item columns naming a checkpoint that shapes the image; each has a `<column>_sha256`
# in the metadata (the base model's is `model_sha256`).
MODEL_COLUMNS = ("model", "refiner", "controlnet", "depth_estimator")


def checkpoints_of(item: dict[str, Any]) -> dict[str, str]:
    """Column → checkpoint ref of every model that shaped the item's image."""
    return {column: item[column] for column in MODEL_COLUMNS if item.get(column)}


class Renderer:
    """Ray Data callable class: pipelines are loaded once per actor, reused per batch."""

    def __init__(
        self,
        *,
        models: dict[str, str],
        model_hashes: dict[str, str],
        batch_size: int,
        device: str = "auto",
        dtype: str = "auto",
        torch_threads: int = 1,
        prompt_overflow: str = "truncate",
        render_options: dict[str, bool] | None = None,
        warmup_sizes: list[tuple[str, int, int]] | None = None,
        refiner: str | None = None,
        depth_controlnet: str | None = None,
        depth_estimator: str | None = None,
        storage: dict[str, Any] | None = None,
        layouts: dict[str, str] | None = None,
        model_sources: dict[str, dict[str, Any]] | None = None,
        loras: dict[str, str] | None = None,
        embeddings: dict[str, str] | None = None,
        adapter_files: dict[str, Any] | None = None,
    ):
        from .modelcache import adopt as adopt_listings
        from .models import (
            REFINER_CLASSES,
            inspect_checkpoint,
            load_controlnet,
            load_depth_estimator,
            load_pipeline,
            quiet_libraries,
            resolve_device,
            use_layouts,
            use_storage,
        )

        quiet_libraries()
        use_storage(storage)  # s3:// checkpoints: copied into this node's cache first
        use_layouts(layouts)  # single-file checkpoints: the folders giving their layout
        adopt_listings(model_sources)  # ... as the driver listed them
        import torch

        # Ray sets OMP_NUM_THREADS=1 in workers; the thread count changes output bits on
        # CPU, so it is set explicitly and recorded with every image.
        torch.set_num_threads(torch_threads)
        self.torch_threads = torch_threads
        self.device, self.torch_dtype = resolve_device(device, dtype)
        self.dtype_name = str(self.torch_dtype).removeprefix("torch.")
        self.batch_size = batch_size
        self.prompt_overflow = prompt_overflow
        self.model_hashes = model_hashes
        self.render_options = dict(render_options or {})
        self.options_json = (
            json.dumps(self.render_options, sort_keys=True) if self.render_options else None
        )
        # 1. Pipelines per mode, sharing modules; SDXL depth2img adds the depth ControlNet.
        shared: dict[str, Any] = {}
        offload = bool(self.render_options.get("cpu_offload")) and self.device == "cuda"
        load_device = "cpu" if offload else self.device
        families = {mode: inspect_checkpoint(ref).family for mode, ref in models.items()}
        controlnet = None
        if depth_controlnet and families.get("depth2img") == "sdxl":
            controlnet = load_controlnet(depth_controlnet, load_device, self.torch_dtype)
        self.pipes = {
            mode: load_pipeline(
                mode,
                ref,
                load_device,
                self.torch_dtype,
                shared,
                controlnet=controlnet if mode == "depth2img" else None,
            )
            for mode, ref in models.items()
        }
        # 2. The SDXL refiner's second stage per mode, sharing the VAE and text encoder 2.
        self.refiners = {}
        if refiner:
            self.refiners = {
                mode: load_pipeline(
                    mode, refiner, load_device, self.torch_dtype, shared, cls_name=cls_name
                )
                for mode, cls_name in REFINER_CLASSES.items()
                if families.get(mode) == "sdxl"
            }
        # 3. A depth estimator for SDXL depth2img rows without a depth map.
        self.depth_estimator = (
            load_depth_estimator(depth_estimator, self.device) if depth_estimator else None
        )
        # 4. LoRAs and embeddings, each loaded once; switched per pipeline call.
        from .adapters import AdapterFile, Adapters

        self.adapters = Adapters(list(self.pipes.values()), loras or {}, embeddings or {}, storage)
        self.adapter_files = self.adapters.files(
            {
                key: f if isinstance(f, AdapterFile) else AdapterFile(**f)
                for key, f in (adapter_files or {}).items()
            }
        )
        self.prompt_encoders: dict[int, Any] = {}
        self._apply_options(offload)
        # fp16 VAEs of SD 1.x/2.x can overflow to NaN; those batches are decoded again in
        # fp32. SDXL pipelines upcast their VAE themselves (`force_upcast`).
        self.vae_fallback = self.torch_dtype == torch.float16
        self.default_schedulers = {
            id(p): p.scheduler for p in [*self.pipes.values(), *self.refiners.values()]
        }
        self.env = json.dumps(environment_fingerprint(self.device), sort_keys=True)
        self.pipeline_calls = 0
        self.worker = f"{socket.gethostname()}:{_node_id()[:12]}:{os.getpid()}"
        if self.render_options.get("torch_compile"):
            for mode, width, height in warmup_sizes or []:
                self._warm_up(mode, width, height)

    def _apply_options(self, offload: bool) -> None:
        import torch

        seen: set[int] = set()
        for pipe in [*self.pipes.values(), *self.refiners.values()]:
            if id(pipe.unet) not in seen:
                seen.add(id(pipe.unet))
                if self.render_options.get("channels_last"):
                    pipe.unet.to(memory_format=torch.channels_last)
                if self.render_options.get("torch_compile"):
                    pipe.unet = torch.compile(pipe.unet)
            if self.render_options.get("vae_tiling"):
                pipe.vae.enable_tiling()
            if self.render_options.get("vae_slicing"):
                pipe.vae.enable_slicing()
            if offload:
                pipe.enable_model_cpu_offload()

    def _warm_up(self, mode: str, width: int, height: int) -> None:
        """Compile for this image size now, not inside the first real batch."""
        if mode != "txt2img":
            return  # input modes compile on their first batch (they need real images)
        pipe = self.pipes[mode]
        pipe(
            prompt=[""] * self.batch_size,
            num_inference_steps=1,
            width=width,
            height=height,
            output_type="latent",
        )

    # 1. Group the batch by render parameters; 2. render each group padded to
    # batch_size; 3. on a failed call, retry item by item to isolate the bad one.
    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.to_pylist()
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for item in items:
            groups[item["batch_key"]].append(item)
        out: list[dict[str, Any]] = []
        for group in groups.values():
            for same in self._by_prompt_length(group):
                for start in range(0, len(same), self.batch_size):
                    out.extend(self.render_batch(same[start : start + self.batch_size]))
        return pa.Table.from_pylist(out)

    def _by_prompt_length(self, group: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """A1111-syntax items split by encoded prompt length (75-token chunks): a call
        pads every prompt to its longest, so an item shares calls only with items of its
        own length and its image never depends on a neighbour's prompt."""
        first = group[0]
        if first.get("prompt_syntax") != "a1111" or first.get("status") == "failed":
            return [group]
        pipe = self.pipes[first["mode"]]
        by_length: dict[int, list[dict[str, Any]]] = defaultdict(list)
        try:
            self.adapters.activate(pipe, first.get("loras"))
            for item in group:
                by_length[self._prompt_length(pipe, item)].append(item)
        except Exception:  # noqa: BLE001 - render_batch isolates and reports the item
            return [group]
        return list(by_length.values())

    def render_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Render up to batch_size planned items of one batch key in one pipeline call.

        Returns one result row per item (ok or failed); never raises for a per-item problem.
        """
        ready, results = [], []
        for item in items:
            _fault_hook(item)
            if item.get("status") == "failed":  # the prepare stage already said why
                results.append(
                    self._failed(item, item["error_type"], item["error_message"], attempts=1)
                )
                continue
            try:
                item["prompt_truncated"] = self._check_prompt(item)
                ready.append(item)
            except ItemFailure as err:
                results.append(self._failed(item, err.error_type, str(err), attempts=1))
        if not ready:
            return results
        if ready[0]["mode"] != "txt2img" and ready[0]["strength"] == 0:
            return results + [self._unchanged(item) for item in ready]
        try:
            results.extend(self._call(ready))
        except Exception as err:  # noqa: BLE001 - isolate the item that broke the batch
            if len(ready) == 1:
                results.append(self._failed(ready[0], _error_type(err), _short(err), attempts=1))
            else:
                for item in ready:
                    try:
                        results.extend(self._call([item]))
                    except Exception as one:  # noqa: BLE001
                        results.append(
                            self._failed(item, _error_type(one), _short(one), attempts=2)
                        )
        return results

    def _check_prompt(self, item: dict[str, Any]) -> bool:
        if item.get("prompt_syntax") == "a1111":
            return False  # encoded in 75-token chunks: nothing is cut
        pipe = self.pipes[item["mode"]]
        # SDXL's two CLIP tokenizers split text alike; the first one that exists decides.
        tokenizer = pipe.tokenizer or getattr(pipe, "tokenizer_2", None)
        limit = tokenizer.model_max_length
        too_long = False
        for field in ("prompt", "negative_prompt"):
            n = len(tokenizer(item[field] or "", truncation=False).input_ids)
            if n > limit:
                if self.prompt_overflow == "fail":
                    raise ItemFailure(
                        "PromptTooLong",
                        f"{field} is {n} CLIP tokens, limit {limit} (prompt_overflow: fail)",
                    )
                too_long = True
        return too_long

    def _call_with_vae_fallback(self, pipe: Any, kwargs: dict[str, Any]) -> tuple[Any, bool]:
        """Run to latents, then decode as diffusers does; decode again in fp32 if fp16
        overflows to NaN. Returns the pipeline output and whether fp32 was needed."""
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
                image = vae.decode(
                    scaled.float(), return_dict=False, generator=kwargs["generator"]
                )[0]
            finally:
                vae.to(self.torch_dtype)
            upcast = True
        image, nsfw = pipe.run_safety_checker(image, pipe._execution_device, latents.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        images = pipe.image_processor.postprocess(
            image, output_type="np", do_denormalize=denormalize
        )
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw), upcast

    def render_alone(self, item: dict[str, Any], position: int = 0) -> dict[str, Any]:
        """Render one item in a call of `batch_size` images, at `position` (for reruns)."""
        try:
            item["prompt_truncated"] = self._check_prompt(item)
        except ItemFailure as err:
            return self._failed(item, err.error_type, str(err))
        if item["mode"] != "txt2img" and item["strength"] == 0:
            return self._unchanged(item)
        return self._call([item], position=min(position, self.batch_size - 1))[0]

    def _call(
        self, items: list[dict[str, Any]], position: int | None = None
    ) -> list[dict[str, Any]]:
        """One pipeline call of exactly batch_size images; padding copies items[0].

        `position` puts a single item at that slot (reruns); else items take the first slots.
        """
        import torch

        first = items[0]
        pipe = self.pipes[first["mode"]]
        sdxl = first.get("model_family") == "sdxl"
        padded = items + [first] * (self.batch_size - len(items))
        slots = list(range(len(items))) if position is None else [position]
        for item in items:
            _fault_hook(item, inside_call=True)
        pipe.scheduler = self._scheduler(pipe, first["scheduler"])
        try:
            self.adapters.activate(pipe, first.get("loras"))
        except ValueError as err:
            raise ItemFailure("AdapterError", str(err)) from None
        kwargs: dict[str, Any] = dict(
            **self._prompt_args(pipe, padded, sdxl),
            num_inference_steps=first["steps"],
            guidance_scale=first["guidance_scale"],
            generator=[torch.Generator("cpu").manual_seed(it["seed"]) for it in padded],
            output_type="np",
        )
        if sdxl:
            kwargs.update({c: tuple(first[c]) for c in SIZE_CONDITIONING})
        kwargs.update(self._mode_inputs(padded))
        started = time.perf_counter()
        upcast = False
        with torch.inference_mode():
            if first.get("refiner"):
                output = self._call_refined(pipe, kwargs, padded)
            elif self.vae_fallback and not sdxl:
                output, upcast = self._call_with_vae_fallback(pipe, kwargs)
            else:
                output = pipe(**kwargs)
        seconds = (time.perf_counter() - started) / len(items)
        self.pipeline_calls += 1
        call_id = f"{self.worker}#{self.pipeline_calls}"
        nsfw = getattr(output, "nsfw_content_detected", None) or [False] * len(padded)
        results = []
        for item, position in zip(items, slots, strict=True):
            image = output.images[position]
            if not np.isfinite(image).all():
                results.append(
                    self._failed(item, "NonFiniteOutput", "NaN/inf in the decoded image")
                )
                continue
            pixels = to_uint8(image)
            if nsfw[position]:
                results.append(
                    self._failed(
                        item,
                        "SafetyChecker",
                        "the checkpoint's safety checker blacked out this image",
                    )
                )
                continue
            if not pixels.any():
                results.append(self._failed(item, "BlackImage", "decoded image is all black"))
                continue
            results.append(
                self._done(
                    item,
                    pixels,
                    position=position,
                    seconds=seconds,
                    scheduler=type(pipe.scheduler).__name__,
                    call_id=call_id,
                )
            )
        if upcast:
            for row in results:
                if row["status"] == "ok":
                    note = "fp16 VAE decode overflowed to NaN; decoded again in float32"
                    row["notes"] = "; ".join(filter(None, [row.get("notes"), note]))
        return results

    def _call_refined(self, pipe: Any, kwargs: dict[str, Any], padded: list[dict[str, Any]]) -> Any:
        """SDXL base then refiner, as diffusers documents the ensemble of experts: the base
        stops at `refiner_switch` of the schedule and hands its latents over; the refiner
        denoises the rest. Both stages draw from the same per-image generators."""
        first = padded[0]
        switch = first["refiner_switch"]
        latents = pipe(**{**kwargs, "output_type": "latent", "denoising_end": switch}).images
        refiner = self.refiners[first["mode"]]
        refiner.scheduler = self._scheduler(refiner, first["scheduler"])
        second = {k: kwargs[k] for k in _REFINER_ARGS if k in kwargs}
        if first.get("prompt_syntax") == "a1111":
            second.update(self._prompt_args(refiner, padded, sdxl=True))
        second.update(image=latents, denoising_start=switch)
        if first["mode"] == "inpaint":
            second.update(mask_image=kwargs["mask_image"], width=kwargs["width"])
            second.update(height=kwargs["height"], strength=kwargs["strength"])
        return refiner(**second)

    def _prompt_args(self, pipe: Any, padded: list[dict[str, Any]], sdxl: bool) -> dict[str, Any]:
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

    def _prompt_length(self, pipe: Any, item: dict[str, Any]) -> int:
        positive, negative = self._encoded(pipe, item)
        return max(positive.embeds.shape[1], negative.embeds.shape[1])

    def _mode_inputs(self, padded: list[dict[str, Any]]) -> dict[str, Any]:
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

    def _unchanged(self, item: dict[str, Any]) -> dict[str, Any]:
        """Strength 0 means 'keep the input': diffusers refuses 0 denoising steps, so the
        (prepared) init image is returned as is, and the metadata says so."""
        pixels = np.frombuffer(item["init_pixels"], np.uint8).reshape(
            item["height"], item["width"], 3
        )
        row = self._done(item, pixels.copy(), position=0, seconds=0.0, scheduler=None)
        row["notes"] = "; ".join(
            filter(None, [item.get("notes"), "strength 0: init image returned unchanged"])
        )
        return row

    def _scheduler(self, pipe: Any, name: str) -> Any:
        from .models import make_scheduler

        default = self.default_schedulers[id(pipe)]
        # Schedulers keep per-call state (timesteps, step index): build a fresh one per call.
        return make_scheduler(name, default.config) or type(default).from_config(default.config)

    def _common(self, item: dict[str, Any]) -> dict[str, Any]:
        row = {k: v for k, v in item.items() if k not in IMAGE_INPUTS and k[0] != "_"}
        row.update(
            **{
                f"{column}_sha256": self.model_hashes.get(item[column])
                if item.get(column)
                else None
                for column in MODEL_COLUMNS
            },
            batch_size=self.batch_size,
            torch_threads=self.torch_threads,
            device=self.device,
            dtype=self.dtype_name,
            env=self.env,
            worker=self.worker,
            render_options=self.options_json,
            prompt_truncated=bool(item.get("prompt_truncated", False)),
            adapters=record_adapters(item, self.adapter_files),
        )
        return row

    def _done(
        self,
        item: dict[str, Any],
        pixels: np.ndarray,
        *,
        position: int,
        seconds: float,
        scheduler: str | None,
        call_id: str | None = None,
    ) -> dict[str, Any]:
        row = self._common(item)
        row.update(
            status="ok",
            pixels=pixels.tobytes(),
            batch_position=position,
            render_seconds=seconds,
            scheduler_class=scheduler,
            call_id=call_id,
            error_type=None,
            error_message=None,
            attempts=1,
        )
        return row

    def _failed(
        self, item: dict[str, Any], error_type: str, message: str, attempts: int = 1
    ) -> dict[str, Any]:
        row = self._common(item)
        row.update(
            status="failed",
            pixels=None,
            batch_position=None,
            render_seconds=None,
            scheduler_class=None,
            call_id=None,
            error_type=error_type,
            error_message=message,
            attempts=attempts,
        )
        return row


def _node_id() -> str:
    try:
        import ray

        if not ray.is_initialized():  # reruns and calibration run outside Ray
            return "local"
        return ray.get_runtime_context().get_node_id() or "local"
    except Exception:  # noqa: BLE001 - outside Ray (reruns, calibration)
        return "local"


def _fault_hook(item: dict[str, Any], inside_call: bool = False) -> None:
    """Test-only fault injection, set through the SDBATCH_FAULT environment variable:

    `crash:ID:MARKER` kills this actor process at item ID once (MARKER is a file created
    on the first crash), `crashloop:ID` kills it every time, `hang:ID` blocks forever,
    `raise:ID` makes every pipeline call that contains ID raise (like a CUDA OOM would).
    """
    spec = os.environ.get("SDBATCH_FAULT")
    if not spec:
        return
    kind, _, rest = spec.partition(":")
    target, _, marker = rest.partition(":")
    if item["id"] != target or inside_call != (kind == "raise"):
        return
    if kind == "crash" and marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(17)
    if kind == "crashloop":
        os._exit(17)
    if kind == "hang":
        time.sleep(10**6)
    if kind == "raise":
        raise RuntimeError(f"injected failure for {target} (SDBATCH_FAULT)")


def _error_type(err: BaseException) -> str:
    return getattr(err, "error_type", None) or type(err).__name__


def _short(err: BaseException, limit: int = 500) -> str:
    text = f"{err}" or type(err).__name__
    if len(text) > limit:
        text = text[:limit] + "…"
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f" (at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last else ""
    return text + where


class BlockRenderer(Renderer):
    """The job's render actor: each Ray Data row is one packed planned block (`stream`).

    in_flight: the run's `stream.InFlight` actor, told which items this actor has in hand
    (so an item that kills the process every time can be found and failed).
    """

    def __init__(self, *, in_flight: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.in_flight = in_flight
        self.actor_id = ""
        if in_flight is not None:
            import ray

            self.actor_id = ray.get_runtime_context().get_actor_id() or ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .stream import per_block

        return per_block(self._block, batch)

    def _block(self, block: pa.Table) -> pa.Table:
        if self.in_flight is None:
            return super().__call__(block)
        import ray

        columns = [
            c for c in block.column_names if not pa.types.is_binary(block.schema.field(c).type)
        ]
        ray.get(self.in_flight.begin.remote(self.actor_id, block.select(columns).to_pylist()))
        out = super().__call__(block)
        self.in_flight.end.remote(self.actor_id)  # ordered before this actor's next begin
        return out

"""The render stage: pipelines loaded once per actor, planned items rendered to pixels.

`Renderer.render(items)` is the one way sdbatch renders: the job's Ray Data actor
(`BlockRenderer`, one planned block per call), `rerun` (one item, at the batch position
it was first rendered in) and `plan --calibrate` all go through it. Its items share one
batch key (the plan cuts homogeneous blocks); A1111-syntax items are split further by
encoded prompt length. Each pipeline call holds exactly `batch_size` images, padding a
short call with copies of its first item. On CPU an image's bits depend on the batch
size it was rendered in but not on its neighbours, so padding makes every image a
function of (item, batch size, threads) only — which is what lets reruns and resumes
reproduce it bit for bit.

A call's arguments are built in `callargs`; the decode step and the checks that make an
image a failure (NaN, safety checker, all black) are in `decode`.
"""

from __future__ import annotations

import json
import time
import traceback
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from .adapters import record as record_adapters
from .adapters import recorded as recorded_adapters
from .decode import UPCAST_NOTE, call_decoding_in_fp32_on_overflow, checked_pixels
from .errors import ItemFailure, UserError
from .fingerprint import environment_fingerprint, worker_name
from .write import failed_fields

# Decoded inputs from the prepare stage; consumed here, never copied into metadata.
IMAGE_INPUTS = (
    "init_image",
    "mask_image",
    "depth_map",
    "init_pixels",
    "mask_pixels",
    "depth_pixels",
)


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
    """The GPU state of one render actor: pipelines loaded once, then `render` per block."""

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
        from .callargs import CallArgs
        from .lone import load_depth_estimator
        from .modelcache import adopt as adopt_listings
        from .models import quiet_libraries, resolve_device, use_layouts, use_storage

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
        offload = bool(self.render_options.get("cpu_offload")) and self.device == "cuda"
        # 1. Pipelines per mode and the SDXL refiner's second stage, sharing modules.
        self._load_pipelines(models, refiner, depth_controlnet, "cpu" if offload else self.device)
        # 2. A depth estimator for SDXL depth2img rows without a depth map.
        self.depth_estimator = (
            load_depth_estimator(depth_estimator, self.device) if depth_estimator else None
        )
        # 3. LoRAs and embeddings, each loaded once; switched per pipeline call.
        self._load_adapters(loras, embeddings, adapter_files, storage)
        self.args = CallArgs(self.torch_dtype, self.device, self.depth_estimator)
        self._apply_options(offload)
        # fp16 VAEs of SD 1.x/2.x can overflow to NaN; those batches are decoded again in
        # fp32 (`decode`). SDXL pipelines upcast their VAE themselves (`force_upcast`).
        self.vae_fallback = self.torch_dtype == torch.float16
        self.default_schedulers = {
            id(p): p.scheduler for p in [*self.pipes.values(), *self.refiners.values()]
        }
        self.env = json.dumps(environment_fingerprint(self.device), sort_keys=True)
        self.pipeline_calls = 0
        self.worker = worker_name()
        if self.render_options.get("torch_compile"):
            for mode, width, height in warmup_sizes or []:
                self._warm_up(mode, width, height)

    def _load_pipelines(
        self, models: dict[str, str], refiner: str | None, depth_controlnet: str | None, device: str
    ) -> None:
        """`pipes` per mode (SDXL depth2img with the depth ControlNet) and `refiners` per
        mode (SDXL only), sharing every module they can."""
        from .lone import load_controlnet
        from .models import REFINER_CLASSES, inspect_checkpoint, load_pipeline

        shared: dict[str, Any] = {}
        families = {mode: inspect_checkpoint(ref).family for mode, ref in models.items()}
        controlnet = None
        if depth_controlnet and families.get("depth2img") == "sdxl":
            controlnet = load_controlnet(depth_controlnet, device, self.torch_dtype)
        self.pipes = {
            mode: load_pipeline(
                mode,
                ref,
                device,
                self.torch_dtype,
                shared,
                controlnet=controlnet if mode == "depth2img" else None,
            )
            for mode, ref in models.items()
        }
        # The refiner's second stage shares the base's VAE and text encoder 2.
        self.refiners = {}
        if refiner:
            self.refiners = {
                mode: load_pipeline(mode, refiner, device, self.torch_dtype, shared, cls_name=cls)
                for mode, cls in REFINER_CLASSES.items()
                if families.get(mode) == "sdxl"
            }

    def _load_adapters(
        self,
        loras: dict[str, str] | None,
        embeddings: dict[str, str] | None,
        adapter_files: dict[str, Any] | None,
        storage: dict[str, Any] | None,
    ) -> None:
        from .adapters import AdapterFile, Adapters

        self.adapters = Adapters(list(self.pipes.values()), loras or {}, embeddings or {}, storage)
        self.adapter_files = self.adapters.files(
            {
                key: f if isinstance(f, AdapterFile) else AdapterFile(**f)
                for key, f in (adapter_files or {}).items()
            }
        )

    def _apply_options(self, offload: bool) -> None:
        import torch

        # Per UNet, once; every pipeline holding it gets the same (compiled) module, or
        # img2img (sharing txt2img's UNet) ran uncompiled, and a rerun that loads img2img
        # alone compiled: other kernels, other bits.
        unets: dict[int, Any] = {}
        for pipe in [*self.pipes.values(), *self.refiners.values()]:
            if id(pipe.unet) not in unets:
                unet = pipe.unet
                if self.render_options.get("channels_last"):
                    unet.to(memory_format=torch.channels_last)
                if self.render_options.get("torch_compile"):
                    unet = torch.compile(unet)
                unets[id(pipe.unet)] = unet
            pipe.unet = unets[id(pipe.unet)]
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

    def render(
        self, items: list[dict[str, Any]], position: int | None = None
    ) -> list[dict[str, Any]]:
        """Render planned items of one batch key (a planned block) in pipeline calls of
        `batch_size` images; one result row per item, ok or failed. Never raises for one
        item's problem: a failed call is retried item by item to isolate the bad one.

        `position`: the slot of a single item in its call (a rerun puts it where it was
        first rendered; copies of it fill the other slots).
        """
        if len({item.get("batch_key") for item in items}) > 1:
            raise ValueError("Renderer.render takes items of one batch key (a planned block)")
        if position is not None and len(items) != 1:
            raise ValueError("a batch position is given for a single item only")
        slot = None if position is None else min(position, self.batch_size - 1)
        rows: list[dict[str, Any]] = []
        for same in self._by_prompt_length(items):
            for start in range(0, len(same), self.batch_size):
                rows.extend(self._render_call(same[start : start + self.batch_size], slot))
        return rows

    def _by_prompt_length(self, items: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """A1111-syntax items split by encoded prompt length (75-token chunks): a call
        pads every prompt to its longest, so an item shares calls only with items of its
        own length and its image never depends on a neighbour's prompt."""
        ok = [item for item in items if item.get("status") != "failed"]
        if not ok or ok[0].get("prompt_syntax") != "a1111":
            return [items]
        failed = [item for item in items if item.get("status") == "failed"]  # rows only
        pipe = self.pipes[ok[0]["mode"]]
        by_length: dict[int, list[dict[str, Any]]] = defaultdict(list)
        try:
            self.adapters.activate(pipe, ok[0].get("loras"))
            for item in ok:
                by_length[self.args.prompt_length(pipe, item)].append(item)
        except Exception:  # noqa: BLE001 - _render_call isolates and reports the item
            return [items]
        return [*by_length.values(), *([failed] if failed else [])]

    def _render_call(
        self, items: list[dict[str, Any]], position: int | None
    ) -> list[dict[str, Any]]:
        """At most batch_size items in one pipeline call: items the prepare stage or the
        prompt check failed get their failure row; the rest are rendered together, or
        one by one (a second attempt each) when their call fails."""
        ready, rows = [], []
        for item in items:
            if item.get("status") == "failed":  # the prepare stage already said why
                rows.append(self._failed(item, item["error_type"], item["error_message"]))
                continue
            try:
                item["prompt_truncated"] = self._check_prompt(item)
                ready.append(item)
            except ItemFailure as err:
                rows.append(self._failed(item, err.error_type, str(err)))
        if not ready:
            return rows
        if ready[0]["mode"] != "txt2img" and ready[0]["strength"] == 0:
            return rows + [self._unchanged(item) for item in ready]
        try:
            return rows + self._call(ready, position)
        except Exception as err:  # noqa: BLE001 - isolate the item that broke the call
            if len(ready) == 1:
                return rows + [self._failed(ready[0], _error_type(err), _short(err))]
        for item in ready:
            try:
                rows.extend(self._call([item]))
            except Exception as one:  # noqa: BLE001
                rows.append(self._failed(item, _error_type(one), _short(one), attempts=2))
        return rows

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
        pipe.scheduler = self._scheduler(pipe, first["scheduler"])
        try:
            self.adapters.activate(pipe, first.get("loras"))
        except (UserError, ValueError) as err:  # a LoRA that did not load; peft refusing a set
            raise ItemFailure("AdapterError", str(err)) from None
        kwargs = self.args.build(pipe, padded, sdxl)
        started = time.perf_counter()
        upcast = False
        with torch.inference_mode():
            if first.get("refiner"):
                output = self._call_refined(pipe, kwargs, padded)
            elif self.vae_fallback and not sdxl:
                output, upcast = call_decoding_in_fp32_on_overflow(pipe, kwargs, self.torch_dtype)
            else:
                output = pipe(**kwargs)
        seconds = (time.perf_counter() - started) / len(items)
        self.pipeline_calls += 1
        call_id = f"{self.worker}#{self.pipeline_calls}"
        nsfw = getattr(output, "nsfw_content_detected", None) or [False] * len(padded)
        rows = []
        for item, slot in zip(items, slots, strict=True):
            pixels, failure = checked_pixels(output.images[slot], nsfw[slot])
            if failure is not None:
                rows.append(self._failed(item, *failure))
                continue
            scheduler = type(pipe.scheduler).__name__
            row = self._done(
                item, pixels, position=slot, seconds=seconds, scheduler=scheduler, call_id=call_id
            )
            if upcast:
                row["notes"] = "; ".join(filter(None, [row.get("notes"), UPCAST_NOTE]))
            rows.append(row)
        return rows

    def _call_refined(self, pipe: Any, kwargs: dict[str, Any], padded: list[dict[str, Any]]) -> Any:
        """SDXL base then refiner, as diffusers documents the ensemble of experts: the base
        stops at `refiner_switch` of the schedule and hands its latents over; the refiner
        denoises the rest. Both stages draw from the same per-image generators."""
        first = padded[0]
        switch = first["refiner_switch"]
        latents = pipe(**{**kwargs, "output_type": "latent", "denoising_end": switch}).images
        refiner = self.refiners[first["mode"]]
        refiner.scheduler = self._scheduler(refiner, first["scheduler"])
        return refiner(**self.args.second_stage(refiner, kwargs, padded, latents))

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
        return {**self._common(item), **failed_fields(error_type, message, attempts)}


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

    in_flight: the run's `stream.InFlight` key prefix, under which this actor records
    which items it has in hand (so an item that kills the process every time can be found
    and failed).
    """

    def __init__(self, *, in_flight: str | None = None, **kwargs: Any):
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
            return pa.Table.from_pylist(self.render(block.to_pylist()))
        from .stream import begin_block, end_block

        columns = [
            c for c in block.column_names if not pa.types.is_binary(block.schema.field(c).type)
        ]
        begin_block(self.in_flight, self.actor_id, block.select(columns).to_pylist())
        out = pa.Table.from_pylist(self.render(block.to_pylist()))
        end_block(self.in_flight, self.actor_id)
        return out

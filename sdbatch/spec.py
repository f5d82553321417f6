"""The YAML job spec: pydantic models, loading with readable errors, JSON schema export.

Every field is typed and documented here once; `sdbatch schema` and the README's field
list come from these models. This module must stay light: no torch, diffusers or ray.

It is longer than our ~500-line guide on purpose: the models' field descriptions are the
spec's reference documentation (`sdbatch schema`), and one document is read in one place.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import Problem, UserError
from .schedulers import SCHEDULERS
from .singlefile import is_single_file

MODES = ("txt2img", "img2img", "inpaint", "depth2img")
Mode = Literal["txt2img", "img2img", "inpaint", "depth2img"]


MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class PairRange:
    """The bounds of a two-number SDXL micro-conditioning field (spec and manifest)."""

    lo: int
    hi: int
    what: str
    order: str


PAIRS = {
    "original_size": PairRange(1, 16384, "sizes", "[height, width]"),
    "target_size": PairRange(1, 16384, "sizes", "[height, width]"),
    "crops_coords_top_left": PairRange(0, 16384, "offsets", "[top, left]"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_scheduler(value: str) -> str:
    if value not in SCHEDULERS:
        raise ValueError(f"unknown scheduler; valid: {', '.join(SCHEDULERS)}; got {value!r}")
    return value


def check_multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8, got {value}")
    return value


class RenderParams(_Strict):
    """Render parameters; `defaults` in the spec, overridable per manifest row."""

    mode: Mode = Field("txt2img", description="txt2img | img2img | inpaint | depth2img")
    steps: int = Field(20, ge=1, le=500, description="Number of sampling steps (1..500).")
    guidance_scale: float = Field(7.5, ge=0, le=100, description="CFG scale (>= 0).")
    scheduler: str = Field(
        "default",
        description="Sampler name; 'default' uses the checkpoint's own scheduler config. "
        f"One of: {', '.join(SCHEDULERS)}.",
    )
    width: int = Field(512, ge=8, le=4096, description="Image width in pixels, multiple of 8.")
    height: int = Field(512, ge=8, le=4096, description="Image height in pixels, multiple of 8.")
    negative_prompt: str = Field("", description="Negative prompt (replaces the empty prompt).")
    num_images: int = Field(1, ge=1, le=10_000, description="Images per manifest row.")
    strength: float = Field(
        0.75,
        ge=0,
        le=1,
        description="Denoising strength for img2img/inpaint/depth2img (0 = input, 1 = noise).",
    )

    loras: str | None = Field(
        None,
        description="LoRAs for every row, as 'NAME:WEIGHT,NAME' (weight default 1; names "
        "from the spec's loras). A row's `loras` column replaces it ('' for none); "
        "`<lora:NAME:WEIGHT>` tags in a prompt add to it.",
    )
    prompt_syntax: Literal["plain", "a1111"] = Field(
        "plain",
        description="plain: the prompt as diffusers encodes it (truncated to 77 tokens, see "
        "prompt_overflow). a1111: AUTOMATIC1111 attention syntax ((word:1.3), (word), "
        "[word], \\( escapes, BREAK) and prompts of any length, encoded by compel.",
    )
    refiner_switch: float | None = Field(
        None,
        gt=0,
        le=1,
        description="SDXL refiner: the fraction of the steps the base model runs before it "
        "hands its latents to models.refiner (diffusers' denoising_end/denoising_start); "
        "default 0.8 when models.refiner is set; 1 = base model only.",
    )
    controlnet_conditioning_scale: float = Field(
        0.8,
        ge=0,
        le=2,
        description="SDXL depth2img: weight of the depth ControlNet (diffusers' default 0.8).",
    )
    original_size: tuple[int, int] | None = Field(
        None,
        description="SDXL micro-conditioning [height, width]; default the image size, as in "
        "diffusers.",
    )
    target_size: tuple[int, int] | None = Field(
        None, description="SDXL micro-conditioning [height, width]; default the image size."
    )
    crops_coords_top_left: tuple[int, int] | None = Field(
        None, description="SDXL micro-conditioning [top, left]; default [0, 0]."
    )

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        return check_scheduler(v)

    @field_validator(*PAIRS)
    @classmethod
    def _pair(cls, v: tuple[int, int] | None, info: ValidationInfo) -> tuple[int, int] | None:
        pair = PAIRS[str(info.field_name)]
        if v is not None and not all(pair.lo <= x <= pair.hi for x in v):
            raise ValueError(
                f"must be two {pair.what} in {pair.lo}..{pair.hi} {pair.order}, got {list(v)}"
            )
        return v

    @field_validator("width", "height")
    @classmethod
    def _size(cls, v: int) -> int:
        return check_multiple_of_8(v)


# The checkpoint fields that may be a single-file `.safetensors` (and so take a layout).
SINGLE_FILE_FIELDS = ("base", "inpaint", "depth", "refiner", "depth_controlnet")


class ModelsSpec(_Strict):
    """Checkpoints per mode: a local diffusers folder, a hub id (local HF cache, or
    downloaded once when online), an `s3://bucket/prefix/` diffusers folder (copied once per
    node into a local cache), or a single-file `.safetensors` checkpoint (local, s3://, or
    in a hub repository: `org/name/file.safetensors` or its huggingface.co URL; a pickled
    `.ckpt` one with `allow_pickle`).
    The family (SD 1.x, 2.x, SDXL) is read from each checkpoint."""

    base: str = Field(
        ..., description="txt2img/img2img checkpoint (diffusers layout): SD 1.x, 2.x or SDXL."
    )
    inpaint: str | None = Field(
        None, description="Inpainting checkpoint (9-channel UNet); default: the base model."
    )
    depth: str | None = Field(
        None, description="SD 2 depth-to-image checkpoint (5-channel UNet + DPT)."
    )
    depth_controlnet: str | None = Field(
        None,
        description="SDXL depth2img: a depth ControlNet (e.g. diffusers/controlnet-depth-sdxl-1.0) "
        "applied to the base model on the init image.",
    )
    depth_estimator: str | None = Field(
        None,
        description="SDXL depth2img rows without depth_map: a DPT depth estimator "
        "(e.g. Intel/dpt-hybrid-midas, or a depth2img checkpoint's depth_estimator).",
    )
    refiner: str | None = Field(
        None,
        description="SDXL refiner (second stage for txt2img, img2img, inpaint), "
        "switched to at refiner_switch.",
    )
    config: dict[str, str] = Field(
        default_factory=dict,
        description="Layout of single-file checkpoints, per field (e.g. {base: "
        "stable-diffusion-v1-5/stable-diffusion-v1-5}): a diffusers folder, hub id or s3:// "
        "prefix of the same architecture, giving configs, tokenizers and scheduler (for "
        "depth_controlnet: a ControlNet folder, its config.json). Default: the repository "
        "diffusers picks for the file's family (diffusers/controlnet-depth-sdxl-1.0).",
    )
    allow_pickle: bool = Field(
        False,
        description="Load pickled weights (.bin/.ckpt/.pt) where a checkpoint has no "
        ".safetensors, and single-file .ckpt checkpoints; unpickling can run arbitrary code, "
        "so only for trusted files (.ckpt files are read with torch's weights-only loader).",
    )

    @field_validator("config")
    @classmethod
    def _config_fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(SINGLE_FILE_FIELDS))
        if unknown:
            raise ValueError(
                f"keys are checkpoint fields ({', '.join(SINGLE_FILE_FIELDS)}), got {unknown}"
            )
        return v

    def layouts(self) -> dict[str, str]:
        """Single-file checkpoint → its layout (`models.config`), for `models.use_layouts`."""
        return {
            ref: layout
            for name, layout in self.config.items()
            if (ref := getattr(self, name)) is not None
        }

    @model_validator(mode="after")
    def _consistent(self) -> ModelsSpec:
        for name in self.config:
            ref = getattr(self, name)
            if ref is None or not is_single_file(ref):
                raise ValueError(
                    f"config.{name} gives the layout of a single-file .safetensors "
                    f"checkpoint (or .ckpt), but models.{name} is {ref!r}"
                )
        if self.depth and self.depth_controlnet:
            raise ValueError(
                "set models.depth (an SD 2 depth checkpoint) or models.depth_controlnet "
                "(SDXL base + depth ControlNet), not both"
            )
        return self


class ComputeSpec(_Strict):
    """How the render stage is placed on Ray."""

    actors: int | Literal["auto"] = Field(
        "auto",
        description="Render actors; 'auto' = GPUs in the cluster / gpus_per_actor, or "
        "CPUs / cpus_per_actor without GPUs.",
    )
    cpus_per_actor: float = Field(1.0, gt=0, le=256, description="CPU threads per render actor.")
    gpus_per_actor: float = Field(0, ge=0, le=8, description="GPUs per actor (0.5 = two per GPU).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per actor, e.g. {render_node: 1} to pin actors to "
        "nodes started with --resources.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float16 on CUDA, float32 on CPU."
    )
    channels_last: bool = Field(
        False, description="UNet in channels_last memory format (GPU speed-up)."
    )
    torch_compile: bool = Field(
        False, description="torch.compile the UNet once per actor, warmed up per image size."
    )
    vae_tiling: bool = Field(
        False, description="Decode large images in tiles (less memory; changes pixels)."
    )
    vae_slicing: bool = Field(
        False, description="Decode a batch one image at a time (less memory)."
    )
    cpu_offload: bool = Field(
        False, description="enable_model_cpu_offload for small GPUs (CUDA only; slower)."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="torch intra-op threads per actor; default ceil(cpus_per_actor). "
        "On CPU the thread count changes output bits, so it is recorded per image.",
    )

    def render_options(self) -> dict[str, bool]:
        """Pipeline options that may change pixels; recorded with every image."""
        names = ("channels_last", "torch_compile", "vae_tiling", "vae_slicing", "cpu_offload")
        return {n: getattr(self, n) for n in names if getattr(self, n)}

    def threads(self) -> int:
        """torch threads per actor: explicit, else ceil(cpus_per_actor)."""
        return self.torch_threads or max(1, math.ceil(self.cpus_per_actor))

    @field_validator("actors")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or 'auto', got {v}")
        return v


class StorageSpec(_Strict):
    """How to reach S3-compatible storage (AWS S3, MinIO, R2, Ceph). Credentials come from
    the standard AWS environment variables / profiles, never from the spec."""

    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint, e.g. http://minio:9000 or https://<account>.r2.cloudflarestorage.com.",
    )
    region: str | None = Field(None, description="Region name (R2: 'auto').")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="Bucket addressing; MinIO and most self-hosted S3 need 'path'."
    )
    profile: str | None = Field(None, description="AWS profile name from ~/.aws/config.")
    max_attempts: int = Field(10, ge=1, le=50, description="Attempts per S3 request (retries + 1).")
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard", description="botocore retry mode (adaptive also rate-limits on SlowDown)."
    )


class ExecutionSpec(_Strict):
    """How the driver commits work and guards an overnight run."""

    commit_rows: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="Commit a metadata part every this many finished items.",
    )
    commit_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="... or at least this often (seconds), whichever comes first.",
    )
    watchdog_seconds: float = Field(
        900.0,
        ge=0,
        le=86_400,
        description="Fail the job, naming the render actors, if no item finishes for this long "
        "(0 = off). Covers model loading, so keep it above the slowest actor start-up.",
    )
    max_actor_restarts: int = Field(
        3, ge=0, le=100, description="Restarts per render actor before the job fails (crash loops)."
    )
    lease_seconds: float = Field(
        120.0,
        ge=5,
        le=86_400,
        description="A run holds a lease on its output, renewed every third of this; another "
        "run refuses a lease whose heartbeat is younger, and takes over an older one.",
    )
    max_job_retries: int = Field(
        3,
        ge=0,
        le=100,
        description="When a node, or every render actor, is lost (spot preemption, a killed "
        "raylet), re-plan what is left and go on within the same run, up to this many times.",
    )
    capacity_wait_seconds: float = Field(
        600.0,
        ge=0,
        le=86_400,
        description="After such a loss, wait this long for room for a render actor (a "
        "replacement node, the autoscaler) before the run fails; committed work is kept.",
    )


class OutputOptions(_Strict):
    """How images are encoded and laid out; written in the spec as `output: {uri: ..., format: ...}`."""

    format: Literal["png", "webp", "jpeg"] = Field("png", description="png | webp | jpeg")
    quality: int = Field(95, ge=1, le=100, description="WebP/JPEG quality (1..100).")
    lossless: bool = Field(False, description="Lossless WebP (as DiffusionDB uses).")
    layout: Literal["files", "webdataset"] = Field(
        "files", description="files (one object per image) | webdataset (tar shards)"
    )
    shard_size: int = Field(1000, ge=1, le=1_000_000, description="Samples per WebDataset shard.")

    @model_validator(mode="after")
    def _lossless_webp_only(self) -> OutputOptions:
        if self.lossless and self.format != "webp":
            raise ValueError(f"lossless applies to format webp only, got format {self.format!r}")
        return self

    @property
    def extension(self) -> str:
        return {"png": "png", "webp": "webp", "jpeg": "jpg"}[self.format]


# The sampler's and the image's parameters (strength: modes that start from an image).
SAMPLING_FIELDS = ("steps", "guidance_scale", "scheduler", "width", "height", "strength")
# Parameters a sweep may vary; each must also be a RenderParams field.
SWEEPABLE = (*SAMPLING_FIELDS, "negative_prompt", "refiner_switch", "controlnet_conditioning_scale")


class SweepSpec(_Strict):
    """Expand every manifest row over a parameter grid (like A1111's X/Y/Z plot)."""

    steps: list[int] | None = None
    guidance_scale: list[float] | None = None
    scheduler: list[str] | None = None
    width: list[int] | None = None
    height: list[int] | None = None
    strength: list[float] | None = None
    negative_prompt: list[str] | None = None
    refiner_switch: list[float] | None = None
    controlnet_conditioning_scale: list[float] | None = None
    same_seed: bool = Field(
        False,
        description="Keep each row's seed across the grid (compare parameters on identical "
        "noise); otherwise every grid cell gets its own derived seed.",
    )
    max_items: int = Field(10_000_000, ge=1, description="Refuse sweeps that expand beyond this.")

    @model_validator(mode="after")
    def _values_valid(self) -> SweepSpec:
        for name in SWEEPABLE:
            values = getattr(self, name)
            if values is None:
                continue
            if not values:
                raise ValueError(f"sweep.{name} is an empty list")
            for i, v in enumerate(values):
                try:
                    RenderParams.model_validate({name: v})
                except ValidationError as err:
                    msg = format_errors("", err, RenderParams)[0].split(": ", 2)[-1]
                    raise ValueError(f"{name}[{i}] {msg}") from None
        return self

    def grid(self) -> list[dict[str, Any]]:
        """Every combination, in a stable order (first parameter varies slowest)."""
        combos: list[dict[str, Any]] = [{}]
        for name in SWEEPABLE:
            values = getattr(self, name)
            if values is not None:
                combos = [{**c, name: v} for c in combos for v in values]
        return combos


class JobSpec(_Strict):
    """A batch rendering job: what to render (manifest), with what (model) and where to."""

    name: str = Field(..., min_length=1, description="Job name (recorded in metadata).")
    manifest: str = Field(
        ..., description="Parquet manifest URI (local path; relative to the spec file)."
    )
    output: str = Field(
        ...,
        description="Output folder URI (local path relative to the spec file, or s3://...). "
        "May also be a mapping {uri, format, quality, lossless, layout, shard_size}.",
    )
    output_options: OutputOptions = Field(
        default_factory=lambda: OutputOptions(),
        description="Filled from the mapping form of `output`.",
    )
    sweep: SweepSpec | None = Field(None, description="Parameter grid applied to every row.")
    model: str | None = Field(None, description="Shorthand for models.base.")
    models: ModelsSpec | None = Field(None, description="Checkpoints per mode.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Job seed; per-item seeds derive from it.")
    batch_size: int = Field(4, ge=1, le=256, description="Images per pipeline call.")
    prompt_overflow: Literal["truncate", "fail"] = Field(
        "truncate",
        description="Prompts over 77 CLIP tokens: truncate (as diffusers does, recorded per "
        "item) or fail the item.",
    )
    loras: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters by name: a .safetensors file (diffusers/PEFT or "
        "kohya/A1111 layout), a folder holding one, an s3:// file or prefix (cached once "
        "per node), or a hub id. Rows choose them by name (defaults.loras, a `loras` "
        "column, <lora:NAME:WEIGHT> in the prompt).",
    )
    embeddings: dict[str, str] = Field(
        default_factory=dict,
        description="Textual-inversion embeddings by name (.safetensors; SDXL ones hold "
        "clip_l and clip_g): loaded for the whole job; a prompt uses one by its name.",
    )
    storage: StorageSpec = Field(default_factory=lambda: StorageSpec())
    execution: ExecutionSpec = Field(default_factory=lambda: ExecutionSpec())
    defaults: RenderParams = Field(default_factory=lambda: RenderParams())
    compute: ComputeSpec = Field(default_factory=lambda: ComputeSpec())

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"use letters, digits, '.', '_' or '-', got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _one_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("output"), dict):
            options = dict(data["output"])
            data = {**data, "output": options.pop("uri", None), "output_options": options}
            if data["output"] is None:
                raise ValueError("output: a mapping needs 'uri' (the output folder)")
        if isinstance(data, dict) and data.get("model") is not None:
            if data.get("models") is not None:
                raise ValueError("set either 'model' or 'models', not both")
            data = {**data, "models": {"base": data["model"]}, "model": None}
        return data

    @field_validator("loras", "embeddings")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        from .adapters import NAME as ADAPTER_NAME  # torch-free

        for name, uri in v.items():
            if not ADAPTER_NAME.fullmatch(name) or name != name.strip():
                raise ValueError(
                    f"name {name!r}: use letters, digits, '.', '_', '-' or inner spaces"
                )
            if not isinstance(uri, str) or not uri.strip():
                raise ValueError(f"{name}: give a file, folder, s3:// URI or hub id")
        return v

    @model_validator(mode="after")
    def _has_model(self) -> JobSpec:
        if self.models is None:
            raise ValueError("set 'model' (a checkpoint) or 'models: {base: ...}'")
        switches = [
            self.defaults.refiner_switch,
            *((self.sweep.refiner_switch or []) if self.sweep else []),
        ]
        if self.models.refiner is None and any(s is not None for s in switches):
            raise ValueError("refiner_switch is set but there is no models.refiner")
        if self.defaults.loras:
            from .adapters import parse_list

            try:
                unknown = sorted(set(parse_list(self.defaults.loras)) - set(self.loras))
            except UserError as err:
                raise ValueError(f"defaults.loras {self.defaults.loras!r}: {err}") from None
            if unknown:
                raise ValueError(
                    f"defaults.loras names {', '.join(map(repr, unknown))}, not in loras "
                    f"({', '.join(sorted(self.loras)) or 'none'})"
                )
        return self

    def model_for(self, mode: str) -> str:
        """The pipeline checkpoint of `mode` (SDXL depth2img: the base + depth_controlnet)."""
        assert self.models is not None
        if mode == "inpaint" and self.models.inpaint:
            return self.models.inpaint
        if mode == "depth2img":
            if self.models.depth:
                return self.models.depth
            if self.models.depth_controlnet:
                return self.models.base
            raise ValueError(
                "mode depth2img needs models.depth (an SD 2 depth checkpoint) or "
                "models.depth_controlnet (an SDXL depth ControlNet)"
            )
        return self.models.base


def _loc(loc: tuple[Any, ...]) -> str:
    text = ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "(top level)"
    # Users write `output: {format: ...}`; the model keeps those under output_options.
    return text.replace("output_options", "output", 1)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The sub-model reached by following `loc` from `model` (None if not a model)."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if current is None:
            return None
    return current


def _bounds(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """'1..500' style range of the numeric field at `loc`, from its Field(ge=, le=)."""
    parent = _model_at(model, loc[:-1])
    field = parent.model_fields.get(str(loc[-1])) if parent else None
    if field is None:
        return None
    lo = hi = None
    for m in field.metadata:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        lo = f">{m.gt}" if getattr(m, "gt", None) is not None else lo
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
    if lo is None or hi is None:
        return None
    return f"{lo}..{hi}" if not str(lo).startswith(">") else f"{lo} and <= {hi}"


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def format_errors(
    source: str, err: ValidationError, model: type[BaseModel] = JobSpec
) -> list[Problem]:
    """One problem per line: `FILE: field.path: what is wrong, got VALUE`."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = _loc(loc)
        value = None if e["type"] == "missing" else e.get("input")
        problem = functools.partial(_problem, source, where, value)
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            sub = _model_at(model, loc[:-1])
            valid = [f for f in (sub.model_fields if sub else {}) if f != "output_options"]
            hint = difflib.get_close_matches(key, valid, n=1)
            if hint:
                tip = f" (did you mean {hint[0]!r}?)"
            elif 0 < len(valid) <= 12:
                tip = f" (valid: {', '.join(valid)})"
            else:
                tip = ""
            lines.append(problem(f"unknown key{tip}"))
            continue
        msg = e["msg"].removeprefix("Value error, ")
        bounds = _bounds(model, loc) if e["type"] in _RANGE_ERRORS else None
        if bounds:
            lines.append(problem(f"must be {bounds}, got {value!r}"))
        elif e["type"] == "missing":
            lines.append(problem("required field is missing"))
        # A section's own check (a model validator) names its fields: not the whole dict.
        elif "got" in msg or (e["type"] == "value_error" and isinstance(value, dict)):
            lines.append(problem(msg))
        else:
            lines.append(problem(f"{msg}, got {value!r}"))
    return lines


def _problem(source: str, where: str, value: Any, text: str) -> Problem:
    return Problem(f"{source}: {where}: {text}", file=source, field=where, value=value)


def parse_spec(data: Any, source: str = "<spec>") -> JobSpec:
    if not isinstance(data, dict):
        raise UserError(
            [f"{source}: expected a mapping of keys at the top level, got {type(data).__name__}"]
        )
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise UserError(format_errors(source, err)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML spec; relative paths resolve against the spec's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError([f"{path}: spec file not found"]) from None
    except OSError as err:
        raise UserError([f"{path}: cannot read spec: {err.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError([f"{path}: malformed YAML{where}: {problem}"]) from None
    spec = parse_spec(data, str(path))
    return resolve_paths(spec, path.parent)


def is_remote(uri: str) -> bool:
    return "://" in uri


def looks_like_hub_id(value: str) -> bool:
    """`org/name[@rev]`, or a single file in a hub repository (`org/name[@rev]/file`)."""
    from .hub import split_file

    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", value)) or bool(
        split_file(value)
    )


def resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Make local paths absolute against `base`; leave URIs and hub ids as they are."""

    def fix(value: str, *, may_be_hub: bool = False) -> str:
        if is_remote(value) or Path(value).is_absolute():
            return value
        candidate = (base / value).resolve()
        if may_be_hub and not candidate.exists() and looks_like_hub_id(value):
            return value
        return str(candidate)

    updates: dict[str, Any] = {"manifest": fix(spec.manifest), "output": fix(spec.output)}
    assert spec.models is not None
    models = spec.models.model_copy(
        update={
            **{
                k: fix(v, may_be_hub=True)
                for k, v in spec.models.model_dump().items()
                if isinstance(v, str)  # checkpoint references, not flags like allow_pickle
            },
            "config": {k: fix(v, may_be_hub=True) for k, v in spec.models.config.items()},
        }
    )
    updates["models"] = models
    for name in ("loras", "embeddings"):
        updates[name] = {k: fix(v, may_be_hub=True) for k, v in getattr(spec, name).items()}
    return spec.model_copy(update=updates)


def render_signature(spec: JobSpec) -> dict[str, Any]:
    """The spec fields that change pixels of already planned items (for resume checks)."""
    c = spec.compute
    return {
        "models": spec.models.model_dump() if spec.models else None,
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "prompt_overflow": spec.prompt_overflow,
        "defaults": _new_fields_dropped(spec.defaults.model_dump()),
        **{name: dict(v) for name in ("loras", "embeddings") if (v := getattr(spec, name))},
        "compute.device": c.device,
        "compute.dtype": c.dtype,
        "compute.torch_threads": c.threads(),
        "compute.render_options": c.render_options(),
    }


def _new_fields_dropped(defaults: dict[str, Any]) -> dict[str, Any]:
    """Defaults without fields added later while they are unset, so outputs written
    before those fields existed still resume."""
    unset = {"loras": None, "prompt_syntax": "plain"}
    return {k: v for k, v in defaults.items() if not (k in unset and v == unset[k])}


def signature_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'field: old → new' for each difference between two render signatures."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += signature_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} → {b!r}")
    return changes


def json_schema() -> dict[str, Any]:
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "sdbatch job spec"
    return schema


def dump_spec(spec: JobSpec) -> str:
    """The resolved spec as YAML (what `OUTPUT/job.yaml` holds)."""
    data = spec.model_dump(mode="json", exclude={"model"})
    return yaml.safe_dump(data, sort_keys=False)

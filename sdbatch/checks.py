"""Checks of a job before anything loads or renders: the manifest, the checkpoints each
mode needs and whether they fit together, hub ids pinned to commits.

`validate`, `plan` and `run` all start here, so a job `validate` passes never fails for
a reason it could have known.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError
from .manifest import ManifestInfo, validate_manifest
from .spec import JobSpec


def check_job(spec: JobSpec, on_rows: Callable[[int], None] | None = None) -> ManifestInfo:
    """Everything that can be known without rendering: manifest, models, output.
    on_rows: called with the manifest rows checked so far, every 10⁶ (large manifests only)."""
    from .models import use_layouts, use_storage

    info = validate_manifest(spec.manifest, spec, on_progress=on_rows)
    use_storage(spec.storage.model_dump())  # s3:// checkpoints are read with these options
    assert spec.models is not None
    use_layouts(spec.models.layouts())  # single-file checkpoints: their models.config
    problems = check_models(spec, info)
    if not problems:
        problems = check_adapters(spec)
    if problems:
        raise UserError("\n".join(dict.fromkeys(problems)))
    return info


def check_models(spec: JobSpec, info: ManifestInfo) -> list[str]:
    """Problems with the checkpoints the job's modes need: unsupported pipeline classes,
    and models that do not fit together (so `validate` never passes a job whose every
    item would then fail)."""
    from .models import check_checkpoint, inspect_checkpoint, pickle_problem

    models = spec.models
    assert models is not None
    problems: list[str] = []
    checkpoints = {}
    for mode in sorted(info.modes):
        try:
            ref = spec.model_for(mode)
        except ValueError as err:
            problems.append(f"{spec.manifest}: {err}")
            continue
        problem = check_checkpoint(ref)
        if problem:
            problems.append(problem)
        else:
            checkpoints[mode] = inspect_checkpoint(ref)
    base_problem = check_checkpoint(models.base)
    base = None if base_problem else inspect_checkpoint(models.base)
    if base is not None and not base.has_text_encoder and base.family == "sdxl":
        problems.append(
            f"models.base {models.base}: an SDXL refiner (no text_encoder) cannot be the base "
            "model; give it as models.refiner"
        )
    inpaint = checkpoints.get("inpaint")
    if inpaint is not None and inpaint.unet_in_channels not in (4, 9):
        problems.append(
            f"models.inpaint {inpaint.ref}: UNet has {inpaint.unet_in_channels} input channels, "
            "expected 9 (an inpainting checkpoint) or 4 (a base model)"
        )
    problems += _depth_problems(spec, info, base, checkpoints.get("depth2img"))
    problems += _refiner_problems(spec, base)
    if not models.allow_pickle and not problems:
        for name, ref in model_fields(spec, info).items():
            problems.append(pickle_problem(ref, f"models.{name}") or "")
    return [p for p in problems if p]


def _depth_problems(spec: JobSpec, info: ManifestInfo, base: Any, depth: Any) -> list[str]:
    """An SD 2 depth checkpoint, or SDXL's depth ControlNet (+ estimator), as the rows need."""
    from .lone import check_controlnet, check_depth_estimator

    models = spec.models
    assert models is not None
    problems: list[str] = []
    if depth is not None and models.depth:
        if depth.family == "sdxl":
            problems.append(
                f"models.depth {models.depth}: an SDXL checkpoint; SDXL depth2img uses "
                "models.depth_controlnet with the base model"
            )
        elif depth.unet_in_channels != 5 or not depth.has_depth_estimator:
            problems.append(
                f"models.depth {models.depth}: not a depth2img checkpoint (needs a 5-channel "
                f"UNet and a depth_estimator; found {depth.pipeline_class}, "
                f"{depth.unet_in_channels}-channel UNet)"
            )
    if models.depth_controlnet:
        if base is not None and base.family != "sdxl":
            problems.append(
                f"models.depth_controlnet is for SDXL; the base model {models.base} is "
                f"{base.family.upper()}: use models.depth (an SD 2 depth checkpoint)"
            )
        elif "depth2img" in info.modes:
            problems.append(check_controlnet(models.depth_controlnet) or "")
            if info.estimates_depth and not models.depth_estimator:
                problems.append(
                    f"{spec.manifest}: depth2img rows without a depth_map need "
                    "models.depth_estimator (a DPT, e.g. Intel/dpt-hybrid-midas) beside "
                    "models.depth_controlnet"
                )
    if models.depth_estimator and "depth2img" in info.modes and info.estimates_depth:
        problems.append(check_depth_estimator(models.depth_estimator) or "")
    return problems


def _refiner_problems(spec: JobSpec, base: Any) -> list[str]:
    """The refiner is an SDXL second stage, for an SDXL base."""
    from .models import check_checkpoint, inspect_checkpoint

    models = spec.models
    assert models is not None
    problems: list[str] = []
    if models.refiner:
        problem = check_checkpoint(models.refiner)
        if problem:
            problems.append(f"models.refiner: {problem}")
        elif inspect_checkpoint(models.refiner).family != "sdxl":
            problems.append(
                f"models.refiner {models.refiner}: "
                f"{inspect_checkpoint(models.refiner).pipeline_class}, not an SDXL pipeline"
            )
        if base is not None and base.family != "sdxl":
            problems.append(
                f"models.refiner is an SDXL second stage; the base model {models.base} is "
                f"{base.family.upper()}"
            )
    return problems


def model_fields(spec: JobSpec, info: ManifestInfo) -> dict[str, str]:
    """`models.<field>` → checkpoint, for every model the job's rows load."""
    m = spec.models
    assert m is not None
    used = {spec.model_for(mode) for mode in info.modes}
    aux = {ref for ref in aux_models(spec, info).values() if ref}
    fields = {
        name: ref
        for name in ("base", "inpaint", "depth", "depth_controlnet", "depth_estimator", "refiner")
        if (ref := getattr(m, name)) and (ref in used or ref in aux)
    }
    return fields


def pin_hub_models(spec: JobSpec) -> JobSpec:
    """The spec with each hub id (`org/name`, `org/name@branch`) as `org/name@<commit>`,
    and each hub single file as `org/name@<commit>/file` (whose `models.config` layout is
    registered again under the pinned name: `models.use_layouts` is keyed by reference).
    LoRAs and embeddings from the hub likewise (`adapters.pin`)."""
    from . import hub
    from .adapters import pin as pin_adapter

    assert spec.models is not None
    adapters = {
        field: {name: pin_adapter(uri) for name, uri in getattr(spec, field).items()}
        for field in ("loras", "embeddings")
    }
    adapters = {k: v for k, v in adapters.items() if v != getattr(spec, k)}
    if adapters:
        spec = spec.model_copy(update=adapters)

    def pinned(value: str) -> str:
        return hub.pin(value) if hub.is_hub_id(value) or hub.split_file(value) else value

    fields = {k: v for k, v in spec.models.model_dump().items() if isinstance(v, str)}
    changed: dict[str, Any] = {k: p for k, v in fields.items() if (p := pinned(v)) != v}
    config = {k: pinned(v) for k, v in spec.models.config.items()}
    if config != spec.models.config:
        changed["config"] = config
    if not changed:
        return spec
    from .models import use_layouts

    pinned_spec = spec.model_copy(update={"models": spec.models.model_copy(update=changed)})
    assert pinned_spec.models is not None
    use_layouts(pinned_spec.models.layouts())  # a pinned single file keeps its models.config
    return pinned_spec


def models_for(spec: JobSpec, modes: set[str]) -> dict[str, str]:
    """Checkpoint per mode, for the modes this job uses only (actors load nothing else)."""
    return {mode: spec.model_for(mode) for mode in sorted(modes)}


def aux_models(spec: JobSpec, info: ManifestInfo) -> dict[str, str | None]:
    """The refiner, depth ControlNet and depth estimator the actors load, where the job's
    rows use them (Renderer keyword arguments)."""
    from .models import family_of
    from .plan import REFINER_MODES

    m = spec.models
    assert m is not None
    sdxl = {mode for mode in info.modes if family_of(spec.model_for(mode)) == "sdxl"}
    depth = "depth2img" in sdxl and bool(m.depth_controlnet)
    return {
        "refiner": m.refiner if m.refiner and sdxl & set(REFINER_MODES) else None,
        "depth_controlnet": m.depth_controlnet if depth else None,
        "depth_estimator": m.depth_estimator if depth and info.estimates_depth else None,
    }


def _text_widths(ref: str) -> tuple[int | None, tuple[int, ...]]:
    """(the UNet's cross-attention width, each text encoder's width) from the configs."""
    import json

    from .models import inspect_checkpoint

    path = inspect_checkpoint(ref).path

    def read(name: str) -> dict[str, Any]:
        try:
            return dict(json.loads((path / name / "config.json").read_text()))
        except (OSError, ValueError):
            return {}

    unet = read("unet").get("cross_attention_dim")
    encoders = [read(n).get("hidden_size") for n in ("text_encoder", "text_encoder_2")]
    return (int(unet) if isinstance(unet, int) else None), tuple(w for w in encoders if w)


def _vocabularies(ref: str) -> dict[str, tuple[Path, set[str]]]:
    """Each tokenizer folder of a checkpoint → (its file, the tokens it knows): vocab.json
    and added_tokens.json (the slow tokenizer's files), else tokenizer.json's."""
    import json

    from .models import inspect_checkpoint

    path = inspect_checkpoint(ref).path
    found = {}
    for name in ("tokenizer", "tokenizer_2"):
        folder = path / name
        tokens: set[str] = set()
        try:
            if (folder / "vocab.json").is_file():
                source = folder / "vocab.json"
                tokens |= set(json.loads(source.read_text()))
                if (folder / "added_tokens.json").is_file():
                    tokens |= set(json.loads((folder / "added_tokens.json").read_text()))
            elif (folder / "tokenizer.json").is_file():
                source = folder / "tokenizer.json"
                data = json.loads(source.read_text())
                tokens |= set((data.get("model") or {}).get("vocab") or {})
                tokens |= {t.get("content") for t in data.get("added_tokens") or []}
            else:
                continue
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # an unreadable tokenizer is reported where it is loaded
        found[name] = (source, tokens)
    return found


def check_adapters(spec: JobSpec) -> list[str]:
    """LoRA and embedding files that are missing, pickled, not adapters, or for another
    model family than the base model's (each named with its field and URI)."""
    from .adapters import check_embedding, check_lora, resolve

    if not spec.loras and not spec.embeddings:
        return []
    assert spec.models is not None
    text_width, widths = _text_widths(spec.models.base)
    storage = spec.storage.model_dump()
    problems = []
    for name, uri in sorted(spec.loras.items()):
        try:
            check_lora(name, uri, resolve(uri, storage), text_width, spec.models.base)
        except UserError as err:
            problems.append(str(err) if str(err).startswith("loras.") else f"loras.{name}: {err}")
    vocabularies = _vocabularies(spec.models.base) if spec.embeddings else {}
    for name, uri in sorted(spec.embeddings.items()):
        try:
            check_embedding(name, uri, resolve(uri, storage), widths)
            for tokenizer, (where, tokens) in vocabularies.items():
                if name in tokens:  # diffusers' load_textual_inversion refuses it
                    raise UserError(
                        f"embeddings.{name} {uri}: {name!r} is already a token of the base "
                        f"model's {tokenizer} ({where}), so it cannot name an embedding; "
                        "give the embedding a name the tokenizer does not know"
                    )
        except UserError as err:
            text = str(err)
            problems.append(
                text if text.startswith("embeddings.") else f"embeddings.{name}: {text}"
            )
    return problems


def adapter_files(spec: JobSpec) -> dict[str, Any]:
    """`lora:NAME` / `embedding:NAME` → `adapters.AdapterFile` (hashed once per content)."""
    from .adapters import describe, resolve

    storage = spec.storage.model_dump()
    files = {}
    for kind, table in (("lora", spec.loras), ("embedding", spec.embeddings)):
        for name, uri in sorted(table.items()):
            files[f"{kind}:{name}"] = describe(kind, name, uri, resolve(uri, storage))
    return files

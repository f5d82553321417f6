"""The bad-input matrix: every case names file/field/value, never a traceback, loses nothing.

Spec and manifest problems are caught before rendering (one CLI call each, in process).
Per-item problems become failure rows of one shared job. A new case is one line.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdbatch.cli import app
from sdbatch.runner import read_metadata, run_job
from tests.helpers import LONG_PROMPT, load_job, write_manifest, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

GOOD_ROWS = [{"id": "a", "prompt": "a cat"}, {"id": "b", "prompt": "a dog"}]
ID_PROMPT = pa.schema([("id", pa.string()), ("prompt", pa.string())])


@pytest.fixture
def case(tmp_path: Path, tiny_models):
    """Build a job folder: spec text edits and manifest rows, return the spec path."""

    def build(spec_edit=None, rows=None, schema=None, spec_text=None, model=None, models=None):
        manifest = write_manifest(
            tmp_path / "m.parquet", GOOD_ROWS if rows is None else rows, schema
        )
        where = (
            {"models": {k: str(tiny_models[v]) for k, v in models.items()}}
            if models
            else {"model": str(model or tiny_models["base"])}
        )
        path = write_spec(
            tmp_path / "job.yaml", manifest=str(manifest), output=str(tmp_path / "out"), **where
        )
        if spec_text is not None:
            path.write_text(spec_text)
        elif spec_edit:
            path.write_text(path.read_text() + spec_edit + "\n")
        return path

    return build


def not_a_model(tmp_path: Path) -> Path:
    (tmp_path / "empty-model").mkdir(exist_ok=True)
    return tmp_path / "empty-model"


# (case id, how to build it, command, expected words in the error)
PRE_RENDER = [
    ("malformed-yaml", dict(spec_text="name: [oops\n"), "validate", "malformed YAML (line"),
    (
        "unknown-key",
        dict(spec_edit="batchsize: 3"),
        "validate",
        "batchsize: unknown key (did you mean 'batch_size'?)",
    ),
    ("wrong-type", dict(spec_edit="seed: lots"), "validate", "seed: "),
    (
        "negative-seed",
        dict(spec_edit="seed: -5"),
        "validate",
        "seed: must be 0..9223372036854775807, got -5",
    ),
    (
        "seed-over-2^63",
        dict(spec_edit="seed: 9223372036854775808"),
        "validate",
        "seed: must be 0..9223372036854775807",
    ),
    (
        "width-not-8",
        dict(spec_edit="defaults: {width: 100}"),
        "validate",
        "defaults.width: must be a multiple of 8, got 100",
    ),
    (
        "steps-0",
        dict(spec_edit="defaults: {steps: 0}"),
        "validate",
        "defaults.steps: must be 1..500, got 0",
    ),
    (
        "unknown-scheduler",
        dict(spec_edit="defaults: {scheduler: warp}"),
        "validate",
        "unknown scheduler; valid: default, ddim",
    ),
    (
        "num-images-0",
        dict(spec_edit="defaults: {num_images: 0}"),
        "validate",
        "defaults.num_images: must be 1..10000, got 0",
    ),
    ("manifest-no-rows", dict(rows=[], schema=ID_PROMPT), "validate", "manifest has no rows"),
    (
        "no-prompt-column",
        dict(rows=[{"id": "a", "text": "x"}]),
        "validate",
        "missing required column 'prompt'",
    ),
    (
        "null-prompt",
        dict(rows=[{"id": "a", "prompt": None}, {"id": "b", "prompt": "x"}]),
        "validate",
        "row 0 (id 'a'): prompt is null",
    ),
    (
        "duplicate-ids",
        dict(rows=[{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]),
        "validate",
        "row 1 (id 'a'): duplicate id",
    ),
    ("empty-id", dict(rows=[{"id": "", "prompt": "x"}]), "validate", "row 0: id is empty"),
    (
        "dots-id",
        dict(rows=[{"id": "./..", "prompt": "x"}]),
        "validate",
        "id './..' is only dots/slashes",
    ),
    (
        "manifest-steps-0",
        dict(rows=[{"id": "a", "prompt": "x", "steps": 0}]),
        "validate",
        "row 0 (id 'a'): steps must be 1..500, got 0",
    ),
    (
        "missing-init-image",
        dict(rows=[{"id": "a", "prompt": "x", "mode": "img2img"}]),
        "validate",
        "mode img2img needs an init_image",
    ),
    (
        "strength-out-of-range",
        dict(
            rows=[
                {
                    "id": "a",
                    "prompt": "x",
                    "mode": "img2img",
                    "init_image": "i.png",
                    "strength": 1.5,
                }
            ]
        ),
        "validate",
        "strength must be 0..1, got 1.5",
    ),
    (
        "unknown-mode",
        dict(rows=[{"id": "a", "prompt": "x", "mode": "outpaint"}]),
        "validate",
        "mode must be one of txt2img, img2img, inpaint, depth2img, got 'outpaint'",
    ),
    (
        "model-path-missing",
        dict(model=Path("/nonexistent/model")),
        "validate",
        "model /nonexistent/model: folder not found",
    ),
    ("model-without-index", dict(model="EMPTY"), "validate", "no model_index.json"),
]


SDXL = {"base": "sdxl"}
DEPTH_ROW = [{"id": "a", "prompt": "x", "mode": "depth2img", "init_image": "i.png"}]
# Models that do not fit together: refused by validate, before any actor loads them.
SDXL_PRE_RENDER = [
    (
        "refiner-as-base",
        dict(models={"base": "sdxl-refiner"}),
        "validate",
        "an SDXL refiner (no text_encoder) cannot be the base model; give it as models.refiner",
    ),
    (
        "refiner-on-sd1",
        dict(models={"base": "base", "refiner": "sdxl-refiner"}),
        "validate",
        "models.refiner is an SDXL second stage; the base model",
    ),
    (
        "refiner-not-sdxl",
        dict(models={**SDXL, "refiner": "base"}),
        "validate",
        "StableDiffusionPipeline, not an SDXL pipeline",
    ),
    (
        "controlnet-on-sd1",
        dict(models={"base": "base", "depth_controlnet": "sdxl-controlnet-depth"}),
        "validate",
        "models.depth_controlnet is for SDXL; the base model",
    ),
    (
        "sdxl-as-depth-model",
        dict(models={**SDXL, "depth": "sdxl"}, rows=DEPTH_ROW),
        "validate",
        "SDXL depth2img uses models.depth_controlnet",
    ),
    (
        "depth-without-estimator",
        dict(models={**SDXL, "depth_controlnet": "sdxl-controlnet-depth"}, rows=DEPTH_ROW),
        "validate",
        "depth2img rows without a depth_map need models.depth_estimator",
    ),
    (
        "estimator-not-dpt",
        dict(
            models={
                **SDXL,
                "depth_controlnet": "sdxl-controlnet-depth",
                "depth_estimator": "sdxl-controlnet-depth",
            },
            rows=DEPTH_ROW,
        ),
        "validate",
        "no preprocessor_config.json beside the model",
    ),
    (
        "inpaint-5-channels",
        dict(
            models={**SDXL, "inpaint": "depth"},
            rows=[
                {
                    "id": "a",
                    "prompt": "x",
                    "mode": "inpaint",
                    "init_image": "i.png",
                    "mask_image": "m.png",
                }
            ],
        ),  # fmt: skip
        "validate",
        "UNet has 5 input channels, expected 9",
    ),
    (
        "refiner-switch-without-refiner",
        dict(models=SDXL, spec_edit="defaults: {refiner_switch: 0.5}"),
        "validate",
        "refiner_switch is set but there is no models.refiner",
    ),
    (
        "row-refiner-switch-without-refiner",
        dict(models=SDXL, rows=[{"id": "a", "prompt": "x", "refiner_switch": 0.5}]),
        "validate",
        "row 0 (id 'a'): refiner_switch is set but the spec has no models.refiner",
    ),
    (
        "row-refiner-switch-0",
        dict(
            models={**SDXL, "refiner": "sdxl-refiner"},
            rows=[{"id": "a", "prompt": "x", "refiner_switch": 0.0}],
        ),
        "validate",
        "row 0 (id 'a'): refiner_switch must be > 0 (1 = base model only), got 0",
    ),
    (
        "row-controlnet-scale-3",
        dict(
            models=SDXL,
            rows=[{"id": "a", "prompt": "x", "controlnet_conditioning_scale": 3.0}],
        ),
        "validate",
        "row 0 (id 'a'): controlnet_conditioning_scale must be 0..2, got 3",
    ),
]
# The model-independent cases again with an SDXL base: the same words, no traceback.
SDXL_PRE_RENDER += [
    (f"sdxl-{name}", {**build, "models": SDXL}, command, expected)
    for name, build, command, expected in PRE_RENDER
    if "model" not in build
]
ALL_PRE_RENDER = PRE_RENDER + SDXL_PRE_RENDER


@pytest.mark.parametrize(
    ("name", "build", "command", "expected"), ALL_PRE_RENDER, ids=[c[0] for c in ALL_PRE_RENDER]
)
def test_caught_before_rendering(case, tmp_path, name, build, command, expected) -> None:
    if build.get("model") == "EMPTY":
        build = {**build, "model": not_a_model(tmp_path)}
    path = case(**build)
    result = CliRunner().invoke(app, [command, str(path)])
    assert result.exit_code == 1, result.output
    assert expected in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "metadata").exists()


def test_messages_stay_on_one_line_when_piped(case, tmp_path) -> None:
    """Piped, rich's console is 80 columns wide: a long path broke "SPEC: ok" (and the
    error lines) across lines in logs, and grep found nothing."""
    deep = tmp_path / ("x" * 90)
    deep.mkdir()
    spec = deep / "job.yaml"
    spec.write_text(case().read_text())
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0 and f"{spec}: ok — 2 rows" in result.output, result.output
    result = CliRunner().invoke(app, ["validate", str(deep / "nope.yaml")])
    assert f"error: {deep / 'nope.yaml'}: spec file not found" in result.output, result.output


def test_missing_manifest_and_unwritable_output(case, tmp_path) -> None:
    path = case()
    text = path.read_text()
    path.write_text(text.replace(str(tmp_path / "m.parquet"), str(tmp_path / "nope.parquet")))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "nope.parquet: manifest not found" in result.output
    # An output under a regular file can never be created (root ignores chmod, so use this).
    (tmp_path / "a-file").write_text("x")
    path.write_text(text.replace(str(tmp_path / "out"), str(tmp_path / "a-file" / "out")))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert (
        result.exit_code == 1 and "a-file/out" in result.output and "cannot write" in result.output
    )
    assert "Traceback" not in result.output


# Per-item problems: one job, one failure row (or a recorded note) per case.
PER_ITEM = [
    (
        "corrupt-png",
        {"mode": "img2img", "init_image": "corrupt.png"},
        "CorruptImage",
        "corrupt.png: cannot decode image",
    ),
    (
        "image-uri-missing",
        {"mode": "img2img", "init_image": "missing.png"},
        "MissingInput",
        "missing.png: not found",
    ),
    (
        "mask-size-mismatch",
        {"mode": "inpaint", "init_image": "init.png", "mask_image": "small_mask.png"},
        "MaskSizeMismatch",
        "mask is 32x32, init_image is 64x64",
    ),
]


@pytest.fixture(scope="module")
def per_item_job(tmp_path_factory, tiny_models, ray_session):
    root = tmp_path_factory.mktemp("per-item")
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(root / "init.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "small_mask.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    rows = [{"id": name, "prompt": "x", "strength": 0.5, **cells} for name, cells, _, _ in PER_ITEM]
    rows += [{"id": "long-prompt", "prompt": LONG_PROMPT}, {"id": "fine", "prompt": "a cat"}]
    spec = load_job(root, tiny_models["base"], rows, steps=2)
    result = run_job(spec)
    failures = pd.read_parquet(Path(spec.output, "failures")).set_index("id")
    return result, failures, read_metadata(spec.output).to_pandas().set_index("id")


@pytest.mark.parametrize(
    ("name", "cells", "error_type", "message"), PER_ITEM, ids=[c[0] for c in PER_ITEM]
)
def test_per_item_failure_rows(per_item_job, name, cells, error_type, message) -> None:
    result, failures, meta = per_item_job
    assert failures.loc[name, "error_type"] == error_type
    assert message in failures.loc[name, "error_message"]
    assert name not in meta.index
    assert result.failed == len(PER_ITEM) and result.done == 2  # nothing else lost


def test_long_prompt_truncated_and_recorded(per_item_job) -> None:
    _, _, meta = per_item_job
    assert bool(meta.loc["long-prompt", "prompt_truncated"]) is True
    assert bool(meta.loc["fine", "prompt_truncated"]) is False


def test_unreachable_ray_address_fails_fast_with_the_address(case, tmp_path) -> None:
    """ray.init would retry a dead GCS address for minutes; the check answers at once."""
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = case()
    proc = subprocess.run(
        [sys.executable, "-m", "sdbatch.cli", "run", str(path), "--address", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port} (--address)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "metadata").exists()


def test_pickled_weights_are_refused_unless_allowed(tmp_path, tiny_models) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_models["base"], model)
    te = model / "text_encoder"
    torch.save(load_file(te / "model.safetensors"), te / "pytorch_model.bin")
    (te / "model.safetensors").unlink()
    manifest = write_manifest(tmp_path / "m.parquet", GOOD_ROWS)

    def validate(**models) -> object:
        spec = write_spec(
            tmp_path / "job.yaml",
            manifest=str(manifest),
            output=str(tmp_path / "out"),
            models={"base": str(model), **models},
        )
        return CliRunner().invoke(app, ["validate", str(spec)])

    result = validate()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"models.base {model}: loads pickled weights (text_encoder/pytorch_model.bin)" in (
        result.output
    )
    assert "models.allow_pickle: true" in result.output
    result = validate(allow_pickle=True)
    assert result.exit_code == 0, result.output

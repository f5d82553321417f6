"""SDXL beside SD 1.x: the same job machinery, pixels equal to plain diffusers calls.

The reference calls are written here by hand from diffusers' documentation (pipeline
class, scheduler, CPU generator, the refiner's two-stage call), not from sdbatch's code.
"""

from __future__ import annotations

import subprocess
import sys

import diffusers
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sdbatch.runner import read_metadata, run_job
from tests.helpers import write_manifest, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _load(cls, path, **components):
    pipe = cls.from_pretrained(str(path), local_files_only=True, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_txt2img_and_refiner_match_plain_diffusers(make_job, tiny_models) -> None:
    rows = [
        {"id": "plain", "prompt": "a photo of a cat", "refiner_switch": 1.0},
        {"id": "neg", "prompt": "a lighthouse", "negative_prompt": "blurry", "refiner_switch": 1.0},
        {"id": "refined", "prompt": "a red fox in snow", "seed": 5},
    ]
    base_path, refiner_path = tiny_models["sdxl"], tiny_models["sdxl-refiner"]
    _, spec = make_job(
        rows,
        name="sdxl",
        model=None,
        models={"base": str(base_path), "refiner": str(refiner_path)},
        defaults={"scheduler": "default", "steps": 5, "guidance_scale": 6.0},
        batch_size=2,
    )
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas().set_index("id")
    assert set(meta.status) == {"ok"} and set(meta.model_family) == {"sdxl"}
    assert meta.loc["refined", "refiner_switch"] == 0.8
    assert pd.isna(meta.loc["plain", "refiner"])

    base = _load(diffusers.StableDiffusionXLPipeline, base_path)
    refiner = _load(
        diffusers.StableDiffusionXLImg2ImgPipeline,
        refiner_path,
        text_encoder_2=base.text_encoder_2,
        vae=base.vae,
    )
    for row in meta.itertuples():
        ours = _pixels(Image.open(row.image_uri))
        generator = torch.Generator("cpu").manual_seed(int(row.seed))
        common = dict(
            prompt=row.prompt,
            negative_prompt=row.negative_prompt or None,
            num_inference_steps=5,
            guidance_scale=6.0,
            generator=generator,
        )
        if row.Index == "refined":
            latents = base(
                **common, width=64, height=64, denoising_end=0.8, output_type="latent"
            ).images
            theirs = refiner(**common, image=latents, denoising_start=0.8).images[0]
        else:
            theirs = base(**common, width=64, height=64).images[0]
        diff = np.abs(ours - _pixels(theirs)).max()
        assert diff <= 1, f"{row.Index}: max diff {diff}"


def test_unsupported_pipeline_class_is_refused_by_validate(tmp_path) -> None:
    model = tmp_path / "flux"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p"}])
    spec = write_spec(tmp_path / "job.yaml", manifest=str(manifest), output="out", model=str(model))
    done = subprocess.run(
        [sys.executable, "-m", "sdbatch.cli", "validate", str(spec)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1
    assert "FluxPipeline" in done.stderr and "SDXL" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout

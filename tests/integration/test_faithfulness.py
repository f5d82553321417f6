"""sdbatch must never silently change what diffusers would render.

For a few items, the PNG sdbatch wrote is compared with a plain diffusers pipeline call
built independently here (pipeline class, scheduler class, CPU generator): at most one
uint8 level apart per channel (batch size and thread count may move a value by one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdbatch.runner import read_metadata, run_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Written out by hand on purpose: this is the contract, not a copy of sdbatch's table.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def plain_diffusers_txt2img(model: str, row) -> np.ndarray:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if row.scheduler != "default":  # 'default': the checkpoint's own scheduler, untouched
        cls_name, extra = SCHEDULERS[row.scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    image = pipe(
        prompt=row.prompt,
        negative_prompt=row.negative_prompt or None,
        num_inference_steps=int(row.steps),
        guidance_scale=float(row.guidance_scale),
        width=int(row.width),
        height=int(row.height),
        generator=torch.Generator("cpu").manual_seed(int(row.seed)),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_txt2img_matches_plain_diffusers(make_job, tiny_models) -> None:
    rows = [
        {"id": "a", "prompt": "a photo of a cat", "scheduler": "ddim"},
        {
            "id": "b",
            "prompt": "a lighthouse",
            "scheduler": "euler_a",
            "negative_prompt": "blurry",
            "seed": 5,
        },
        {
            "id": "c",
            "prompt": "a red fox in snow",
            "scheduler": "dpmpp_2m_karras",
            "steps": 5,
            "guidance_scale": 3.0,
        },
        {"id": "d", "prompt": "mountains", "scheduler": "unipc", "width": 96, "height": 64},
        {"id": "e", "prompt": "a bowl of ramen", "scheduler": "ddim"},
    ]
    _, spec = make_job(rows, name="faithful", batch_size=3)
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas().set_index("id")
    for row in meta.itertuples():
        ours = np.asarray(Image.open(row.image_uri), dtype=np.int16)
        theirs = plain_diffusers_txt2img(str(tiny_models["base"]), row)
        assert ours.shape == theirs.shape == (row.height, row.width, 3)
        diff = np.abs(ours - theirs).max()
        assert diff <= 1, f"{row.Index} ({row.scheduler}): max diff {diff}"


def test_sd2_v_prediction_matches_plain_diffusers_with_every_scheduler(
    make_job, tiny_models
) -> None:
    """SD 2.x 768-v: prediction_type and timestep spacing come from the checkpoint's
    scheduler config, whichever sampler the row names."""
    import json

    model = tiny_models["sd2-v"]
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    names = ["default", *SCHEDULERS]
    rows = [
        {"id": f"v-{name}", "prompt": f"a castle, {name}", "scheduler": name, "seed": i}
        for i, name in enumerate(names)
    ]
    _, spec = make_job(rows, name="sd2v", model=str(model), batch_size=2)
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas().set_index("id")
    assert set(meta.model_family) == {"sd2"} and len(meta) == len(names)
    for row in meta.itertuples():
        ours = np.asarray(Image.open(row.image_uri), dtype=np.int16)
        theirs = plain_diffusers_txt2img(str(model), row)
        diff = np.abs(ours - theirs).max()
        assert diff <= 1, f"{row.Index} ({row.scheduler}): max diff {diff}"

"""sdbatch must never silently change what diffusers would render.

For a few items, the PNG sdbatch wrote is compared with a plain diffusers pipeline call
built independently here (pipeline class, scheduler class, CPU generator): at most one
uint8 level apart per channel (batch size and thread count may move a value by one).
"""

from __future__ import annotations

import numpy as np
import pytest

from sdbatch.runner import read_metadata, run_job
from tests.helpers import SCHEDULERS, plain_pipeline, plain_render, rendered

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def plain_txt2img(model, row) -> np.ndarray:
    # A fresh pipeline per row: 'default' must find the checkpoint's own scheduler.
    return plain_render(plain_pipeline("StableDiffusionPipeline", model), row)


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
        ours = rendered(row)
        theirs = plain_txt2img(tiny_models["base"], row)
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
        ours = rendered(row)
        theirs = plain_txt2img(model, row)
        diff = np.abs(ours - theirs).max()
        assert diff <= 1, f"{row.Index} ({row.scheduler}): max diff {diff}"

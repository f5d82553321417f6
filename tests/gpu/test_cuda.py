"""CUDA checks: run only where a GPU is visible (skipped elsewhere, e.g. in CI here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdbatch.render import Renderer
from tests.helpers import work_item

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(600),
]


def test_fp16_on_cuda_is_finite_and_faithful_to_plain_diffusers(tiny_models) -> None:
    import diffusers

    model = str(tiny_models["base"])
    renderer = Renderer(models={"txt2img": model}, model_hashes={}, batch_size=4, device="cuda")
    assert renderer.dtype_name == "float16"
    item = work_item(model, id="a", seed=3, prompt="a cat", steps=4)
    row = renderer.render([item])[0]
    assert row["status"] == "ok"
    ours = np.frombuffer(row["pixels"], np.uint8).reshape(64, 64, 3).astype(np.int16)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float16).to(
        "cuda"
    )
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(
        prompt=["a cat"] * 4,
        num_inference_steps=4,
        guidance_scale=7.5,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(3) for _ in range(4)],
        output_type="np",
    ).images[0]
    theirs = (theirs * 255).round().astype(np.int16)
    assert np.isfinite(theirs).all()
    assert np.abs(ours - theirs).max() <= 2

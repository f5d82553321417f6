"""GPU-oriented render options must not break the CPU path (and stay faithful)."""

from __future__ import annotations

import numpy as np
import pytest

from sdbatch.render import Renderer
from tests.helpers import work_item

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def item(model: str) -> dict:
    return work_item(model, id="a", seed=1, prompt="a cat", steps=3)


def pixels(renderer: Renderer, model: str) -> np.ndarray:
    row = renderer.render([item(model)])[0]
    assert row["status"] == "ok", row
    return np.frombuffer(row["pixels"], np.uint8).astype(np.int16)


def test_memory_options_and_fp16_path_stay_faithful(tiny_models) -> None:
    model = str(tiny_models["base"])
    plain = pixels(Renderer(models={"txt2img": model}, model_hashes={}, batch_size=2), model)
    options = {"channels_last": True, "vae_slicing": True, "vae_tiling": True}
    tuned = Renderer(
        models={"txt2img": model}, model_hashes={}, batch_size=2, render_options=options
    )
    assert np.abs(pixels(tuned, model) - plain).max() <= 1
    assert tuned.render([item(model)])[0]["render_options"] == (
        '{"channels_last": true, "vae_slicing": true, "vae_tiling": true}'
    )
    # float16 exercises the decode-with-fp32-fallback path (on CPU here, CUDA in production).
    half = Renderer(
        models={"txt2img": model}, model_hashes={}, batch_size=2, device="cpu", dtype="float16"
    )
    assert half.vae_fallback and half.dtype_name == "float16"
    assert np.abs(pixels(half, model) - plain).max() <= 2

"""The Renderer without Ray (what one render actor does with a block): memory and fp16
options stay faithful, bad outputs and prompts are failure rows, only the needed models
load, adapters load once and switch per call."""

from __future__ import annotations

import shutil

import numpy as np

from sdbatch.checks import models_for
from sdbatch.render import Renderer
from sdbatch.spec import parse_spec
from tests.helpers import LONG_PROMPT, ROUND_ROBIN, sd_loras, work_item


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


def test_modes_sharing_a_unet_share_its_compiled_module(tiny_models) -> None:
    """torch_compile wraps each UNet once and every pipeline holding it gets the wrapper:
    img2img (from_pipe of txt2img) used to run uncompiled beside a compiled txt2img, and
    a rerun loading img2img alone compiled it: other kernels, other bits."""
    import torch._dynamo

    model = str(tiny_models["base"])
    renderer = Renderer(
        models={"txt2img": model, "img2img": model},
        model_hashes={},
        batch_size=2,
        render_options={"torch_compile": True, "channels_last": True},
    )
    unet = renderer.pipes["txt2img"].unet
    assert isinstance(unet, torch._dynamo.eval_frame.OptimizedModule)  # compiled lazily
    assert renderer.pipes["img2img"].unet is unet


def test_black_and_nan_outputs_are_failures_not_successes(tmp_path, tiny_models) -> None:
    """A broken checkpoint: its VAE decodes to black (huge negative bias) or NaN."""
    from safetensors.numpy import load_file, save_file

    results = {}
    for kind, value in (("black", -1e4), ("nan", np.nan)):
        model = tmp_path / kind
        shutil.copytree(tiny_models["base"], model)
        path = model / "vae" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(path)
        tensors["decoder.conv_out.bias"] = np.full_like(tensors["decoder.conv_out.bias"], value)
        save_file(tensors, path)
        renderer = Renderer(models={"txt2img": str(model)}, model_hashes={}, batch_size=2)
        item = work_item(str(model), id=kind, seed=1, prompt="a cat", steps=2)
        results[kind] = renderer.render([item])[0]
    assert (results["black"]["status"], results["black"]["error_type"]) == ("failed", "BlackImage")
    assert (results["nan"]["status"], results["nan"]["error_type"]) == ("failed", "NonFiniteOutput")


def test_txt2img_actor_loads_only_the_base_model(tiny_models) -> None:
    from sdbatch.models import loaded_modules

    spec = parse_spec(
        {
            "name": "t",
            "manifest": "/m",
            "output": "/o",
            "models": {
                "base": str(tiny_models["base"]),
                "inpaint": str(tiny_models["inpaint"]),
                "depth": str(tiny_models["depth"]),
            },
        }
    )
    needed = models_for(spec, {"txt2img"})
    assert needed == {"txt2img": str(tiny_models["base"])}
    renderer = Renderer(models=needed, model_hashes={}, batch_size=2)
    modules = loaded_modules(renderer.pipes)
    assert set(modules) == {"txt2img.unet", "txt2img.vae", "txt2img.text_encoder"}
    assert renderer.pipes["txt2img"].unet.config.in_channels == 4

    both = Renderer(
        models=models_for(spec, {"txt2img", "img2img", "inpaint"}), model_hashes={}, batch_size=2
    )
    mods = loaded_modules(both.pipes)
    # txt2img and img2img share every module; inpaint shares VAE + text encoder, has its own UNet.
    assert mods["txt2img.unet"] == mods["img2img.unet"]
    assert (
        mods["inpaint.vae"] == mods["txt2img.vae"]
        and mods["inpaint.text_encoder"] == mods["txt2img.text_encoder"]
    )
    assert mods["inpaint.unet"] != mods["txt2img.unet"]
    assert both.pipes["inpaint"].unet.config.in_channels == 9


def test_renderer_loads_each_adapter_once_and_switches(tiny_models) -> None:
    """Without Ray: one actor's Renderer over the planned blocks of round-robin items."""
    from sdbatch.plan import batch_key, homogeneous_blocks

    loras = sd_loras(tiny_models)
    renderer = Renderer(
        models={"txt2img": str(tiny_models["base"])},
        model_hashes={},
        batch_size=2,
        loras=loras,
    )
    assert renderer.adapters.loads == len(loras)
    items = []
    for i in range(8):
        item = work_item(tiny_models["base"], id=f"i{i}", seed=i, prompt_syntax="plain")
        item["loras"] = f"{ROUND_ROBIN[i % 4]}:0.7"
        item["batch_key"] = batch_key(item)
        items.append(item)
    out = [row for block in homogeneous_blocks(items, 8) for row in renderer.render(block)]
    assert [r["status"] for r in out] == ["ok"] * 8
    assert renderer.adapters.loads == len(loras)  # switching never reloads
    assert renderer.pipeline_calls == 4
    calls: dict[str, set] = {}
    for row in out:
        calls.setdefault(row["call_id"], set()).add(row["loras"])
    assert all(len(v) == 1 for v in calls.values())


def test_a_lora_only_an_actor_can_refuse_fails_its_items_only(tiny_models, tmp_path) -> None:
    """A file whose header passes the checks but whose tensors do not load: the items
    naming it are failure rows, every other item renders."""
    from safetensors.numpy import load_file, save_file

    from sdbatch.plan import batch_key, homogeneous_blocks

    good = sd_loras(tiny_models)["sd-style"]
    tensors = load_file(good)
    up = sorted(k for k in tensors if "lora.up" in k or "lora_B" in k)[0]
    tensors[up] = np.concatenate([tensors[up], tensors[up]], axis=1)  # rank 4 -> 8
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken)
    renderer = Renderer(
        models={"txt2img": str(tiny_models["base"])},
        model_hashes={},
        batch_size=2,
        loras={"broken": str(broken), "style": good},
    )
    items = []
    for i, lora in enumerate(["broken:1", "style:0.5", None]):
        item = work_item(tiny_models["base"], id=f"i{i}", seed=i, prompt_syntax="plain")
        item["loras"] = lora
        item["batch_key"] = batch_key(item)
        items.append(item)
    out = {r["id"]: r for block in homogeneous_blocks(items, 3) for r in renderer.render(block)}
    assert out["i0"]["status"] == "failed" and out["i0"]["error_type"] == "AdapterError"
    assert "broken" in out["i0"]["error_message"]
    assert out["i1"]["status"] == out["i2"]["status"] == "ok"


def test_long_prompt_fails_when_asked(tiny_models) -> None:

    renderer = Renderer(
        models={"txt2img": str(tiny_models["base"])},
        model_hashes={},
        batch_size=1,
        prompt_overflow="fail",
    )
    item = work_item(str(tiny_models["base"]), id="x", seed=1, prompt=LONG_PROMPT, steps=2)
    row = renderer.render([item])[0]
    assert (row["status"], row["error_type"]) == ("failed", "PromptTooLong")
    assert "CLIP tokens, limit 77" in row["error_message"]

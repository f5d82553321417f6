"""The tiny pipelines: byte-identical rebuilds, shared SDXL component files, and every variant
loaded through plain diffusers `from_pretrained` and rendered (64 px, 2 steps, CPU)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbatch.tiny import VARIANTS, build_tiny

SDXL_PIPELINES = ("sdxl", "sdxl-inpaint", "sdxl-refiner")


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def generator():
    import torch

    return torch.Generator("cpu").manual_seed(0)


def assert_picture(image: np.ndarray) -> None:
    """A 64 px RGB float image that is finite and not one flat colour."""
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.01


def loaded(pipeline_class, path: Path):
    pipe = pipeline_class.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(tiny_models) -> dict[str, Path]:
    """The session's build (kept between sessions); test_rebuild builds afresh beside it."""
    return tiny_models


@pytest.fixture(scope="module")
def sdxl(tiny):
    from diffusers import StableDiffusionXLPipeline

    return loaded(StableDiffusionXLPipeline, tiny["sdxl"])


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(noise)


def test_every_variant_is_built(tiny) -> None:
    assert set(tiny) == set(VARIANTS)
    assert {"sd2-v", *SDXL_PIPELINES, "sdxl-controlnet-depth"} <= set(VARIANTS)


def test_rebuild_gives_byte_identical_files(tiny, tmp_path) -> None:
    again = build_tiny(tmp_path)
    for name in VARIANTS:
        first, second = file_hashes(tiny[name]), file_hashes(again[name])
        assert first, f"{name}: no files"
        assert first == second, name
    # The LoRAs and embeddings the build writes beside them, too.
    root = tiny["base"].parent
    adapters = sorted(
        p.relative_to(root) for folder in ("loras", "embeddings") for p in root.glob(f"{folder}/*")
    )
    assert len([p for p in adapters if p.suffix == ".safetensors"]) == 8
    for rel in adapters:
        assert (root / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_complete_folders_are_kept_pipeline_or_lone_model(tiny) -> None:
    # A pipeline is complete with model_index.json, a lone model (the ControlNet) with config.json.
    markers = [tiny["sdxl"] / "model_index.json", tiny["sdxl-controlnet-depth"] / "config.json"]
    before = [m.stat().st_mtime_ns for m in markers]
    build_tiny(tiny["sdxl"].parent, ["sdxl", "sdxl-controlnet-depth"])
    assert [m.stat().st_mtime_ns for m in markers] == before


def test_sdxl_pipelines_share_component_files(tiny) -> None:
    def component(name: str, folder: str) -> dict[str, str]:
        return file_hashes(tiny[name] / folder)

    for folder in ("vae", "text_encoder_2", "tokenizer_2", "scheduler"):
        files = [component(name, folder) for name in SDXL_PIPELINES]
        assert files[0] and files[0] == files[1] == files[2], folder
    for folder in ("text_encoder", "tokenizer"):
        assert component("sdxl", folder) == component("sdxl-inpaint", folder), folder
    # Every tokenizer folder also ships the slow-tokenizer files real checkpoints have.
    for name in SDXL_PIPELINES:
        assert {"vocab.json", "merges.txt"} <= set(component(name, "tokenizer_2"))
    assert not (tiny["sdxl-refiner"] / "tokenizer").exists()
    assert not (tiny["sdxl-refiner"] / "text_encoder").exists()


def test_sdxl_renders(sdxl) -> None:
    assert sdxl.config.force_zeros_for_empty_prompt is True
    assert sdxl.vae.config.scaling_factor == 0.13025 and sdxl.vae.config.force_upcast
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    out = sdxl("a cat", num_inference_steps=2, generator=generator(), output_type="np")
    assert_picture(out.images[0])


def test_sdxl_inpaint_renders(tiny, init_image) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = loaded(StableDiffusionXLInpaintPipeline, tiny["sdxl-inpaint"])
    assert pipe.unet.config.in_channels == 9
    assert pipe.config.requires_aesthetics_score is False
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = pipe(
        "a cat",
        image=init_image,
        mask_image=mask,
        num_inference_steps=2,
        strength=1.0,
        generator=generator(),
        output_type="np",
    )
    assert_picture(out.images[0])


def test_refiner_img2img_and_two_stage_after_base(tiny, sdxl, init_image) -> None:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = loaded(StableDiffusionXLImg2ImgPipeline, tiny["sdxl-refiner"])
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score is True
    assert refiner.config.force_zeros_for_empty_prompt is False
    out = refiner(
        "a cat",
        image=init_image,
        num_inference_steps=2,
        strength=0.6,
        generator=generator(),
        output_type="np",
    )
    assert_picture(out.images[0])

    # The documented ensemble of experts: base denoises the first 80 %, refiner the rest.
    latents = sdxl(
        "a cat",
        num_inference_steps=2,
        denoising_end=0.8,
        output_type="latent",
        generator=generator(),
    ).images
    assert latents.shape == (1, 4, 8, 8)
    out = refiner(
        "a cat",
        image=latents,
        num_inference_steps=2,
        denoising_start=0.8,
        generator=generator(),
        output_type="np",
    )
    assert_picture(out.images[0])


def test_sd2_v_loads_as_v_prediction_and_renders(tiny) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = loaded(StableDiffusionPipeline, tiny["sd2-v"])
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection is True
    assert pipe.text_encoder.config.hidden_act == "gelu"
    out = pipe("a cat", num_inference_steps=2, generator=generator(), output_type="np")
    assert_picture(out.images[0])


def test_controlnet_control_image_changes_the_picture(tiny, sdxl, init_image) -> None:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

    assert sorted(p.name for p in tiny["sdxl-controlnet-depth"].iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    controlnet = ControlNetModel.from_pretrained(
        tiny["sdxl-controlnet-depth"], local_files_only=True
    )
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(sdxl, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)  # not carried over by from_pipe
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    depth = Image.fromarray(ramp).convert("RGB")

    def render(control: Image.Image) -> np.ndarray:
        out = pipe(
            "a cat",
            image=init_image,
            control_image=control,
            num_inference_steps=2,
            strength=0.8,
            generator=generator(),
            output_type="np",
        )
        return out.images[0]

    near_left, near_right = render(depth), render(depth.transpose(Image.FLIP_LEFT_RIGHT))
    assert_picture(near_left)
    assert_picture(near_right)
    # Visibly different, not just float noise: more than one level of 255 on average.
    assert np.abs(near_left - near_right).mean() * 255 > 1


def test_an_unwritable_folder_is_a_message_not_a_traceback(tmp_path) -> None:
    from tests.helpers import sdbatch_cli

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = sdbatch_cli("models", "tiny", blocker / "models")
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {blocker / 'models'}"), result.output
    assert "cannot write the tiny models" in result.output and "Traceback" not in result.output

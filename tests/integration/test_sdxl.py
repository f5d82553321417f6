"""SDXL beside SD 1.x: the same job machinery, pixels equal to plain diffusers calls.

The reference calls are written here by hand from diffusers' documentation (pipeline
class, scheduler, CPU generator, the refiner's two-stage call), not from sdbatch's code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sdbatch.manifest import ManifestInfo
from sdbatch.runner import read_metadata, run_job
from tests.helpers import load_job, make_inputs, sdbatch_cli, write_manifest, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _load(cls, path, **components):
    pipe = cls.from_pretrained(str(path), local_files_only=True, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_txt2img_refiner_and_base_inpaint_match_plain_diffusers(
    make_job, tiny_models, tmp_path
) -> None:
    img = make_inputs(tmp_path / "inputs")
    rows = [
        {"id": "plain", "prompt": "a photo of a cat", "refiner_switch": 1.0},
        {"id": "neg", "prompt": "a lighthouse", "negative_prompt": "blurry", "refiner_switch": 1.0},
        {"id": "refined", "prompt": "a red fox in snow", "seed": 5},
        {  # no models.inpaint: the base checkpoint inpaints (4-channel UNet)
            "id": "inpaint-base",
            "prompt": "a hat",
            "mode": "inpaint",
            "init_image": str(img["init"]),
            "mask_image": str(img["mask_soft"]),
            "strength": 0.8,
            "refiner_switch": 1.0,
        },
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
    inpaint = _load(diffusers.StableDiffusionXLInpaintPipeline, base_path)
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
        elif row.Index == "inpaint-base":
            theirs = inpaint(
                **common,
                image=Image.open(img["init"]).convert("RGB"),
                mask_image=Image.open(img["mask_soft"]),
                strength=0.8,
                width=64,
                height=64,
            ).images[0]
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


# --- every SDXL mode in one job (run once per module) ---------------------------------


@pytest.fixture(scope="module")
def sdxl_mixed(tmp_path_factory, tiny_models, ray_session):
    """img2img, inpaint (9-channel UNet), depth ControlNet (a single file; estimated and
    provided depth) and per-item bad inputs in one SDXL job, first stopped part-way, then
    resumed."""
    import threading

    root = tmp_path_factory.mktemp("sdxl-mixed")
    img = make_inputs(root / "inputs")
    rows = []
    for i in range(2):
        rows += [
            {"id": f"t{i}", "prompt": f"a cat {i}", "mode": "txt2img"},
            {
                "id": f"i{i}",
                "prompt": f"a dog {i}",
                "mode": "img2img",
                "init_image": "inputs/init.png",
                "strength": 0.6,
            },
            {
                "id": f"p{i}",
                "prompt": f"a hat {i}",
                "mode": "inpaint",
                "init_image": "inputs/init.png",
                "mask_image": "inputs/mask.png",
                "strength": 0.8,
            },
            {
                "id": f"d{i}",
                "prompt": f"a room {i}",
                "mode": "depth2img",
                "init_image": "inputs/init2.jpg",
                "strength": 0.7,
            },
        ]
    rows += [
        {
            "id": "d-map",
            "prompt": "a room with depth",
            "mode": "depth2img",
            "init_image": "inputs/init.png",
            "depth_map": "inputs/depth.png",
            "strength": 0.7,
            "controlnet_conditioning_scale": 0.5,
        },
        {
            "id": "corrupt-file",
            "prompt": "x",
            "mode": "img2img",
            "init_image": "inputs/corrupt.png",
            "strength": 0.6,
        },
        {
            "id": "missing-file",
            "prompt": "x",
            "mode": "depth2img",
            "init_image": "inputs/nope.png",
            "strength": 0.6,
        },
        {
            "id": "mask-mismatch",
            "prompt": "x",
            "mode": "inpaint",
            "init_image": "inputs/init.png",
            "mask_image": "inputs/mask_small.png",
            "strength": 0.8,
        },
    ]
    spec = load_job(
        root,
        None,
        rows,
        output=str(root / "out"),
        models={
            "base": str(tiny_models["sdxl"]),
            "inpaint": str(tiny_models["sdxl-inpaint"]),
            # The ControlNet as one file, its config from its folder (the folder itself
            # loads in test_sdxl_actor_holds_each_module_once).
            "depth_controlnet": f"{tiny_models['sdxl-controlnet-depth']}.safetensors",
            "depth_estimator": str(tiny_models["depth"]),
            "config": {"depth_controlnet": str(tiny_models["sdxl-controlnet-depth"])},
        },
        defaults={"scheduler": "default", "steps": 4, "guidance_scale": 5.0},
        batch_size=2,
        execution={"commit_rows": 2, "commit_seconds": 1},
    )
    stop = threading.Event()

    def on_progress(p) -> None:
        if p.done >= 2:
            stop.set()

    with pytest.raises(KeyboardInterrupt):
        run_job(spec, on_progress=on_progress, stop=stop)
    first = read_metadata(spec.output).to_pandas()
    resumed = run_job(spec)
    meta = read_metadata(spec.output).to_pandas()
    return {
        "spec": spec,
        "rows": rows,
        "inputs": img,
        "first": first,
        "resumed": resumed,
        "meta": meta.set_index("id"),
        "all_rows": meta,
    }


def _row(meta: pd.DataFrame, item_id: str):
    return next(meta.loc[[item_id]].reset_index().itertuples())


def test_sdxl_job_resumes_exactly_once_with_failure_rows(sdxl_mixed) -> None:
    first, resumed, all_rows = sdxl_mixed["first"], sdxl_mixed["resumed"], sdxl_mixed["all_rows"]
    ok_ids = {r["id"] for r in sdxl_mixed["rows"]} - {
        "corrupt-file",
        "missing-file",
        "mask-mismatch",
    }
    assert 2 <= len(first) < len(ok_ids)
    assert not all_rows.duplicated(["id", "image_index"]).any()
    assert set(all_rows["id"]) == ok_ids and set(all_rows["model_family"]) == {"sdxl"}
    assert resumed.skipped == len(first) and resumed.done == len(ok_ids) - len(first)
    fails = pd.read_parquet(Path(sdxl_mixed["spec"].output, "failures")).set_index("id")
    assert fails.loc["corrupt-file", "error_type"] == "CorruptImage"
    assert fails.loc["missing-file", "error_type"] == "MissingInput"
    assert fails.loc["mask-mismatch", "error_type"] == "MaskSizeMismatch"
    meta = sdxl_mixed["meta"]
    spec = sdxl_mixed["spec"]
    assert meta.loc["p0", "model"] == spec.models.inpaint
    assert meta.loc["d0", "controlnet"] == spec.models.depth_controlnet
    assert meta.loc["d0", "depth_source"] == "estimated" and meta.loc["d0", "depth_estimator"]
    assert meta.loc["d-map", "depth_source"] == "provided"
    assert meta.loc["d-map", "controlnet_conditioning_scale"] == 0.5
    assert meta.loc["d0", "controlnet_conditioning_scale"] == 0.8
    assert pd.isna(meta.loc["i0", "controlnet"])


def _common(row) -> dict:
    return dict(
        prompt=row.prompt,
        negative_prompt=row.negative_prompt or None,
        num_inference_steps=int(row.steps),
        guidance_scale=float(row.guidance_scale),
        generator=torch.Generator("cpu").manual_seed(int(row.seed)),
    )


def _assert_close(row, theirs) -> None:
    diff = np.abs(_pixels(Image.open(row.image_uri)) - _pixels(theirs)).max()
    assert diff <= 1, f"{row.id}: max diff {diff}"


def test_sdxl_img2img_and_inpaint_match_plain_diffusers(sdxl_mixed, tiny_models) -> None:
    meta, img = sdxl_mixed["meta"], sdxl_mixed["inputs"]
    init = Image.open(img["init"]).convert("RGB")
    img2img = _load(diffusers.StableDiffusionXLImg2ImgPipeline, tiny_models["sdxl"])
    for item_id in ("i0", "i1"):
        row = _row(meta, item_id)
        theirs = img2img(**_common(row), image=init, strength=float(row.strength)).images[0]
        _assert_close(row, theirs)
    inpaint = _load(diffusers.StableDiffusionXLInpaintPipeline, tiny_models["sdxl-inpaint"])
    assert inpaint.unet.config.in_channels == 9
    row = _row(meta, "p1")
    theirs = inpaint(
        **_common(row),
        image=init,
        mask_image=Image.open(img["mask"]),
        strength=float(row.strength),
        width=64,
        height=64,
    ).images[0]
    _assert_close(row, theirs)


def _dpt_depth(folder, image: Image.Image, size: int = 64) -> Image.Image:
    """diffusers' SDXL depth ControlNet example (`get_depth_map`), on CPU."""
    from transformers import AutoImageProcessor, DPTForDepthEstimation

    estimator = DPTForDepthEstimation.from_pretrained(str(folder / "depth_estimator"))
    processor = AutoImageProcessor.from_pretrained(str(folder / "feature_extractor"))
    pixel_values = processor(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        depth_map = estimator(pixel_values).predicted_depth
    depth_map = torch.nn.functional.interpolate(
        depth_map.unsqueeze(1), size=(size, size), mode="bicubic", align_corners=False
    )
    depth_min = torch.amin(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_max = torch.amax(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_map = (depth_map - depth_min) / (depth_max - depth_min)
    image = torch.cat([depth_map] * 3, dim=1).permute(0, 2, 3, 1).cpu().numpy()[0]
    return Image.fromarray((image * 255.0).clip(0, 255).astype(np.uint8))


def test_sdxl_depth_controlnet_matches_plain_diffusers(sdxl_mixed, tiny_models) -> None:
    """The single-file ControlNet renders as plain diffusers with its folder's model."""
    from sdbatch.models import model_hash, use_layouts

    meta, img = sdxl_mixed["meta"], sdxl_mixed["inputs"]
    single_file = sdxl_mixed["spec"].models.depth_controlnet
    use_layouts(sdxl_mixed["spec"].models.layouts())
    depth_rows = meta[meta["mode"] == "depth2img"].dropna(subset=["sha256"])
    assert set(depth_rows.controlnet) == {single_file}
    assert set(depth_rows.controlnet_sha256) == {model_hash(single_file).sha256}
    controlnet = diffusers.ControlNetModel.from_pretrained(
        str(tiny_models["sdxl-controlnet-depth"]), local_files_only=True
    )
    pipe = _load(
        diffusers.StableDiffusionXLControlNetImg2ImgPipeline,
        tiny_models["sdxl"],
        controlnet=controlnet,
    )
    init = Image.open(img["init_jpg"]).convert("RGB")
    control = _dpt_depth(tiny_models["depth"], init)
    row = _row(meta, "d1")
    theirs = pipe(
        **_common(row),
        image=init,
        control_image=control,
        strength=float(row.strength),
        controlnet_conditioning_scale=0.8,
    ).images[0]
    _assert_close(row, theirs)
    # A user's 16-bit depth map: scaled to 0..255 (min-max) and given as the control image.
    depth = np.asarray(Image.open(img["depth"]), dtype=np.float64)
    depth = (depth - depth.min()) / (depth.max() - depth.min()) * 255.0
    provided = Image.fromarray(depth.round().astype(np.uint8), "L").convert("RGB")
    row = _row(meta, "d-map")
    theirs = pipe(
        **_common(row),
        image=Image.open(img["init"]).convert("RGB"),
        control_image=provided,
        strength=float(row.strength),
        controlnet_conditioning_scale=0.5,
    ).images[0]
    _assert_close(row, theirs)
    # The control image moves the output: the same item without it differs.
    plain = _load(diffusers.StableDiffusionXLImg2ImgPipeline, tiny_models["sdxl"])
    unconditioned = plain(
        **_common(row), image=Image.open(img["init"]).convert("RGB"), strength=0.7
    ).images[0]
    assert np.abs(_pixels(Image.open(row.image_uri)) - _pixels(unconditioned)).max() > 1


def test_sdxl_rerun_verifies_bit_exact(sdxl_mixed) -> None:
    ids = ["t0", "i1", "p0", "d0", "d-map"]
    out = sdxl_mixed["spec"].output
    proc = sdbatch_cli("rerun", out, "--verify", *[a for i in ids for a in ("--ids", i)])
    assert proc.exit_code == 0, proc.output
    assert f"reproduced {len(ids)}/{len(ids)} bit-exact" in proc.output


def test_sdxl_actor_holds_each_module_once(tiny_models) -> None:
    from sdbatch.checks import aux_models, models_for
    from sdbatch.models import loaded_modules
    from sdbatch.render import Renderer
    from sdbatch.spec import parse_spec

    spec = parse_spec(
        {
            "name": "t",
            "manifest": "/m",
            "output": "/o",
            "models": {
                "base": str(tiny_models["sdxl"]),
                "inpaint": str(tiny_models["sdxl-inpaint"]),
                "depth_controlnet": str(tiny_models["sdxl-controlnet-depth"]),
                "depth_estimator": str(tiny_models["depth"]),
                "refiner": str(tiny_models["sdxl-refiner"]),
            },
        }
    )
    modes = {"txt2img", "img2img", "inpaint", "depth2img"}
    renderer = Renderer(
        models=models_for(spec, modes),
        model_hashes={},
        batch_size=2,
        device="cpu",
        dtype="float16",  # what a GPU job holds
        **aux_models(spec, ManifestInfo("m", 4, 4, [], modes, estimates_depth=True)),
    )
    mods = loaded_modules(renderer.pipes)
    shared = ("vae", "text_encoder", "text_encoder_2")
    # txt2img, img2img and depth2img (ControlNet img2img) run the base: one of each module.
    for mode in ("img2img", "depth2img"):
        for name in ("unet", *shared):
            assert mods[f"{mode}.{name}"] == mods[f"txt2img.{name}"], (mode, name)
    assert mods["depth2img.controlnet"] not in {v for k, v in mods.items() if "controlnet" not in k}
    # The inpaint checkpoint has its own 9-channel UNet and the base's VAE and text encoders.
    for name in shared:
        assert mods[f"inpaint.{name}"] == mods[f"txt2img.{name}"], name
    assert mods["inpaint.unet"] != mods["txt2img.unet"]
    assert renderer.pipes["inpaint"].unet.config.in_channels == 9
    # The refiner keeps its own UNet and shares the base's second text encoder and VAE.
    refined = loaded_modules(renderer.refiners)
    assert refined["txt2img.unet"] not in set(mods.values())
    assert refined["txt2img.text_encoder_2"] == mods["txt2img.text_encoder_2"]
    assert refined["txt2img.vae"] == mods["txt2img.vae"]
    assert renderer.depth_estimator is not None
    # No invisible watermark, whether or not the package is installed on this node.
    assert all(p.watermark is None for p in [*renderer.pipes.values(), *renderer.refiners.values()])
    unets = {v for k, v in [*mods.items(), *refined.items()] if k.endswith(".unet")}
    assert len(unets) == 3  # base, inpaint, refiner: nothing loaded twice
    # Every module in the job's dtype (diffusers' from_pipe casts to fp32 unless told),
    # but the depth estimator: fp32 on purpose (`lone.load_depth_estimator`).
    pipes = [*renderer.pipes.values(), *renderer.refiners.values()]
    dtypes = {
        p.dtype
        for pipe in pipes
        for module in pipe.components.values()
        if hasattr(module, "parameters")
        for p in module.parameters()
    }
    assert dtypes == {torch.float16}
    estimator, _ = renderer.depth_estimator
    assert {p.dtype for p in estimator.parameters()} == {torch.float32}

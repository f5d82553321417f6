"""Single-file checkpoints: the tiny exports, what their header says, what is hashed."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from sdbatch.errors import UserError
from sdbatch.singlefile import describe
from sdbatch.weights import hash_single_file


def single(tiny_models, variant: str):
    return tiny_models[variant].with_suffix(".safetensors")


@pytest.mark.parametrize(
    "variant, family, refiner, channels, components",
    [
        ("base", "sd1", False, 4, ("unet", "vae", "text_encoder")),
        ("inpaint", "sd1", False, 9, ("unet", "vae", "text_encoder")),
        ("sd2-v", "sd2", False, 4, ("unet", "vae", "text_encoder")),
        ("sdxl", "sdxl", False, 4, ("unet", "vae", "text_encoder", "text_encoder_2")),
        ("sdxl-inpaint", "sdxl", False, 9, ("unet", "vae", "text_encoder", "text_encoder_2")),
        ("sdxl-refiner", "sdxl", True, 4, ("unet", "vae", "text_encoder_2")),
    ],
)
def test_header_tells_family_channels_and_components(
    tiny_models, variant, family, refiner, channels, components
) -> None:
    info = describe(single(tiny_models, variant))
    assert (info.family, info.refiner, info.unet_in_channels) == (family, refiner, channels)
    assert info.components == components


def test_default_layouts_are_the_repositories_diffusers_picks(tiny_models) -> None:
    assert describe(single(tiny_models, "base")).default_config == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    assert describe(single(tiny_models, "sdxl")).default_config == (
        "stabilityai/stable-diffusion-xl-base-1.0"
    )
    assert describe(single(tiny_models, "sdxl-refiner")).default_config == (
        "stabilityai/stable-diffusion-xl-refiner-1.0"
    )


def test_export_is_byte_identical_on_rebuild(tiny_models, tmp_path) -> None:
    from sdbatch.ldm import write_original

    for variant in ("base", "sdxl"):
        again = write_original(tiny_models[variant], tmp_path / f"{variant}.safetensors")
        assert again.read_bytes() == single(tiny_models, variant).read_bytes()


def test_files_that_are_not_original_checkpoints_are_refused(tiny_models, tmp_path) -> None:
    unet_only = tiny_models["base"] / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(UserError, match="diffusers-layout tensors of one model"):
        describe(unet_only)
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable .safetensors"):
        describe(garbage)
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    other = tmp_path / "other.safetensors"
    other.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(UserError, match="no UNet in the original layout"):
        describe(other)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"PK")
    with pytest.raises(UserError, match="not a readable .ckpt file"):
        describe(pickled)


class Payload:  # a weights-only load refuses to build it
    pass


def test_a_ckpt_is_read_with_the_weights_only_unpickler(tiny_models, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(single(tiny_models, "sdxl"))
    ckpt = tmp_path / "sdxl.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, ckpt)
    assert describe(ckpt) == describe(single(tiny_models, "sdxl"))
    legacy = tmp_path / "legacy.ckpt"  # torch's pre-zip format: not memory-mappable
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert describe(legacy) == describe(single(tiny_models, "sdxl"))
    objects = tmp_path / "objects.ckpt"
    torch.save({"state_dict": state, "callback": Payload()}, objects)
    with pytest.raises(UserError, match=r"pickles tests\.unit\.test_singlefile\.Payload"):
        describe(objects)
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        describe(tmp_path / "list.ckpt")


def test_hash_covers_the_file_and_what_the_layout_gives(tiny_models, tmp_path) -> None:
    file = single(tiny_models, "base")
    layout = tmp_path / "layout"
    shutil.copytree(tiny_models["base"], layout)
    provided = describe(file).components
    before = hash_single_file(file, layout, provided)
    assert set(before.components) >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert "layout/unet/diffusion_pytorch_model.safetensors" not in before.files

    # The layout's own weights for what the file holds are never loaded: no change.
    (layout / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"other")
    assert hash_single_file(file, layout, provided).sha256 == before.sha256

    # Its scheduler config is loaded: a change, named by component.
    scheduler = layout / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "steps_offset": 0}))
    after = hash_single_file(file, layout, provided)
    assert after.sha256 != before.sha256
    changed = {k for k in after.components if after.components[k] != before.components[k]}
    assert changed == {"scheduler"}

    # Two different files never share a component hash (so never share a loaded module).
    other = hash_single_file(single(tiny_models, "inpaint"), layout, provided)
    assert other.components["vae"] != after.components["vae"]
    assert other.components["tokenizer"] == after.components["tokenizer"]


def test_a_single_file_controlnet_is_checked_against_its_layout(
    tiny_models, tmp_path, monkeypatch
) -> None:
    """SDXL ControlNets are shared as one diffusers-layout file: it takes its config from
    models.config.depth_controlnet (else CONTROLNET_LAYOUT, here not in the offline cache),
    and what cannot work is named before anything renders."""
    from safetensors.numpy import load_file, save_file

    from sdbatch.lone import CONTROLNET_LAYOUT, check_controlnet
    from sdbatch.models import use_layouts

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    folder = tiny_models["sdxl-controlnet-depth"]
    tensors = load_file(single(tiny_models, "sdxl-controlnet-depth"))

    def file(name: str, state: dict) -> str:
        save_file(state, str(tmp_path / name))
        return str(tmp_path / name)

    good = file("cn.safetensors", tensors)
    narrow = tmp_path / "narrow"
    shutil.copytree(folder, narrow)
    config = json.loads((narrow / "config.json").read_text())
    config["conditioning_embedding_out_channels"] = [8, 32, 48, 64]
    (narrow / "config.json").write_text(json.dumps(config))
    sd15 = {k: v for k, v in tensors.items() if not k.startswith("add_embedding.")}
    ldm = {f"control_model.{k.replace('controlnet_cond_embedding.conv_in', 'input_hint_block.0')}": v for k, v in sd15.items()}  # fmt: skip
    cases = {
        good: (str(folder), None),
        f"{tmp_path}/default.safetensors": (None, CONTROLNET_LAYOUT),
        str(single(tiny_models, "sdxl")): (str(folder), "not a ControlNet"),
        file("sd15.safetensors", sd15): (str(folder), "an SD 1.x/2.x ControlNet"),
        file("ldm.safetensors", ldm): (str(folder), "original (LDM) layout"),
        f"{tmp_path}/narrow.safetensors": (str(narrow), "do not fit the layout"),
        f"{tmp_path}/pipeline-layout.safetensors": (str(tiny_models["sdxl"]), "config.json"),
    }
    for name in ("default", "narrow", "pipeline-layout"):
        shutil.copy(good, tmp_path / f"{name}.safetensors")
    for ref, (layout, expected) in cases.items():
        use_layouts({ref: layout} if layout else {})
        problem = check_controlnet(ref)
        if expected is None:
            assert problem is None, (ref, problem)
        else:
            assert problem and expected in problem and ref in problem, (ref, problem)
    use_layouts({})

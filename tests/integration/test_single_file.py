"""Single-file `.safetensors` checkpoints (the A1111/Civitai format) through from_single_file:
the same pixels as plain diffusers on the model's folder, from disk, S3 or with a hub
layout, and clear refusals for what cannot work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sdbatch.cli import app
from sdbatch.errors import UserError
from sdbatch.runner import read_metadata, run_job
from sdbatch.spec import load_spec
from tests.helpers import (
    load_job,
    plain_pipeline,
    plain_render,
    prompts,
    rendered,
    write_manifest,
    write_spec,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def single(tiny_models, variant: str) -> Path:
    return tiny_models[variant].with_suffix(".safetensors")


@pytest.mark.parametrize(
    "variant, pipeline",
    [("base", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")],
)
def test_single_file_renders_as_plain_diffusers_on_its_folder(
    variant, pipeline, tiny_models, tmp_path, ray_session
) -> None:
    from sdbatch.rerun import rerun

    manifest = write_manifest(tmp_path / "m.parquet", prompts(3))
    spec = load_spec(
        write_spec(
            tmp_path / "job.yaml",
            manifest=str(manifest),
            output=str(tmp_path / "out"),
            models={
                "base": str(single(tiny_models, variant)),
                "config": {"base": str(tiny_models[variant])},
            },
            batch_size=2,
            defaults={"steps": 3},
        )
    )
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas()
    assert set(meta.status) == {"ok"} and len(meta) == 3
    pipe = plain_pipeline(pipeline, tiny_models[variant])
    for row in meta.itertuples():
        theirs = plain_render(pipe, row)
        diff = np.abs(rendered(row) - theirs).max()
        assert diff <= 1, f"{row.id}: max diff {diff}"
    assert set(meta.model) == {str(single(tiny_models, variant))}
    models = json.loads(Path(spec.output, "_MODELS.json").read_text())
    (recorded,) = models.values()
    assert {"unet", "vae", "scheduler", "tokenizer"} <= set(recorded["components"])

    # rerun takes the layout from the stored job.yaml and reproduces the bits.
    report = rerun(spec.output, ids=[meta.id.iloc[0]], verify=True)
    assert [o.status for o in report.outcomes] == ["exact"]


def test_single_file_on_s3_is_downloaded_once_and_renders_the_same(
    s3_server, tiny_models, tmp_path, monkeypatch, ray_session
) -> None:
    bucket = s3_server.bucket("ckpts")
    file = single(tiny_models, "base")
    s3_server.client.put_object(Bucket=bucket, Key="sd/base.safetensors", Body=file.read_bytes())
    # A neighbour with a longer name is not the object asked for.
    s3_server.client.put_object(Bucket=bucket, Key="sd/base.safetensors.bak", Body=b"x" * 10)
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("SDBATCH_CACHE_DIR", str(cache))

    def job(name: str, model: str):
        models = {"base": model, "config": {"base": str(tiny_models["base"])}}
        storage = s3_server.storage()
        return load_job(tmp_path, None, 2, name=name, models=models, storage=storage, steps=2)

    remote, local = job("remote", f"s3://{bucket}/sd/base.safetensors"), job("local", str(file))
    run_job(remote)
    run_job(local)
    a = read_metadata(remote.output).to_pandas().set_index("id")
    b = read_metadata(local.output).to_pandas().set_index("id")
    assert set(a.status) == {"ok"} and len(a) == 2
    for item_id, row in a.iterrows():
        assert np.array_equal(rendered(row), rendered(b.loc[item_id]))
    assert (a.model_sha256 == b.model_sha256.iloc[0]).all()
    log = [
        json.loads(line) for line in (cache / "models" / "downloads.log").read_text().splitlines()
    ]
    # One download for the driver and the actor (a warm node's next job: test_model_sources).
    assert [entry["files"] for entry in log] == [1]


COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def test_default_layout_comes_from_the_hub_repository_diffusers_would_use(
    tiny_models, tmp_path, monkeypatch
) -> None:
    """No models.config: the layout is stable-diffusion-v1-5/stable-diffusion-v1-5, from
    the HF cache; without it offline, one clear message."""
    import huggingface_hub.constants

    manifest = write_manifest(tmp_path / "m.parquet", prompts(1))
    spec = write_spec(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        model=str(single(tiny_models, "base")),
    )
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "the default layout for such a file stable-diffusion-v1-5/stable-diffusion-v1-5" in text
    assert "set models.config" in text

    repo = cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    shutil.copytree(tiny_models["base"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    from sdbatch.models import _inspect_file, _inspect_folder

    _inspect_file.cache_clear()
    _inspect_folder.cache_clear()
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0, result.output


def test_layout_download_fetches_configs_not_weights(tiny_models, tmp_path) -> None:
    """Online, against a hub on 127.0.0.1: the layout of a single file is fetched without
    the weights the file already holds."""
    import os
    import subprocess
    import sys

    from tests.hfserver import HubServer

    server = HubServer("sdbatch-tests/layout", tiny_models["base"], COMMIT)
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(
        HF_ENDPOINT=server.endpoint, HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1"
    )
    manifest = write_manifest(tmp_path / "m.parquet", prompts(1))
    spec = write_spec(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        models={
            "base": str(single(tiny_models, "base")),
            "config": {"base": "sdbatch-tests/layout"},
        },
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sdbatch.cli", "validate", str(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    fetched = set(server.downloads)
    assert "scheduler/scheduler_config.json" in fetched and "unet/config.json" in fetched
    assert "tokenizer/vocab.json" in fetched
    assert not {f for f in fetched if f.endswith(".safetensors")}


def validate(tmp_path, **models) -> str:
    manifest = write_manifest(tmp_path / "m.parquet", prompts(1))
    spec = write_spec(
        tmp_path / "job.yaml", manifest=str(manifest), output=str(tmp_path / "o"), models=models
    )
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_validate_refuses_what_cannot_work(tiny_models, tmp_path) -> None:
    sdxl, base = str(single(tiny_models, "sdxl")), str(tiny_models["base"])
    text = validate(tmp_path, base=sdxl, config={"base": base})
    assert f"model {sdxl}: an SDXL single file with a 4-channel UNet, but its layout" in text
    assert "is SD 1.x with a 4-channel UNet" in text

    unet = str(tiny_models["base"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert "diffusers-layout tensors of one model" in validate(tmp_path, base=unet)

    text = validate(tmp_path, base=base, config={"base": base})
    assert "config.base gives the layout of a single-file .safetensors checkpoint" in text
    text = validate(tmp_path, base=sdxl, config={"controlnet": base})
    assert "keys are checkpoint fields" in text
    assert "file not found" in validate(tmp_path, base=str(tmp_path / "nope.safetensors"))


def test_resume_refuses_a_changed_layout(tiny_models, tmp_path, ray_session) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(tiny_models["base"], layout)
    manifest = write_manifest(tmp_path / "m.parquet", prompts(2))
    path = write_spec(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        models={"base": str(single(tiny_models, "base")), "config": {"base": str(layout)}},
        defaults={"steps": 2},
    )
    run_job(load_spec(path))
    scheduler = layout / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "steps_offset": 0}))
    from sdbatch.models import _inspect_file

    _inspect_file.cache_clear()
    with pytest.raises(UserError, match="scheduler changed"):
        run_job(load_spec(path))


class Payload:  # what a weights-only load refuses to build
    pass


def test_a_pickled_ckpt_loads_only_with_allow_pickle_and_renders_as_plain_diffusers(
    tiny_models, tmp_path, ray_session
) -> None:
    """The A1111 `.ckpt` (a pickled `{"state_dict": ...}`): refused by default, naming
    the file and `models.allow_pickle`; with it, read with torch's weights-only loader and
    rendered like plain diffusers on the model's folder. One holding more than tensors
    (a pickled object) is refused even then: nothing in it runs."""
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "base.ckpt"
    state = load_file(single(tiny_models, "base"))
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, ckpt)
    models = {"base": str(ckpt), "config": {"base": str(tiny_models["base"])}}
    text = validate(tmp_path, **models)
    assert f"models.base {ckpt}: loads pickled weights (base.ckpt)" in text, text
    assert "models.allow_pickle: true" in text, text

    spec = load_job(tmp_path, None, 2, models={**models, "allow_pickle": True}, steps=3)
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas()
    assert set(meta.status) == {"ok"} and len(meta) == 2
    pipe = plain_pipeline("StableDiffusionPipeline", tiny_models["base"])
    for row in meta.itertuples():
        assert np.abs(rendered(row) - plain_render(pipe, row)).max() <= 1, row.id

    torch.save({"state_dict": state, "callback": Payload()}, tmp_path / "objects.ckpt")
    text = validate(tmp_path, base=str(tmp_path / "objects.ckpt"), config=models["config"])
    assert "a .ckpt holding more than tensors is not loaded" in text, text

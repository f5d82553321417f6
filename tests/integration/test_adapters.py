"""LoRAs, textual-inversion embeddings and A1111 prompt syntax, end to end.

Images are compared with plain diffusers built here (`load_lora_weights` +
`set_adapters`, `load_textual_inversion`), at most one uint8 level apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbatch.errors import UserError
from sdbatch.runner import read_metadata, run_job
from tests.helpers import (
    ROUND_ROBIN,
    adapter_files,
    plain_pipeline,
    plain_render,
    rendered,
    sd_loras,
    sdbatch_cli,
    write_manifest,
    write_spec,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_lora_tags_embeddings_and_syntax_match_plain_diffusers(make_job, tiny_models) -> None:
    loras, embeddings = adapter_files(tiny_models)
    rows = [
        {"id": "tag", "prompt": "a red fox <lora:sd-style:0.7> in snow"},
        {"id": "two", "prompt": "a lighthouse <lora:sd-light:0.5>", "loras": "sd-detail-kohya:0.8"},
        {"id": "base", "prompt": "a red fox in snow"},
        {"id": "ti", "prompt": "a portrait, sd-token style"},
        {"id": "weighted", "prompt": "a (red:1.5) fox in [snow]", "prompt_syntax": "a1111"},
        {"id": "unweighted", "prompt": "a red fox in snow", "prompt_syntax": "a1111"},
        {"id": "ones", "prompt": "a (red:1.0) fox in snow", "prompt_syntax": "a1111"},
    ]
    sd = {n: f for n, f in loras.items() if n.startswith("sd-")}
    _, spec = make_job(
        rows,
        name="adapters",
        batch_size=2,
        loras=sd,
        embeddings={"sd-token": embeddings["sd-token"]},
    )
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas().set_index("id")
    assert (meta["status"] == "ok").all()
    model = str(tiny_models["base"])

    pipe = plain_pipeline("StableDiffusionPipeline", model)
    base = plain_render(pipe, meta.loc["base"], "a red fox in snow")
    assert np.abs(rendered(meta.loc["base"]) - base).max() <= 1
    # A1111 syntax with every weight 1.0 is the plain prompt (each row has its own seed).
    for name in ("unweighted", "ones", "weighted"):
        row = meta.loc[name]
        diff = np.abs(rendered(row) - plain_render(pipe, row, "a red fox in snow")).max()
        assert (diff > 1) if name == "weighted" else (diff <= 1), (name, diff)
    assert not meta.loc["weighted", "prompt_truncated"]

    pipe.load_lora_weights(loras["sd-style"], adapter_name="style")
    pipe.set_adapters(["style"], [0.7])
    row = meta.loc["tag"]
    assert row.prompt == "a red fox in snow" and row.loras == "sd-style:0.7"
    theirs = plain_render(pipe, row, "a red fox in snow")
    assert np.abs(rendered(row) - theirs).max() <= 1
    assert np.abs(rendered(row) - base).max() > 1, "the LoRA changed nothing"

    pipe.load_lora_weights(loras["sd-light"], adapter_name="light")
    pipe.load_lora_weights(loras["sd-detail-kohya"], adapter_name="detail")
    pipe.set_adapters(["detail", "light"], [0.8, 0.5])
    row = meta.loc["two"]
    assert row.loras == "sd-detail-kohya:0.8,sd-light:0.5"
    assert np.abs(rendered(row) - plain_render(pipe, row, "a lighthouse")).max() <= 1

    fresh = plain_pipeline("StableDiffusionPipeline", model)
    from safetensors.torch import load_file

    vectors = load_file(embeddings["sd-token"])["emb_params"]
    fresh.load_textual_inversion(vectors, token="sd-token")
    row = meta.loc["ti"]
    assert row.embeddings == "sd-token"
    assert np.abs(rendered(row) - plain_render(fresh, row, row.prompt)).max() <= 1

    # Metadata and infotext name each adapter with its weight and hash, as A1111 does.
    recorded = json.loads(meta.loc["two", "adapters"])
    assert {(e["name"], e["weight"]) for e in recorded["loras"]} == {
        ("sd-detail-kohya", 0.8),
        ("sd-light", 0.5),
    }
    info = Image.open(meta.loc["tag", "image_uri"]).info["parameters"]
    short = json.loads(meta.loc["tag", "adapters"])["loras"][0]["short_hash"]
    assert "<lora:sd-style:0.7>" in info and f'Lora hashes: "sd-style: {short}"' in info
    assert "TI hashes:" in Image.open(meta.loc["ti", "image_uri"]).info["parameters"]


def test_sdxl_lora_and_a1111_prompts(make_job, tiny_models) -> None:
    loras, embeddings = adapter_files(tiny_models)
    long = ", ".join(f"detail {i}" for i in range(60))  # well over 75 tokens
    rows = [
        {"id": "lora", "prompt": "a castle <lora:sdxl-style:0.6>"},
        {"id": "plain", "prompt": "a castle"},
        {"id": "long", "prompt": long, "prompt_syntax": "a1111"},
        {"id": "weighted", "prompt": "a (castle:1.4)", "prompt_syntax": "a1111"},
        {"id": "same", "prompt": "a castle", "prompt_syntax": "a1111"},
        {"id": "ti", "prompt": "a sdxl-token castle"},
    ]
    _, spec = make_job(
        rows,
        name="sdxl-adapters",
        model=str(tiny_models["sdxl"]),
        batch_size=2,
        loras={"sdxl-style": loras["sdxl-style"]},
        embeddings={"sdxl-token": embeddings["sdxl-token"]},
    )
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas().set_index("id")
    assert (meta["status"] == "ok").all()
    pipe = plain_pipeline("StableDiffusionXLPipeline", tiny_models["sdxl"])
    base = plain_render(pipe, meta.loc["plain"], "a castle")
    assert np.abs(rendered(meta.loc["plain"]) - base).max() <= 1
    same, weighted = meta.loc["same"], meta.loc["weighted"]
    assert np.abs(rendered(same) - plain_render(pipe, same, "a castle")).max() <= 1
    assert np.abs(rendered(weighted) - plain_render(pipe, weighted, "a castle")).max() > 1
    assert not meta.loc["long", "prompt_truncated"]
    from safetensors.torch import load_file

    vectors = load_file(embeddings["sdxl-token"])
    with_token = plain_pipeline("StableDiffusionXLPipeline", tiny_models["sdxl"])
    for key, encoder, tokenizer in (
        ("clip_l", "text_encoder", "tokenizer"),
        ("clip_g", "text_encoder_2", "tokenizer_2"),
    ):
        with_token.load_textual_inversion(
            vectors[key],
            token="sdxl-token",
            text_encoder=getattr(with_token, encoder),
            tokenizer=getattr(with_token, tokenizer),
        )
    row = meta.loc["ti"]
    assert np.abs(rendered(row) - plain_render(with_token, row, row.prompt)).max() <= 1
    assert np.abs(rendered(row) - plain_render(pipe, row, row.prompt)).max() > 1
    pipe.load_lora_weights(loras["sdxl-style"], adapter_name="style")
    pipe.set_adapters(["style"], [0.6])
    row = meta.loc["lora"]
    assert np.abs(rendered(row) - plain_render(pipe, row, "a castle")).max() <= 1
    assert np.abs(rendered(row) - base).max() > 1


def test_round_robin_adapters_never_share_a_call_and_rerun_bit_exact(
    make_job, tiny_models, tmp_path
) -> None:
    rows = [
        {"id": f"r{i:02d}", "prompt": f"a cat {i} <lora:{ROUND_ROBIN[i % 4]}:0.{5 + i % 4}>"}
        for i in range(16)
    ] + [{"id": "none", "prompt": "a cat"}]
    loras = {}  # copies: one is changed below
    for name, file in sd_loras(tiny_models).items():
        loras[name] = str(tmp_path / "loras" / Path(file).name)
        Path(loras[name]).parent.mkdir(exist_ok=True)
        Path(loras[name]).write_bytes(Path(file).read_bytes())
    spec_path, spec = make_job(rows, name="robin", batch_size=2, loras=loras)
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas()
    assert len(meta) == 17 and (meta["status"] == "ok").all()
    # Every pipeline call holds one adapter set only.
    assert meta.groupby("call_id")["loras"].nunique(dropna=False).max() == 1

    ids = ["r00", "r05", "r10", "none"]
    proc = sdbatch_cli("rerun", spec.output, "--verify", *[a for i in ids for a in ("--ids", i)])
    assert proc.exit_code == 0, proc.output
    assert "reproduced 4/4 bit-exact" in proc.output

    # A changed adapter file is a changed render: resume refuses, rerun says so.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(loras["sd-style"])
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.float32(0.5)
    save_file(tensors, loras["sd-style"])
    with pytest.raises(UserError, match="weights differ"):
        run_job(spec)
    proc = sdbatch_cli("rerun", spec.output, "--verify", "--ids", "r00")
    assert proc.exit_code == 1 and "weights-changed" in proc.output, proc.output


@pytest.mark.parametrize(
    "fields, rows, expected",
    [
        ({}, [{"id": "x", "prompt": "a <lora:nope:0.5> cat"}], "unknown LoRA 'nope'"),
        ({}, [{"id": "x", "prompt": "a <lora:sd-style:lots> cat"}], "weight 'lots'"),
        ({}, [{"id": "x", "prompt": "a cat", "loras": "sd-style:0.5,ghost"}], "'ghost'"),
        ({}, [{"id": "x", "prompt": "<lora:sd-style:1:0.5> cat"}], "separate text-encoder"),
        ({"loras": {"bad": "EMB"}}, None, "loras.bad"),
        ({"loras": {"xl": "SDXL"}}, None, "another model family"),
        ({"loras": {"gone": "/nowhere/x.safetensors"}}, None, "file not found"),
        ({"embeddings": {"e": "SDXLEMB"}}, None, "embeddings.e"),
    ],
)
def test_bad_adapter_input_is_refused_before_rendering(
    tmp_path, tiny_models, fields, rows, expected
) -> None:
    loras, embeddings = adapter_files(tiny_models)
    swap = {"EMB": embeddings["sd-token"], "SDXL": loras["sdxl-style"]}
    swap["SDXLEMB"] = embeddings["sdxl-token"]
    for key in ("loras", "embeddings"):
        if key in fields:
            fields[key] = {n: swap.get(v, v) for n, v in fields[key].items()}
    fields.setdefault("loras", {})
    fields["loras"] = {**sd_loras(tiny_models), **fields["loras"]}
    manifest = write_manifest(tmp_path / "m.parquet", rows or [{"id": "x", "prompt": "a cat"}])
    spec = write_spec(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        model=str(tiny_models["base"]),
        output=str(tmp_path / "out"),
        **fields,
    )
    proc = sdbatch_cli("validate", spec)  # raises what it did not turn into a message
    assert proc.exit_code != 0
    assert expected in proc.output, proc.output
    assert "Traceback" not in proc.output
    if rows:  # a row problem names the row and its id
        assert "row 0 (id 'x')" in proc.output

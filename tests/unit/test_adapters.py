"""LoRA choice per row, A1111 prompt parsing, adapter files: the torch-free parts."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdbatch.adapters import (
    adapter_key,
    check_embedding,
    check_lora,
    choose,
    embeddings_in,
    parse_list,
    parse_tags,
    resolve,
)
from sdbatch.errors import UserError
from sdbatch.manifest import validate_manifest
from sdbatch.plan import expand_row
from sdbatch.prompts import parse
from sdbatch.spec import parse_spec, render_signature
from tests.helpers import write_manifest

KNOWN = {"style": "s.safetensors", "detail": "d.safetensors", "my lora.v2": "x.safetensors"}


def test_tags_leave_the_prompt_with_their_weights() -> None:
    text, tags = parse_tags("a cat <lora:style:0.7>, in snow <lora:detail>")
    assert text == "a cat , in snow"
    assert tags == {"style": 0.7, "detail": 1.0}
    assert parse_tags("no tags here") == ("no tags here", {})
    assert parse_tags("<lora:my lora.v2:-0.5>") == ("", {"my lora.v2": -0.5})


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:style:abc>", "weight 'abc' is not a number"),
        ("<lora:style:11>", "-10..10"),
        ("<lora:style:nan>", "finite"),
        ("<lora:style:0.5:1>", "separate text-encoder and UNet weights"),
    ],
)
def test_bad_tags_are_refused(prompt: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_tags(prompt)


def test_choice_is_canonical_and_tags_override_the_column() -> None:
    assert choose("a <lora:style:0.5>", "detail:0.4,style:1", KNOWN) == (
        "a",
        "detail:0.4,style:0.5",
    )
    assert choose("a cat", "", KNOWN) == ("a cat", None)
    assert choose("a cat", " style , detail:0.25 ", KNOWN)[1] == "detail:0.25,style:1"
    assert adapter_key({"b": 0.5, "a": 1.0}) == adapter_key({"a": 1, "b": 0.5}) == "a:1,b:0.5"
    assert parse_list(None) == {}
    with pytest.raises(UserError, match="unknown LoRA 'ghost' .*detail, my lora.v2, style"):
        choose("a <lora:ghost:1>", None, KNOWN)
    with pytest.raises(UserError, match="expected NAME or NAME:WEIGHT"):
        parse_list("style:1:2")


def test_embeddings_are_found_where_the_tokenizer_would_split_them() -> None:
    assert embeddings_in(["a portrait, easyneg", None], ["easyneg", "other"]) == "easyneg"
    assert embeddings_in(["(easyneg:1.2)"], ["easyneg"]) == "easyneg"
    assert embeddings_in(["nothing"], ["easyneg"]) is None


@pytest.mark.parametrize(
    ("prompt", "sections"),
    [
        ("a cat", [[("a cat", 1.0)]]),
        (
            "a (cat:1.3) on [a mat]",
            [[("a ", 1.0), ("cat", 1.3), (" on ", 1.0), ("a mat", 1 / 1.1)]],
        ),
        ("((big)) dog", [[("big", 1.1 * 1.1), (" dog", 1.0)]]),
        ("((big:2)) dog", [[("big", 2.2), (" dog", 1.0)]]),
        (r"\(literal\) \[x\] a\\b", [[(r"(literal) [x] a\b", 1.0)]]),
        ("one BREAK two", [[("one", 1.0)], [("two", 1.0)]]),
        ("(unclosed cat", [[("unclosed cat", 1.1)]]),
        ("stray ) and ] and a: b", [[("stray ) and ] and a: b", 1.0)]]),
        ("(a:1.0) b", [[("a b", 1.0)]]),
        ("", [[("", 1.0)]]),
        ("BREAKFAST (x:0.5)", [[("BREAKFAST ", 1.0), ("x", 0.5)]]),
    ],
)
def test_a1111_attention_syntax(prompt: str, sections) -> None:
    got = parse(prompt)
    assert [[t for t, _ in s] for s in got] == [[t for t, _ in s] for s in sections]
    for got_section, want in zip(got, sections, strict=True):
        for (_, w), (_, v) in zip(got_section, want, strict=True):
            assert w == pytest.approx(v)


def spec(**fields):
    base = {"name": "t", "manifest": "/m", "output": "/o", "model": "/m"}
    return parse_spec({**base, **fields})


def test_spec_checks_adapter_names_and_default_loras() -> None:
    with pytest.raises(UserError, match="defaults.loras names 'ghost', not in loras"):
        spec(loras={"style": "/s.safetensors"}, defaults={"loras": "ghost:0.5"})
    with pytest.raises(UserError, match="name 'bad:name'"):
        spec(loras={"bad:name": "/s.safetensors"})
    with pytest.raises(UserError, match="prompt_syntax"):
        spec(defaults={"prompt_syntax": "comfy"})
    ok = spec(loras={"style": "/s.safetensors"}, defaults={"loras": "style:0.5"})
    assert ok.defaults.loras == "style:0.5"


def test_render_signature_of_a_job_without_adapters_is_unchanged() -> None:
    """Outputs written before adapters existed must still resume."""
    signature = render_signature(spec())
    assert "loras" not in signature and "embeddings" not in signature
    assert "loras" not in signature["defaults"]
    assert "prompt_syntax" not in signature["defaults"]
    changed = render_signature(spec(defaults={"prompt_syntax": "a1111"}))
    assert changed["defaults"]["prompt_syntax"] == "a1111"


def test_plan_strips_tags_and_batches_by_adapter_set() -> None:
    job = spec(loras={"style": "/s.safetensors", "detail": "/d.safetensors"},
               defaults={"loras": "detail:0.5"})  # fmt: skip
    rows = [
        {"id": "a", "prompt": "a cat <lora:style:0.7>"},
        {"id": "b", "prompt": "a dog", "loras": ""},
        {"id": "c", "prompt": "a cow"},
        {"id": "d", "prompt": "a cow", "prompt_syntax": "a1111"},
    ]
    items = {r["id"]: next(expand_row(r, job)) for r in rows}
    assert items["a"]["prompt"] == "a cat"
    assert items["a"]["loras"] == "detail:0.5,style:0.7"
    assert items["b"]["loras"] is None
    assert items["c"]["loras"] == "detail:0.5"
    assert len({i["batch_key"] for i in items.values()}) == 4


def test_manifest_names_the_row_id_and_value(tmp_path: Path) -> None:
    job = spec(loras={"style": "/s.safetensors"})
    path = write_manifest(
        tmp_path / "m.parquet",
        [
            {"id": "ok", "prompt": "a <lora:style:0.5>", "loras": None},
            {"id": "tag", "prompt": "a <lora:nope>", "loras": None},
            {"id": "col", "prompt": "a", "loras": "style:x"},
            {"id": "syn", "prompt": "a", "prompt_syntax": "comfy"},
        ],
    )
    with pytest.raises(UserError) as info:
        validate_manifest(str(path), job)
    text = "\n".join(info.value.problems)
    assert "row 1 (id 'tag'): prompt tag: unknown LoRA 'nope' (spec loras: style)" in text
    assert "row 2 (id 'col'): loras 'style:x': LoRA 'style': weight 'x' is not a number" in text
    assert "row 3 (id 'syn'): prompt_syntax must be one of plain, a1111, got 'comfy'" in text
    assert "id 'ok'" not in text


def test_files_are_checked_for_kind_and_family(tiny_models, tmp_path: Path) -> None:
    root = Path(tiny_models["base"]).parent
    sd, sdxl = root / "loras" / "sd-style.safetensors", root / "loras" / "sdxl-style.safetensors"
    check_lora("s", str(sd), resolve(str(sd)), 32, "base")  # the tiny SD text width
    with pytest.raises(UserError, match="another model family"):
        check_lora("x", str(sdxl), resolve(str(sdxl)), 32, "base")
    emb = root / "embeddings" / "sd-token.safetensors"
    with pytest.raises(UserError, match="not a LoRA file"):
        check_lora("e", str(emb), emb, 32, "base")
    check_embedding("e", str(emb), emb, (32,))
    with pytest.raises(UserError, match="another model family"):
        check_embedding("e", str(emb), emb, (32, 40))
    folder = tmp_path / "lora-folder"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(sd.read_bytes())
    assert resolve(str(folder)).name == "pytorch_lora_weights.safetensors"
    pickled = tmp_path / "old.pt"
    pickled.write_bytes(b"x")
    with pytest.raises(UserError, match="convert them to .safetensors"):
        resolve(str(pickled))


def test_a_hub_id_is_read_from_the_local_cache(tiny_models, tmp_path: Path, monkeypatch) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--style-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    lora = Path(tiny_models["base"]).parent / "loras" / "sd-style.safetensors"
    (snapshot / "pytorch_lora_weights.safetensors").write_bytes(lora.read_bytes())
    import huggingface_hub.constants

    # read at import: set where snapshot_download looks it up (as HF_HUB_CACHE would)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("org/style-lora") == snapshot / "pytorch_lora_weights.safetensors"
    assert resolve(f"org/style-lora@{commit}").read_bytes() == lora.read_bytes()
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve("org/absent-lora")


def test_an_embedding_named_like_a_token_is_refused_by_validate(tiny_models) -> None:
    """diffusers cannot add a token its tokenizer already has: `validate` says so, naming
    the embedding, its file and the tokenizer, instead of every actor failing at start."""
    from sdbatch.checks import check_adapters

    root = Path(tiny_models["base"]).parent
    emb = str(root / "embeddings" / "sd-token.safetensors")
    spec = parse_spec(
        {
            "name": "t", "manifest": "/m", "output": "/o", "model": str(tiny_models["base"]),
            "embeddings": {"a": emb, "tinytoken": emb},
        }
    )  # fmt: skip
    (problem,) = check_adapters(spec)
    assert problem.startswith(f"embeddings.a {emb}: 'a' is already a token of the base model's")
    assert "tokenizer" in problem and "give the embedding a name" in problem
    sdxl = parse_spec(
        {
            "name": "t", "manifest": "/m", "output": "/o", "model": str(tiny_models["sdxl"]),
            "embeddings": {"b": str(root / "embeddings" / "sdxl-token.safetensors")},
        }
    )  # fmt: skip
    assert "'b' is already a token" in check_adapters(sdxl)[0]

"""Locating checkpoints (no torch: these run before any model is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdbatch.errors import UserError
from sdbatch.models import check_checkpoint, resolve_checkpoint


def make_checkpoint(folder):
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    return folder


def test_relative_folder_that_exists_is_local_even_if_it_looks_like_a_hub_id(
    tmp_path, monkeypatch
) -> None:
    make_checkpoint(tmp_path / "org" / "model")
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("org/model") == Path("org/model")


def test_missing_folder_is_named(tmp_path, monkeypatch) -> None:
    ref = str(tmp_path / "nope")
    with pytest.raises(UserError, match="nope: folder not found"):
        resolve_checkpoint(ref)
    monkeypatch.chdir(tmp_path)  # relative, and not spelled as a hub id: still a folder
    with pytest.raises(UserError, match="models/tiny/base: folder not found"):
        resolve_checkpoint("models/tiny/base")


def test_one_rule_says_what_a_hub_id_is(tmp_path, monkeypatch) -> None:
    """Models, layouts, LoRAs, embeddings and pinning all ask `hub.is_hub_id`."""
    from sdbatch.hub import at_commit, is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here" / "model").mkdir(parents=True)
    for ref in ("org/name", "org/name@main", "org/name@v1.0", "Org-1/name.v2_x"):
        assert is_hub_id(ref), ref
    for ref in ("here/model", "./org/name", "/org/name", "s3://org/name", "a/b/c", "name"):
        assert not is_hub_id(ref), ref
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert at_commit("org/name@main", Path("snapshots", commit)) == f"org/name@{commit}"
    assert at_commit("org/name", Path("not-a-commit")) == "org/name"


def test_folder_without_model_index_says_what_it_is(tmp_path) -> None:
    (tmp_path / "ckpt").mkdir()
    problem = check_checkpoint(str(tmp_path / "ckpt"))
    assert problem is not None and "no model_index.json" in problem


def test_hub_id_not_in_the_offline_cache_says_how_to_fix_it(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no folder of that name here; conftest sets HF_HUB_OFFLINE
    problem = check_checkpoint("someone/not-downloaded")
    assert problem is not None
    assert "someone/not-downloaded" in problem and "local Hugging Face cache" in problem


def test_hub_single_file_spellings(tmp_path) -> None:
    from sdbatch.hub import split_file
    from sdbatch.spec import resolve_paths

    assert split_file("org/name/model.safetensors") == ("org/name", None, "model.safetensors")
    assert split_file("org/name@v2/sub/m.ckpt") == ("org/name", "v2", "sub/m.ckpt")
    for url in (
        "https://huggingface.co/org/name/blob/main/m.safetensors",
        "https://huggingface.co/org/name/resolve/main/m.safetensors",
        "hf.co/org/name/blob/main/m.safetensors",
    ):
        assert split_file(url) == ("org/name", "main", "m.safetensors"), url
    local = tmp_path / "a" / "b" / "m.safetensors"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"")
    for not_hub in (str(local), "org/name", "org/name/model.bin", "org/name/../m.safetensors"):
        assert split_file(not_hub) is None, not_hub
    # A spec keeps a hub file as written (no local file of that name beside the spec).
    from sdbatch.spec import parse_spec

    spec = parse_spec(
        {"name": "t", "manifest": "m", "output": "o", "model": "org/name/m.safetensors"}
    )
    assert resolve_paths(spec, tmp_path).models.base == "org/name/m.safetensors"

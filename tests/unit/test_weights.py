"""Honest weight hashes: exactly the files the pipeline loads, each hashed once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sdbatch import weights
from sdbatch.models import model_hash, pickle_problem


@pytest.fixture
def model(tmp_path, tiny_models) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny_models["base"], dest)
    return dest


def test_selection_is_what_from_pretrained_reads(model) -> None:
    files = weights.loaded_files(model)
    assert [p.name for p in files[""]] == ["model_index.json"]
    assert {p.name for p in files["unet"]} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert {p.name for p in files["text_encoder"]} == {"config.json", "model.safetensors"}
    assert {p.name for p in files["tokenizer"]} >= {"vocab.json", "merges.txt"}
    assert [p.name for p in files["scheduler"]] == ["scheduler_config.json"]


def test_unused_files_do_not_change_the_hash_and_loaded_ones_do(model) -> None:
    before = model_hash(str(model))
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    # What a hub download carries beside the weights from_pretrained reads.
    (model / "v1-5-pruned-emaonly.safetensors").write_bytes(b"a root single-file checkpoint")
    (model / "v1-5-pruned.ckpt").write_bytes(b"pickled")
    shutil.copy(unet, model / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a .bin twin")
    (model / "text_encoder" / "flax_model.msgpack").write_bytes(b"flax")
    (model / "README.md").write_text("# model card")
    assert model_hash(str(model)) == before
    assert pickle_problem(str(model), "models.base") is None  # the .bin twin is not loaded

    # A changed loaded file: the combined hash and that component's, nothing else.
    data = bytearray(unet.read_bytes())
    data[-1] ^= 1
    unet.write_bytes(bytes(data))
    after = model_hash(str(model))
    assert after.sha256 != before.sha256
    changed = {c for c in after.components if after.components[c] != before.components[c]}
    assert changed == {"unet"}
    # A scheduler or tokenizer file changes pixels too, so it counts.
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "steps_offset": 0}))
    assert model_hash(str(model)).components["scheduler"] != after.components["scheduler"]


def test_each_file_is_hashed_once_per_content(model, monkeypatch) -> None:
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    first = model_hash(str(model))
    cache = json.loads((weights.cache_dir() / "file-hashes.json").read_text())
    assert any(key.startswith(os.path.realpath(unet) + "|") for key in cache)
    # Same path, size and mtime: the cached hash is used (the file is not read again) ...
    stat = unet.stat()
    data = bytearray(unet.read_bytes())
    data[0] ^= 1
    unet.write_bytes(bytes(data))
    os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    opened: list[Path] = []
    real_open = Path.open

    def spy(self, *args, **kwargs):
        opened.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    assert model_hash(str(model)) == first and unet not in opened
    # ... and a new mtime means new content: hashed again.
    os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert model_hash(str(model)).components["unet"] != first.components["unet"]


def test_pickled_weights_are_named(model) -> None:
    te = model / "text_encoder"
    (te / "model.safetensors").rename(te / "pytorch_model.bin")
    problem = pickle_problem(str(model), "models.base")
    assert problem is not None
    assert "text_encoder/pytorch_model.bin" in problem and "models.allow_pickle: true" in problem
    assert "arbitrary code" in problem


def test_lone_model_folder_is_one_component(tiny_models) -> None:
    h = model_hash(str(tiny_models["sdxl-controlnet-depth"]))
    assert set(h.files) == {"config.json", "diffusion_pytorch_model.safetensors"}

"""Checkpoints from where users keep them: an S3 prefix copied once per node."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdbatch.runner import read_metadata, run_job
from sdbatch.spec import load_spec
from tests.helpers import load_job, prompts, sd_loras, sdbatch_cli, write_manifest, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def upload_folder(s3_server, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            s3_server.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def downloads(cache: Path) -> list[dict]:
    log = cache / "models" / "downloads.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def s3_model(s3_server, tiny_models, tmp_path, monkeypatch):
    """The tiny base model under s3://…/models/base/ with files the pipeline never loads,
    and an empty node cache for this test."""
    bucket = s3_server.bucket("models")
    upload_folder(s3_server, bucket, tiny_models["base"], "models/base")
    extra = {
        "models/base/v1-5-pruned.safetensors": b"root single-file checkpoint" * 100,
        "models/base/unet/diffusion_pytorch_model.fp16.safetensors": b"fp16 variant" * 100,
        "models/base/unet/diffusion_pytorch_model.bin": b"a .bin twin" * 100,
    }
    for key, body in extra.items():
        s3_server.client.put_object(Bucket=bucket, Key=key, Body=body)
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("SDBATCH_CACHE_DIR", str(cache))
    return {"uri": f"s3://{bucket}/models/base/", "cache": cache, "bucket": bucket}


def test_model_from_s3_renders_as_the_local_folder_and_downloads_once(
    s3_model, s3_server, tiny_models, tmp_path, ray_session
) -> None:
    # The actors get this test's SDBATCH_CACHE_DIR through the job's runtime env.
    def job(name: str, model: str):
        return load_job(tmp_path, model, 4, name=name, storage=s3_server.storage(), steps=2)

    from_s3, local = job("from-s3", s3_model["uri"]), job("local", str(tiny_models["base"]))
    run_job(from_s3)
    run_job(local)
    ours = read_metadata(from_s3.output).to_pandas().set_index("id")
    theirs = read_metadata(local.output).to_pandas().set_index("id")
    assert set(ours.status) == {"ok"} and len(ours) == 4
    for item_id, row in ours.iterrows():  # same pixels (the PNGs' text chunks name the model)
        mine = np.asarray(Image.open(row.image_uri))
        assert np.array_equal(mine, np.asarray(Image.open(theirs.loc[item_id, "image_uri"])))
    assert (ours.model_sha256 == theirs.model_sha256.iloc[0]).all()  # same loaded files
    assert set(ours.model) == {s3_model["uri"]}

    # One download on this node (driver and actor share it), of the loaded files only.
    logged = downloads(s3_model["cache"])
    assert len(logged) == 1 and logged[0]["uri"] == s3_model["uri"]
    (copy,) = [p for p in (s3_model["cache"] / "models").iterdir() if p.is_dir()]
    names = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in names
    assert not names & {
        "v1-5-pruned.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
    }
    # The next job on the warm node downloads nothing: a new process (as its driver and
    # actors are) finds the copy.
    assert copy_in_new_processes(s3_model, s3_server, 1) == {str(copy)}
    assert len(downloads(s3_model["cache"])) == 1


def _copy(uri: str, storage: dict, cache: str, queue) -> None:
    import os

    os.environ["SDBATCH_CACHE_DIR"] = cache
    from sdbatch.modelcache import local_copy

    queue.put(str(local_copy(uri, storage)))


def copy_in_new_processes(s3_model: dict, s3_server, count: int) -> set[str]:
    """`local_copy` of the S3 model in `count` new processes at once (a node's actors):
    the folders they got."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_copy, args=(s3_model["uri"], s3_server.storage(), str(s3_model["cache"]), queue)
        )
        for _ in range(count)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return {queue.get(timeout=5) for _ in procs}


def test_two_processes_of_one_node_download_once(s3_model, s3_server) -> None:
    paths = copy_in_new_processes(s3_model, s3_server, 2)
    assert len(paths) == 1 and len(downloads(s3_model["cache"])) == 1
    # A changed object is new content: a new cache entry, downloaded again.
    s3_server.client.put_object(
        Bucket=s3_model["bucket"], Key="models/base/scheduler/scheduler_config.json",
        Body=json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}).encode(),
    )  # fmt: skip
    from sdbatch.modelcache import local_copy

    again = local_copy(s3_model["uri"], s3_server.storage())
    assert str(again) not in paths and len(downloads(s3_model["cache"])) == 2


def test_s3_prefix_without_a_model_is_refused_by_validate(s3_server, tmp_path) -> None:
    from typer.testing import CliRunner

    from sdbatch.cli import app

    bucket = s3_server.bucket("empty")
    s3_server.client.put_object(Bucket=bucket, Key="models/x/readme.txt", Body=b"hi")
    manifest = write_manifest(tmp_path / "m.parquet", prompts(1))
    spec = write_spec(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        model=f"s3://{bucket}/models/x/",
        storage=s3_server.storage(),
    )
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 1
    assert f"s3://{bucket}/models/x/: no model_index.json or config.json" in result.output
    assert "Traceback" not in result.output


COMMIT = "0123456789abcdef0123456789abcdef01234567"
LORA_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub_cache(tmp_path, tiny_models, monkeypatch):
    """A Hugging Face cache holding the tiny base as `sdbatch-tests/tiny-base` (main →
    COMMIT) and a LoRA for it as `sdbatch-tests/tiny-lora` (main → LORA_COMMIT, one
    `pytorch_lora_weights.safetensors`), laid out as huggingface_hub writes it."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hf-hub"
    repo = cache / "models--sdbatch-tests--tiny-base"
    shutil.copytree(tiny_models["base"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    lora = cache / "models--sdbatch-tests--tiny-lora"
    (lora / "snapshots" / LORA_COMMIT).mkdir(parents=True)
    shutil.copy(
        sd_loras(tiny_models)["sd-style"],
        lora / "snapshots" / LORA_COMMIT / "pytorch_lora_weights.safetensors",
    )
    (lora / "refs").mkdir()
    (lora / "refs" / "main").write_text(LORA_COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # the actors' processes
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # this one
    return cache


def test_hub_id_from_the_cache_is_pinned_to_its_commit(hub_cache, tmp_path, ray_session) -> None:
    """A model and a LoRA by hub id: each recorded as `org/name@<commit>`, so the job
    resumes and reruns with the files it ran with even after `main` moves on."""
    import yaml

    rows = [
        {"id": "plain", "prompt": "a cat"},
        {"id": "styled", "prompt": "a cat <lora:style:0.8>"},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    spec = load_spec(
        write_spec(
            tmp_path / "job.yaml",
            manifest=str(manifest),
            output=str(tmp_path / "out"),
            model="sdbatch-tests/tiny-base",
            loras={"style": "sdbatch-tests/tiny-lora@main"},
            defaults={"steps": 2},
        )
    )
    assert spec.models.base == "sdbatch-tests/tiny-base"  # not taken for a relative path
    run_job(spec)
    meta = read_metadata(spec.output).to_pandas().set_index("id")
    pinned = f"sdbatch-tests/tiny-base@{COMMIT}"
    pinned_lora = f"sdbatch-tests/tiny-lora@{LORA_COMMIT}"
    assert set(meta.model) == {pinned} and set(meta.status) == {"ok"}
    assert [e["uri"] for e in json.loads(meta.loc["styled", "adapters"])["loras"]] == [pinned_lora]
    stored = yaml.safe_load(Path(spec.output, "job.yaml").read_text())
    assert stored["models"]["base"] == pinned and stored["loras"] == {"style": pinned_lora}
    # The same job resumes (nothing left), and `@main` names the same commits.
    assert run_job(spec).skipped == 2
    # `main` moves to a commit that is not there: the pinned ids still rerun bit for bit.
    for name in ("tiny-base", "tiny-lora"):
        (hub_cache / f"models--sdbatch-tests--{name}" / "refs" / "main").write_text("f" * 40)
    proc = sdbatch_cli("rerun", spec.output, "--verify", "--ids", "styled", "--ids", "plain")
    assert proc.exit_code == 0 and "reproduced 2/2 bit-exact" in proc.output, proc.output


def test_unknown_hub_revision_is_refused_by_validate(hub_cache, tmp_path) -> None:
    from typer.testing import CliRunner

    from sdbatch.cli import app

    manifest = write_manifest(tmp_path / "m.parquet", prompts(1))
    spec = write_spec(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        model="sdbatch-tests/tiny-base@v9",
    )
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 1, result.output
    assert "model sdbatch-tests/tiny-base@v9: not a local folder and not in the local" in (
        result.output
    )
    assert "Traceback" not in result.output
    ok = spec.read_text().replace("tiny-base@v9", f"tiny-base@{COMMIT[:40]}")
    spec.write_text(ok)
    assert CliRunner().invoke(app, ["validate", str(spec)]).exit_code == 0


def online(server, cache: Path) -> dict[str, str]:
    """This process's environment, online (HF_HUB_OFFLINE unset) against `server` (a hub
    on 127.0.0.1) with its own HF cache."""

    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(HF_ENDPOINT=server.endpoint, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_XET="1")
    return env


def validate_in(env: dict[str, str], spec: Path) -> subprocess.CompletedProcess:
    """`sdbatch validate SPEC` as a process of its own, in `env`."""
    return subprocess.run(
        [sys.executable, "-m", "sdbatch.cli", "validate", str(spec)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_hub_id_is_downloaded_once_through_huggingface_hub(
    tiny_models, tmp_path, monkeypatch
) -> None:
    """Online (HF_HUB_OFFLINE unset), against a hub on 127.0.0.1 (HF_ENDPOINT): only the
    files the pipeline loads are fetched, once; the next job finds them in the cache."""
    import shutil

    import huggingface_hub.constants

    from sdbatch import hub
    from sdbatch.models import model_hash
    from tests.hfserver import HubServer

    repo = tmp_path / "repo"
    shutil.copytree(tiny_models["base"], repo)
    unused = {
        "v1-5-pruned-emaonly.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/flax_model.msgpack",
    }
    for name in unused:
        (repo / name).write_bytes(b"never loaded" * 100)
    server = HubServer("sdbatch-tests/online", repo, COMMIT)
    cache = tmp_path / "hf-cache"
    env = online(server, cache)
    manifest = write_manifest(tmp_path / "m.parquet", prompts(1))
    spec = write_spec(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        model="sdbatch-tests/online",
    )
    try:
        for _ in range(2):
            done = validate_in(env, spec)
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        server.stop()
    loaded = {n for n in server.files if n not in unused}
    assert set(server.downloads) == loaded  # nothing unused fetched
    assert set(server.downloads.values()) == {1}  # each file once over both runs
    # The snapshot is a normal HF cache entry: pinned to the served commit, same weights.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert hub.pin("sdbatch-tests/online") == f"sdbatch-tests/online@{COMMIT}"
    assert model_hash("sdbatch-tests/online").sha256 == model_hash(str(tiny_models["base"])).sha256


def test_a_hub_single_file_is_downloaded_once_and_pinned(
    tiny_models, tmp_path, monkeypatch
) -> None:
    """A single-file checkpoint in a hub repository, as users copy it (`org/name/file`,
    its blob URL): online, fetched once through huggingface_hub from a hub on 127.0.0.1,
    the next run finds it in the cache; pinned to the served commit; the same weights
    (hash) as the local file, so the same pixels as the single-file tests render."""
    import shutil

    import huggingface_hub.constants

    from sdbatch import hub
    from sdbatch.models import model_hash, use_layouts
    from tests.hfserver import HubServer

    repo = tmp_path / "repo"
    repo.mkdir()
    local = tiny_models["base"].with_suffix(".safetensors")
    shutil.copy(local, repo / "base.safetensors")
    (repo / "other.safetensors").write_bytes(b"never fetched" * 100)
    server = HubServer("sdbatch-tests/single", repo, COMMIT)
    cache = tmp_path / "hf-cache"
    env = online(server, cache)
    manifest = write_manifest(tmp_path / "m.parquet", prompts(1))
    layout = {"base": str(tiny_models["base"])}
    refs = [
        "sdbatch-tests/single/base.safetensors",
        "https://huggingface.co/sdbatch-tests/single/blob/main/base.safetensors",
    ]
    try:
        for ref in refs:
            spec = write_spec(
                tmp_path / "job.yaml",
                manifest=str(manifest),
                output=str(tmp_path / "out"),
                models={"base": ref, "config": layout},
            )
            done = validate_in(env, spec)
            assert done.returncode == 0, done.stdout + done.stderr
            assert ": ok" in done.stdout, done.stdout
    finally:
        server.stop()
    assert dict(server.downloads) == {"base.safetensors": 1}  # once, over both spellings
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    pinned = f"sdbatch-tests/single@{COMMIT}/base.safetensors"
    assert [hub.pin(ref) for ref in refs] == [pinned, pinned]
    use_layouts({pinned: layout["base"], str(local): layout["base"]})
    try:
        assert model_hash(pinned).sha256 == model_hash(str(local)).sha256
    finally:
        use_layouts({})
    # Offline, a file not in the cache: one line naming it, not a traceback.
    env["HF_HUB_OFFLINE"] = "1"
    spec = write_spec(
        tmp_path / "job.yaml",
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        models={"base": "sdbatch-tests/single/missing.safetensors", "config": layout},
    )
    done = validate_in(env, spec)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "sdbatch-tests/single/missing.safetensors: not a local file and not in the local" in (
        " ".join(done.stderr.split())
    ), done.stderr

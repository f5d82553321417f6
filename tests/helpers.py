"""Builders and checks shared by tests (test modules import from here, never from each
other): manifests, specs and jobs on disk, `sdbatch run` processes, plain diffusers
reference renders."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image, ImageDraw


def write_manifest(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is None:  # from_pylist would take the columns of the first row only
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = pa.table({c: [row.get(c) for row in rows] for c in columns})
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return path


def prompts(n: int, prefix: str = "item") -> list[dict[str, Any]]:
    subjects = ["a cat", "a lighthouse at dusk", "a bowl of fruit", "a mountain lake"]
    return [
        {"id": f"{prefix}-{i:03d}", "prompt": f"{subjects[i % 4]}, style {i}"} for i in range(n)
    ]


def write_spec(path: Path, **fields: Any) -> Path:
    spec = {
        "name": "test",
        "seed": 7,
        "batch_size": 4,
        "defaults": {
            "steps": 3,
            "width": 64,
            "height": 64,
            "scheduler": "ddim",
            "guidance_scale": 7.5,
        },
        "compute": {"actors": 1, "cpus_per_actor": 1},
    }
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path.write_text(yaml.safe_dump(spec))
    return path


# Well over CLIP's 77 tokens.
LONG_PROMPT = "a very detailed photo of " + "a red fox and a lighthouse " * 20


def work_item(model: str, **fields: Any) -> dict[str, Any]:
    """A planned txt2img work item, for tests that drive a Renderer directly."""
    item = {
        "id": "a", "image_index": 0, "seed": 1, "prompt": "a cat", "negative_prompt": "",
        "mode": "txt2img", "model": str(model), "steps": 3, "guidance_scale": 7.5,
        "scheduler": "ddim", "width": 64, "height": 64, "strength": 1.0, "key": "k",
        "depth_source": None, "batch_key": "b",
    }  # fmt: skip
    return {**item, **fields}


def make_inputs(folder: Path) -> dict[str, Path]:
    """Init images, masks and a depth map with structure (not noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    gradient = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)
    paths = {}
    Image.fromarray(gradient).save(paths.setdefault("init", folder / "init.png"))
    Image.fromarray(gradient[:, ::-1].copy()).save(
        paths.setdefault("init_jpg", folder / "init2.jpg"), quality=95
    )
    wide = np.concatenate([gradient, gradient[:, ::-1]], axis=1)[:, :96]
    Image.fromarray(wide).save(paths.setdefault("init_wide", folder / "wide.png"))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(paths.setdefault("mask", folder / "mask.png"))
    Image.fromarray(mask[:, :32].copy()).save(
        paths.setdefault("mask_small", folder / "mask_small.png")
    )
    soft = mask.copy()
    soft[20:44, 20:44] = 200
    Image.fromarray(soft).save(paths.setdefault("mask_soft", folder / "mask_soft.png"))
    depth = (np.hypot(xx - 32, yy - 32) * 500).astype(np.uint16)
    Image.fromarray(depth).save(paths.setdefault("depth", folder / "depth.png"))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    paths["corrupt"] = folder / "corrupt.png"
    return paths


# ------------------------------------------------------------------ jobs

SDBATCH = [sys.executable, "-m", "sdbatch.cli"]
# Commit every few images: a job killed or stopped part-way has something to resume.
COMMIT_OFTEN = {"commit_rows": 8, "commit_seconds": 1}


def write_job(
    folder: Path,
    model: str | Path | None,
    rows: int | list[dict[str, Any]] = 18,
    *,
    name: str = "job",
    steps: int | None = None,
    schema: pa.Schema | None = None,
    **fields: Any,
) -> Path:
    """The one job builder: `rows` (or that many `prompts`) as folder/NAME.parquet (with
    `schema`, if given), a spec as folder/NAME.yaml writing to folder/out-NAME; `model`
    unless `models` is given, `steps` as the default steps, other fields as in write_spec."""
    rows = prompts(rows) if isinstance(rows, int) else rows
    manifest = write_manifest(folder / f"{name}.parquet", rows, schema)
    fields.setdefault("output", str(folder / f"out-{name}"))
    if model is not None:
        fields["model"] = str(model)
    if steps is not None:
        fields["defaults"] = {"steps": steps, **fields.get("defaults", {})}
    return write_spec(folder / f"{name}.yaml", manifest=str(manifest), **fields)


CLUSTER_ITEMS = 160


def cluster_job(tmp_path: Path, model: Path, name: str, **execution) -> Path:
    """The job the node-loss scenario (a multi-node run included) runs on a local
    cluster: two actors that need the `render_node` resource (so none lands on the head)."""
    return write_job(
        tmp_path,
        model,
        CLUSTER_ITEMS,
        name=name,
        steps=2,
        compute={"actors": 2, "cpus_per_actor": 1, "resources": {"render_node": 1}},
        execution={**COMMIT_OFTEN, **execution},
    )


def load_job(*args: Any, **kwargs: Any) -> Any:
    """write_job, loaded: the JobSpec."""
    from sdbatch.spec import load_spec

    return load_spec(write_job(*args, **kwargs))


def sha_by_item(output: str | Path) -> dict[tuple[str, int], str]:
    """{(id, image_index): sha256} of a job's metadata; asserts each item once."""
    from sdbatch.runner import read_metadata

    meta = read_metadata(str(output)).to_pandas()
    assert not meta.duplicated(["id", "image_index"]).any(), "an item was recorded twice"
    return {(r.id, r.image_index): r.sha256 for r in meta.itertuples()}


def start_run(
    spec: Path, env: dict[str, str] | None = None, fault: str | None = None
) -> subprocess.Popen:
    """`sdbatch run SPEC` as a process of its own (its own local Ray); with `fault`
    (`tests.faults`) injected into its render actors."""
    command = [sys.executable, "-m", "tests.faults", fault] if fault else SDBATCH
    return subprocess.Popen(
        [*command, "run", str(spec), "--progress", "none"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group: the local Ray it starts dies with it
    )


def sdbatch_cli(*args: str | Path) -> Any:
    """`sdbatch ARGS` in this process (typer's CliRunner): what a command prints (stdout and
    stderr, in `.output`) and its `.exit_code`, where the process itself is not what is
    tested. An exception the command did not turn into a message is raised here, as the
    traceback a user would see."""
    from typer.testing import CliRunner

    from sdbatch.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@contextlib.contextmanager
def local_ray() -> Any:
    """A local Ray in this process for an own_ray test's in-process runs (resume,
    reference), once its `sdbatch run` processes are gone: the runs inside share one
    start, and it is shut down on leaving (run_job leaves a Ray it started running, as
    the CLI's ends with its process), so none is left beside the next own_ray test."""
    import ray

    from sdbatch.session import init_ray

    init_ray()
    try:
        yield ray
    finally:
        ray.shutdown()


def isolated_env() -> dict[str, str]:
    """A Ray temp dir of its own, so no `ray_current_cluster` file leaks to other tests."""
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    return env


# ------------------------------------------------------------------ adapters

# Four LoRAs of the tiny base model, taken in turn by round-robin adapter tests.
ROUND_ROBIN = ("sd-style", "sd-light", "sd-dark", "sd-ink")


def adapter_files(tiny_models) -> tuple[dict[str, str], dict[str, str]]:
    """({lora name: file}, {embedding name: file}) the tiny build wrote beside the models."""
    root = Path(tiny_models["base"]).parent
    loras = {p.stem: str(p) for p in sorted((root / "loras").glob("*.safetensors"))}
    embeddings = {p.stem: str(p) for p in sorted((root / "embeddings").glob("*.safetensors"))}
    return loras, embeddings


def sd_loras(tiny_models) -> dict[str, str]:
    """The SD 1.x LoRAs of the tiny build."""
    loras, _ = adapter_files(tiny_models)
    return {n: f for n, f in loras.items() if n.startswith("sd-")}


# ------------------------------------------------------------------ plain diffusers

# Written out by hand on purpose: this is the contract, not a copy of sdbatch's table.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def rendered(row: Any) -> np.ndarray:
    """The image sdbatch wrote for a metadata row, as int16 (differences go negative)."""
    return np.asarray(Image.open(row.image_uri), dtype=np.int16)


def plain_pipeline(pipeline: str, model: str | Path, **kwargs: Any) -> Any:
    """A diffusers pipeline class by name, from a model folder, built independently of sdbatch."""
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(str(model), local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_render(pipe: Any, row: Any, prompt: str | None = None, **inputs: Any) -> np.ndarray:
    """One plain diffusers call for a metadata row: its prompt (or `prompt`), negative
    prompt, seed, steps, guidance, scheduler and (where the pipeline takes one) size."""
    import inspect

    import diffusers
    import torch

    if row.scheduler != "default":  # 'default': the checkpoint's own scheduler, untouched
        cls_name, extra = SCHEDULERS[row.scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    if "width" in inspect.signature(pipe.__call__).parameters:
        inputs = {"width": int(row.width), "height": int(row.height), **inputs}
    image = pipe(
        prompt=row.prompt if prompt is None else prompt,
        negative_prompt=row.negative_prompt or None,
        num_inference_steps=int(row.steps),
        guidance_scale=float(row.guidance_scale),
        generator=torch.Generator("cpu").manual_seed(int(row.seed)),
        **inputs,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------ PNG metadata

# A1111's own pattern (modules/infotext_utils.py): `Key: value` pairs, a value either
# JSON-quoted (may hold commas, colons, newlines) or running to the next comma.
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# What A1111 calls our schedulers; written out here, not imported from sdbatch.write.
SAMPLERS = {"ddim": "DDIM", "euler_a": "Euler a", "dpmpp_2m_karras": "DPM++ 2M Karras"}


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) the way A1111's PNG Info reads them."""
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:  # no parameters line
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line[len("Negative prompt:") :].strip()
        target.append(line)
    params = {}
    for key, value in PARAM.findall(last):
        params[key] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt), "\n".join(negative), params


def check_infotext(text: str, row: dict[str, Any]) -> None:
    """Every field of the infotext against the metadata row it was written from."""
    prompt, negative, params = parse_infotext(text)
    assert prompt == row["prompt"]
    assert negative == (row.get("negative_prompt") or "")
    expected = {
        "Steps": str(row["steps"]),
        "Sampler": SAMPLERS[row["scheduler"]],
        "CFG scale": row["guidance_scale"],
        "Seed": str(row["seed"]),
        "Size": f"{row['width']}x{row['height']}",
        "Model hash": row["model_sha256"][:10],
        "Model": Path(str(row["model"]).rstrip("/")).name,
    }
    if row["mode"] != "txt2img":
        expected["Denoising strength"] = row["strength"]
    assert set(params) == set(expected), params
    for key, want in expected.items():
        got = params[key]
        if isinstance(want, float):
            assert float(got) == pytest.approx(want), key
        else:
            assert got == want, key


def check_png(data: bytes, row: dict[str, Any]) -> None:
    """The PNG's `parameters` and `sdbatch` chunks against a metadata row."""
    from sdbatch.write import REPRODUCIBLE_FIELDS

    with Image.open(io.BytesIO(data)) as im:
        text = dict(im.text)
    check_infotext(text["parameters"], row)
    record = json.loads(text["sdbatch"])
    assert set(record) == set(REPRODUCIBLE_FIELDS)
    for key in REPRODUCIBLE_FIELDS:
        assert record[key] == row.get(key), key


# ------------------------------------------------------------------ hand-made outputs

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def item(item_id: str, k: int = 0, *, sweep: dict | None = None, **fields: Any) -> dict[str, Any]:
    row_id = fields.pop("row_id", item_id.split("@")[0])
    params = {
        "mode": "txt2img",
        "prompt": f"prompt of {row_id}",
        "negative_prompt": None,
        "seed": 1000 + k,
        "steps": 20,
        "guidance_scale": 7.5,
        "scheduler": "ddim",
        "scheduler_class": "DDIMScheduler",
        "width": 64,
        "height": 64,
        "strength": 1.0,
        **(sweep or {}),
    }
    return {
        "id": item_id,
        "row_id": row_id,
        "sweep": json.dumps(sweep, sort_keys=True) if sweep else None,
        "image_index": k,
        "status": "ok",
        "model": "/models/tiny/base",
        "model_sha256": "ab" * 32,
        "job_name": "handmade",
        "created_at": T0,
        **params,
        **fields,
    }


def failure(item_id: str, k: int = 0, *, error: str = "MissingInput", **fields: Any) -> dict:
    return item(
        item_id,
        k,
        status="failed",
        error_type=error,
        error_message=f"{item_id}: init image not found",
        **fields,
    )


def _pixels(r: dict[str, Any]) -> Any:
    """A flat colour from the row's parameters, labelled, so a grid screenshot is legible."""
    h = hashlib.sha256(f"{r['guidance_scale']}/{r['steps']}/{r['scheduler']}".encode()).digest()
    im = Image.new("RGB", (r["width"], r["height"]), tuple(h[:3]))
    label = f"{r['guidance_scale']:g}/{r['steps']}\n{r['scheduler']}"
    ImageDraw.Draw(im).multiline_text((3, 3), label, fill=(255, 255, 255))
    return im


def fake_output(
    uri: str,
    images: list[dict],
    failures: list[dict] = (),  # type: ignore[assignment]
    *,
    storage: dict | None = None,
    drop: tuple[str, ...] = (),
    parts: int = 2,
    webdataset: bool = False,
) -> str:
    """A job output written by hand through the store: PNGs (as files, or in one
    WebDataset shard), metadata and failure parts."""
    import tarfile

    from sdbatch.plan import image_key
    from sdbatch.store import open_store
    from sdbatch.write import METADATA_SCHEMA, encode_image

    store = open_store(uri, storage)
    shard, tar = "shards/run-00000.tar", io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as members:
        for r in images:
            r["key"] = image_key(r["id"], r["image_index"])
            data = encode_image(np.asarray(_pixels(r)), r)
            r.update(image_uri=store.uri_of(r["key"]), sha256=hashlib.sha256(data).hexdigest())
            if not webdataset:
                store.write_bytes(r["key"], data)
                continue
            member = r["key"].rsplit("/", 1)[-1]
            info = tarfile.TarInfo(member)
            info.size = len(data)
            members.addfile(info, io.BytesIO(data))
            r.update(key=shard, image_uri=f"{store.uri_of(shard)}#{member}")
    if webdataset:
        store.write_bytes(shard, tar.getvalue())
    schema = METADATA_SCHEMA
    for name in ("row_id", "sweep"):  # outputs written before sweeps existed lack them
        if name not in schema.names:
            schema = schema.append(pa.field(name, pa.string()))
    schema = pa.schema([f for f in schema if f.name not in drop])
    for prefix, rows in (("metadata", images), ("failures", failures)):
        chunks = [rows[i::parts] for i in range(parts)]
        for n, chunk in enumerate(c for c in chunks if c):
            table = pa.Table.from_pylist(
                [{c: r.get(c) for c in schema.names} for r in chunk], schema=schema
            )
            buf = io.BytesIO()
            pq.write_table(table, buf)
            store.write_bytes(f"{prefix}/part-run{n}-00000.parquet", buf.getvalue())
    return store.uri


def sweep_items() -> list[dict]:
    rows = []
    for g in (10.0, 5.0, 7.5):  # out of order on purpose: grids sort numerically
        for steps in (30, 20):
            for sched in ("euler_a", "ddim"):
                cell = {"guidance_scale": g, "scheduler": sched, "steps": steps}
                label = ",".join(
                    f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cell.items()
                )
                rows.append(item(f"cat@{label}", sweep=cell, prompt="a cat"))
    return rows

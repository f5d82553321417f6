"""Spec validation: one clear message per problem, naming file, field and value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdbatch.errors import UserError
from sdbatch.spec import json_schema, load_spec

BASE = """\
name: cats
manifest: m.parquet
output: out
model: models/base
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_spec(path)
    return info.value.problems


def test_valid_spec_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "models/base").mkdir(parents=True)
    (tmp_path / "job.yaml").write_text(BASE)
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.manifest == str(tmp_path / "m.parquet")
    assert spec.output == str(tmp_path / "out")
    assert spec.models is not None and spec.models.base == str(tmp_path / "models/base")
    assert spec.defaults.steps == 20 and spec.batch_size == 4


def test_hub_id_kept_when_no_such_folder(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(
        BASE.replace("models/base", "runwayml/stable-diffusion-v1-5")
    )
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.models is not None and spec.models.base == "runwayml/stable-diffusion-v1-5"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("defaults: {steps: 900}", "job.yaml: defaults.steps: must be 1..500, got 900"),
        ("defaults: {steps: 0}", "job.yaml: defaults.steps: must be 1..500, got 0"),
        ("defaults: {width: 65}", "job.yaml: defaults.width: must be a multiple of 8, got 65"),
        (
            "defaults: {guidance_scale: -1}",
            "job.yaml: defaults.guidance_scale: must be 0..100, got -1",
        ),
        (
            "defaults: {scheduler: warp}",
            "defaults.scheduler: unknown scheduler; valid: default, ddim",
        ),
        ("defaults: {num_images: 0}", "defaults.num_images: must be 1..10000, got 0"),
        ("defaults: {strength: 1.5}", "defaults.strength: must be 0..1, got 1.5"),
        ("defaults: {mode: paint}", "defaults.mode: "),
        ("batch_sise: 3", "job.yaml: batch_sise: unknown key (did you mean 'batch_size'?)"),
        ("defaults: {stpes: 3}", "defaults.stpes: unknown key (did you mean 'steps'?)"),
        ("seed: -1", "job.yaml: seed: must be 0..9223372036854775807, got -1"),
        ("seed: 9223372036854775808", "job.yaml: seed: must be 0..9223372036854775807"),
        ("batch_size: many", "job.yaml: batch_size: "),
        ("compute: {device: tpu}", "compute.device: "),
        ("compute: {dtype: float8}", "compute.dtype: "),
        ("models: {base: x}", "set either 'model' or 'models', not both"),
    ],
)
def test_bad_values_name_field_and_value(tmp_path: Path, extra: str, expected: str) -> None:
    found = problems(tmp_path, BASE + extra + "\n")
    assert any(expected in line for line in found), found
    assert all(line.startswith(str(tmp_path / "job.yaml")) for line in found)


def test_problems_carry_file_field_and_value(tmp_path: Path) -> None:
    found = problems(tmp_path, BASE + "defaults: {steps: 0}\nbatch_sise: 3\n")
    where = {(p.field, p.value) for p in found}
    assert where == {("defaults.steps", 0), ("batch_sise", 3)}, found
    assert {p.file for p in found} == {str(tmp_path / "job.yaml")}


def test_every_problem_reported_once(tmp_path: Path) -> None:
    found = problems(tmp_path, BASE + "defaults: {steps: 0, width: 7}\nbatch_size: 0\n")
    assert len(found) == 3, found


def test_missing_required_fields(tmp_path: Path) -> None:
    found = problems(tmp_path, "name: x\n")
    assert any("manifest: required field is missing" in p for p in found)
    assert any("output: required field is missing" in p for p in found)


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    found = problems(tmp_path, "name: [unclosed\n")
    assert "malformed YAML" in found[0] and "line" in found[0]


def test_top_level_not_mapping(tmp_path: Path) -> None:
    assert "expected a mapping" in problems(tmp_path, "- a\n- b\n")[0]


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_schema_is_generated_from_models() -> None:
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert {"name", "manifest", "output", "defaults", "compute"} <= set(schema["properties"])
    json.dumps(schema)


def test_cli_validate_exits_1_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(BASE + "defaults: {steps: 900}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sdbatch.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "defaults.steps: must be 1..500, got 900" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_stays_light() -> None:
    """--help, validate and schema never import torch, diffusers or ray."""
    code = (
        "import sys; from sdbatch import cli, spec, manifest, plan, runner, models;"
        "heavy = [m for m in ('torch', 'diffusers', 'ray', 'transformers') if m in sys.modules];"
        "print(heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("sweep: {cfg: [1, 2]}", "sweep.cfg: unknown key (valid: steps, guidance_scale"),
        ("sweep: {steps: [20, 900]}", "sweep: steps[1] must be 1..500, got 900"),
        ("sweep: {scheduler: [ddim, warp]}", "sweep: scheduler[1] unknown scheduler"),
        ("sweep: {steps: []}", "sweep.steps is an empty list"),
    ],
)
def test_bad_sweeps(tmp_path: Path, extra: str, expected: str) -> None:
    found = problems(tmp_path, BASE + extra + "\n")
    assert any(expected in p for p in found), found


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            "{uri: out, format: gif}",
            "output.format: Input should be 'png', 'webp' or 'jpeg', got 'gif'",
        ),
        ("{uri: out, layout: zip}", "output.layout: "),
        ("{uri: out, format: jpeg, quality: 0}", "output.quality: must be 1..100, got 0"),
        ("{uri: out, format: png, lossless: true}", "lossless applies to format webp only"),
        ("{format: png}", "output: a mapping needs 'uri'"),
    ],
)
def test_bad_output_options(tmp_path: Path, output: str, expected: str) -> None:
    found = problems(tmp_path, BASE.replace("output: out", f"output: {output}"))
    assert any(expected in p for p in found), found


def test_output_mapping_form(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(
        BASE.replace(
            "output: out",
            "output: {uri: out, format: webp, lossless: true, layout: webdataset, shard_size: 10}",
        )
    )
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.output == str(tmp_path / "out")
    assert (
        spec.output_options.format,
        spec.output_options.layout,
        spec.output_options.shard_size,
    ) == ("webp", "webdataset", 10)

"""PNG metadata read back: A1111 infotext parsed by an independent parser, field by field,
the sdbatch JSON record, and `sdbatch inspect` on good and bad files."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from sdbatch.cli import app
from sdbatch.write import REPRODUCIBLE_FIELDS, encode_image
from tests.helpers import check_infotext, check_png, parse_infotext


def row(**fields: Any) -> dict[str, Any]:
    base = {
        "id": "r1",
        "image_index": 0,
        "mode": "txt2img",
        "prompt": "a cat, oil painting",
        "negative_prompt": "blurry, low quality",
        "seed": 2**62 + 12345,
        "steps": 20,
        "guidance_scale": 7.5,
        "scheduler": "dpmpp_2m_karras",
        "scheduler_class": "DPMSolverMultistepScheduler",
        "width": 96,
        "height": 64,
        "strength": 1.0,
        "model": "/models/sd-v1-5/",
        "model_sha256": "0123456789abcdef" * 4,
        "init_image_sha256": None,
        "mask_image_sha256": None,
        "depth_map_sha256": None,
        "depth_source": None,
        "batch_size": 4,
        "batch_position": 1,
        "torch_threads": 2,
        "device": "cpu",
        "dtype": "float32",
        "prompt_truncated": False,
    }
    return {**base, **fields}


CASES = {
    "txt2img": row(),
    "img2img, no negative prompt": row(
        mode="img2img", negative_prompt=None, strength=0.55, scheduler="ddim"
    ),
    "inpaint, multi-line prompt with colons": row(
        mode="inpaint",
        prompt="portrait: a woman, 35mm\nstyle: film, grain: 0.2",
        negative_prompt="hands\nextra fingers, text: watermark",
        strength=0.8,
        scheduler="euler_a",
        guidance_scale=5.0,
    ),
    "depth2img, unicode and brackets": row(
        mode="depth2img",
        prompt="(ünïcode ✨:1.2), [b]bold[/b] :smile:",
        strength=0.7,
        depth_source="estimated",
        guidance_scale=12.25,
    ),
}


def png_of(r: dict[str, Any]) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (r["height"], r["width"], 3), np.uint8)
    return encode_image(pixels, r)


@pytest.mark.parametrize("case", list(CASES))
def test_infotext_and_record_read_back_field_by_field(case: str) -> None:
    check_png(png_of(CASES[case]), CASES[case])


def test_values_with_commas_are_quoted_like_a1111() -> None:
    r = row(model="/models/sd, v2")
    check_png(png_of(r), r)


def test_parser_handles_a1111_quoted_values() -> None:
    text = 'a cat\nSteps: 20, Sampler: Euler a, Model: "sd, v2: final", Seed: 1'
    prompt, negative, params = parse_infotext(text)
    assert (prompt, negative) == ("a cat", "")
    assert params == {"Steps": "20", "Sampler": "Euler a", "Model": "sd, v2: final", "Seed": "1"}


# ---------------------------------------------------------------- sdbatch inspect

runner = CliRunner()


def test_inspect_prints_infotext_and_record_verbatim(tmp_path: Path) -> None:
    r = CASES["depth2img, unicode and brackets"]
    path = tmp_path / "x.png"
    path.write_bytes(png_of(r))
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    with Image.open(path) as im:
        info = im.text["parameters"]
    # Prompt text is printed as is: no rich markup ([b]), emoji codes (:smile:) or wrapping.
    assert info in result.output
    record = json.loads(result.output[result.output.index("{") :])
    assert record == {k: r.get(k) for k in REPRODUCIBLE_FIELDS}

    as_json = runner.invoke(app, ["inspect", "--json", str(path)])
    assert as_json.exit_code == 0
    assert json.loads(as_json.output) == record


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_inspect_reads_the_exif_of_jpeg_and_webp(tmp_path: Path, fmt: str) -> None:
    from sdbatch.inspector import read_image_info

    r = CASES["inpaint, multi-line prompt with colons"]
    pixels = np.zeros((r["height"], r["width"], 3), np.uint8)
    path = tmp_path / f"x.{fmt}"
    path.write_bytes(encode_image(pixels, r, {"format": fmt}))
    parameters, record = read_image_info(str(path))
    assert parameters is not None
    check_infotext(parameters, r)
    assert record == {k: r.get(k) for k in REPRODUCIBLE_FIELDS}
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0 and parameters in result.output


def _plain_png(info: PngInfo | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_inspect_bad_files_are_clear_errors(tmp_path: Path) -> None:
    a1111 = PngInfo()
    a1111.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, Seed: 1")
    broken = PngInfo()
    broken.add_text("sdbatch", "{not json")
    files = {
        "plain.png": (_plain_png(), "no sdbatch record"),
        "a1111.png": (_plain_png(a1111), "A1111 'parameters' only"),
        "broken.png": (_plain_png(broken), "not valid JSON"),
        "notes.png": (b"hello, not an image", "not an image"),
    }
    for name, (data, message) in files.items():
        (tmp_path / name).write_bytes(data)
        result = runner.invoke(app, ["inspect", str(tmp_path / name)])
        assert result.exit_code == 1, name
        assert message in result.output and name in result.output, result.output
        assert "Traceback" not in result.output
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nope.png")])
    assert missing.exit_code == 1 and "nope.png: no such file" in missing.output

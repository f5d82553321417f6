"""The gallery page on hand-made outputs (no Ray): links, escaping, failures, --where,
--limit, sweep grids, older outputs without sweep columns, and S3 outputs."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image
from typer.testing import CliRunner

from sdbatch.cli import app
from sdbatch.errors import UserError
from sdbatch.gallery import build_gallery, sweep_grids
from tests.helpers import T0, failure, fake_output, item, sweep_items


def records(page: str) -> list[dict]:
    match = re.search(r'<script type="application/json" id="records">(.*?)</script>', page, re.S)
    assert match
    return json.loads(match.group(1))


def links(page: str) -> list[str]:
    return [unquote(s) for s in re.findall(r'<img [^>]*src="([^"]+)"', page)]


# ---------------------------------------------------------------- sweeps


def test_sweep_grid_axes_are_the_parameters_with_most_values() -> None:
    items = sweep_items() + [item("plain")]
    grids = sweep_grids(items)
    # guidance (3 values) across; scheduler and steps tie at 2: by name, scheduler is the
    # rows and steps splits the row into two grids (the Z axis).
    assert len(grids) == 2
    for grid, steps in zip(grids, (20, 30), strict=True):
        assert (grid.row_id, grid.prompt) == ("cat", "a cat")
        assert (grid.x, grid.xs) == ("guidance_scale", [5.0, 7.5, 10.0])
        assert (grid.y, grid.ys) == ("scheduler", ["ddim", "euler_a"])
        assert grid.fixed == {"steps": steps}
        assert len(grid.cells) == 6
        for (yk, xk), members in grid.cells.items():
            (i,) = members
            cell = json.loads(items[i]["sweep"])
            assert (cell["scheduler"], cell["guidance_scale"], cell["steps"]) == (
                json.loads(yk),
                json.loads(xk),
                steps,
            )
    one_axis = sweep_grids([item(f"d@s={s}", sweep={"steps": s}) for s in (20, 10)])
    assert [(g.x, g.xs, g.y, g.ys) for g in one_axis] == [("steps", [10, 20], None, [None])]
    assert sweep_grids([item("a"), item("b", sweep={})]) == []


# ---------------------------------------------------------------- the page


def test_page_links_escaping_and_failures(tmp_path: Path) -> None:
    nasty = "</script><script>alert(1)</script> \"quoted\" & 'single' <b>"
    images = [
        item("t1", prompt=nasty),
        item("t1", 1, prompt=nasty),
        item("i1", mode="inpaint", strength=0.8),
        item("late", created_at=T0 + timedelta(hours=1)),
    ]
    failures = [
        failure("late"),  # failed, then succeeded on a retry: not listed
        failure("gone", error="CorruptImage"),
        failure("gone", created_at=T0 + timedelta(hours=2)),  # latest reason wins
    ]
    output = fake_output(str(tmp_path / "out"), images, failures)
    g = build_gallery(output)
    page_path = Path(output) / "index.html"
    assert g.uri == str(page_path) and (g.images, g.failures) == (4, 1)
    page = page_path.read_text()

    # Every thumbnail link is relative and points at the image file.
    assert len(links(page)) == 4
    for link in links(page):
        assert not link.startswith("/") and (page_path.parent / link).is_file(), link
    # No prompt can break out of the page's markup; the records carry it unchanged.
    assert "<script>alert(1)" not in page and "<b>" not in page
    (t1,) = [
        r for r in records(page) if r["fields"]["id"] == "t1" and r["fields"]["image_index"] == 0
    ]
    assert t1["fields"]["prompt"] == nasty and t1["infotext"].startswith(nasty)
    # The failure list: the still-failed item once, with its latest reason.
    failed = re.findall(r'<tr class="failure".*?</tr>', page)
    assert len(failed) == 1 and "gone" in failed[0] and "MissingInput" in failed[0]
    assert "late" not in "".join(failed)
    assert 'data-filter="inpaint"' in page and 'data-filter="txt2img"' in page

    # --out elsewhere: links are relative to wherever the page is.
    other = tmp_path / "site" / "deep" / "g.html"
    build_gallery(output, out=str(other))
    for link in links(other.read_text()):
        assert link.startswith("../../out/images/") and (other.parent / link).is_file()


def test_user_text_is_text_wherever_the_page_prints_it(tmp_path: Path) -> None:
    """Ids, prompts, error messages, the job name and --where break out of no element
    or attribute: in cards, sweep grids, failure rows, the header and the records."""
    from html.parser import HTMLParser

    attack = '"><img src=x onerror=alert(1)><script>alert(1)</script>'
    common = {"prompt": attack, "row_id": attack, "job_name": attack}
    images = [
        item(f"a{attack}", sweep={"steps": 20}, **common),
        item(f"a{attack}", 1, sweep={"steps": 30}, **common),
    ]
    failures = [failure(f"f{attack}", error=attack, sweep={"steps": 40}, **common)]
    output = fake_output(str(tmp_path / "out"), images, failures)
    g = build_gallery(output, where=f"id <> '{attack}x'")
    assert (g.images, g.failures, g.sweep_grids) == (2, 1, 1)
    page = Path(g.uri).read_text()

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[tuple[str, dict[str, str | None]]] = []
            self.texts: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.tags.append((tag, dict(attrs)))

        def handle_data(self, data: str) -> None:
            self.texts.append(data)

    parsed = Page()
    parsed.feed(page)
    assert [t for t, _ in parsed.tags].count("script") == 2  # the records and the page's JS
    assert not [a for _, attrs in parsed.tags for a in attrs if a.startswith("on")]
    assert "x" not in [attrs.get("src") for _, attrs in parsed.tags]
    # The text arrives as text: title, heading, card and grid prompts, failure row, --where.
    shown = "".join(parsed.texts)
    assert shown.count(attack) >= 8, shown
    assert f"f{attack}: init image not found" in shown
    alts = [attrs["alt"] for tag, attrs in parsed.tags if tag == "img" and attrs.get("alt")]
    assert alts == [attack] * 4  # two grid cells, two cards
    assert {r["fields"]["prompt"] for r in records(page)} == {attack}


def test_where_and_limit(tmp_path: Path) -> None:
    images = [item(f"t{i}") for i in range(5)] + [item("p1", mode="inpaint", seed=7)]
    failures = [failure("p2", mode="inpaint"), failure("t9")]
    output = fake_output(str(tmp_path / "out"), images, failures)

    g = build_gallery(output, where="mode = 'inpaint'")
    page = Path(g.uri).read_text()
    assert (g.images, g.matching_images, g.failures) == (1, 1, 1)
    assert [r["fields"]["id"] for r in records(page)] == ["p1"]
    assert "p2" in page and "t9" not in page
    g = build_gallery(output, where="mode = 'depth2img'")
    assert (g.images, g.failures) == (0, 0) and "no images" in Path(g.uri).read_text()
    g = build_gallery(output, where="seed >= 1000 AND id <> 't0'", limit=2)
    assert (g.images, g.matching_images) == (2, 4)
    assert [r["fields"]["id"] for r in records(Path(g.uri).read_text())] == ["t1", "t2"]

    for bad, says in [
        ("mode = ", "syntax error"),
        ("colour = 'red'", "colour"),
        ("seed > 'x'", "Conversion"),
        ("1=1) UNION SELECT 99 --", "not a predicate"),
        ("id IN (SELECT * FROM read_csv('/etc/passwd'))", "disabled"),
    ]:
        with pytest.raises(UserError) as err:
            build_gallery(output, where=bad)
        assert f"--where {bad!r}" in str(err.value) and says in str(err.value), str(err.value)


def test_sweep_grids_on_the_page_and_older_outputs(tmp_path: Path) -> None:
    items = sweep_items()
    items[0]["status"] = "failed"
    failed = [failure(items[0]["id"], sweep=json.loads(items[0]["sweep"]), prompt="a cat")]
    output = fake_output(str(tmp_path / "out"), items[1:], failed)
    g = build_gallery(output)
    page = Path(g.uri).read_text()
    assert g.sweep_grids == 2 and page.count('<div class="sweep"') == 2
    assert "guidance_scale = 7.5" in page and "scheduler = euler_a" in page
    assert "steps = 20" in page and "failed: MissingInput" in page

    # --where can look inside the sweep JSON (DuckDB's JSON operators).
    g = build_gallery(output, where="sweep->>'steps' = '20' AND row_id = 'cat'")
    assert (g.images, g.sweep_grids) == (6, 1)

    # An output written before `row_id` and `sweep` existed: same page, no grids.
    old = fake_output(
        str(tmp_path / "old"), [item("a"), item("b", 1)], drop=("row_id", "sweep"), parts=1
    )
    g = build_gallery(old)
    assert (g.images, g.sweep_grids) == (2, 0)


def test_s3_output_gets_the_page_inside_it(s3_server) -> None:
    bucket, storage = s3_server.bucket(), s3_server.storage()
    output = fake_output(f"s3://{bucket}/jobs/cats", [item("a"), item("b")], storage=storage)
    g = build_gallery(output, storage)
    assert g.uri == f"s3://{bucket}/jobs/cats/index.html"
    page = s3_server.get(bucket, "jobs/cats/index.html").decode()
    keys = set(s3_server.keys(bucket, "jobs/cats/"))
    assert all(f"jobs/cats/{link}" in keys for link in links(page))
    g = build_gallery(output, storage, out=f"s3://{bucket}/jobs/cats/review/page.html")
    page = s3_server.get(bucket, "jobs/cats/review/page.html").decode()
    assert all(link.startswith("../images/") for link in links(page))
    for out in ("/tmp/page.html", f"s3://{bucket}/elsewhere/page.html"):
        with pytest.raises(UserError, match="inside it"):
            build_gallery(output, storage, out=out)


def test_cli_gallery(tmp_path: Path) -> None:
    from tests.helpers import write_spec

    runner = CliRunner()
    output = fake_output(str(tmp_path / "out"), [item("a"), item("b")], [failure("c")])
    spec = write_spec(tmp_path / "job.yaml", manifest="m.parquet", output="out", model="m")
    result = runner.invoke(app, ["gallery", str(spec), "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert f"{output}/index.html" in result.output
    assert "1 images (of 2; raise --limit), 1 failed item(s)" in result.output

    bad = runner.invoke(app, ["gallery", output, "--where", "mode = "])
    assert bad.exit_code == 1 and "--where 'mode = '" in bad.output
    assert "Traceback" not in bad.output
    empty = runner.invoke(app, ["gallery", str(tmp_path)])
    assert empty.exit_code == 1 and "no metadata/ or failures/ parts" in empty.output


def test_webdataset_samples_get_inline_thumbnails(tmp_path: Path) -> None:
    import base64

    images = [item("a", width=96), item("b", 1)]
    output = fake_output(str(tmp_path / "out"), images, webdataset=True)
    g = build_gallery(output)
    page = Path(g.uri).read_text()
    srcs = links(page)
    assert len(srcs) == 2 and all(s.startswith("data:image/webp;base64,") for s in srcs)
    sizes = set()
    for src in srcs:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            sizes.add(im.size)
    assert sizes == {(96, 64), (64, 64)}

    # `sdbatch inspect` takes the metadata's image_uri of a sample as is.
    result = CliRunner().invoke(app, ["inspect", "--json", images[0]["image_uri"]])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["id"] == "a"
    missing = CliRunner().invoke(app, ["inspect", images[0]["image_uri"] + "x"])
    assert missing.exit_code == 1 and "no member" in missing.output

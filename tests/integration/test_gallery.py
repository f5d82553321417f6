"""The gallery of a real tiny job, opened in headless Chromium; and every PNG's embedded
metadata read back against its metadata row.

Chromium + chromedriver are Debian packages (`make browser`). Without them the browser
tests skip locally and fail under CI=true, where the Makefile has installed them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sdbatch.gallery import build_gallery
from sdbatch.runner import read_metadata, run_job
from tests.helpers import check_png, fake_output, load_job, sweep_items

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models, ray_session):
    """A tiny job: txt2img, img2img and inpaint images plus one failing item (rendered
    once per module; the same spec as the `make_job` fixture builds)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("gallery")
    (root / "inputs").mkdir()
    yy, xx = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)).save(
        root / "inputs" / "init.png"
    )
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / "inputs" / "mask.png")
    img2img = {"mode": "img2img", "init_image": "inputs/init.png", "strength": 0.6}
    rows = [
        {"id": "t0", "prompt": "a cat, watercolor", "num_images": 2},
        {"id": "t1", "prompt": 'a <b>bold</b> "lighthouse" & sea', "negative_prompt": "blurry"},
        {"id": "t2", "prompt": "portrait: a fox\nstyle: film, grain", "seed": 42},
        {"id": "t3", "prompt": "a bowl of fruit"},
        {"id": "i0", "prompt": "a dog, oil", **img2img},
        {"id": "i1", "prompt": "a dog, ink", **img2img, "strength": 0.8},
        {
            "id": "p0",
            "prompt": "a hat",
            "mode": "inpaint",
            "init_image": "inputs/init.png",
            "mask_image": "inputs/mask.png",
            "strength": 0.9,
        },  # fmt: skip
        {"id": "missing", "prompt": "never drawn", **img2img, "init_image": "inputs/nope.png"},
    ]
    spec = load_job(root, tiny_models["base"], rows, output=str(root / "out"), steps=2)
    result = run_job(spec)
    assert (result.done, result.failed) == (8, 1)
    return spec, read_metadata(spec.output).to_pylist()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven through chromedriver (selenium)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    missing = [name for name, p in (("chromium", chromium), ("chromedriver", driver_path)) if not p]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        reason = f"{' and '.join(missing)} not installed (`make browser` installs them)"
        if _in_ci():
            pytest.fail(f"{reason}; under CI=true the browser test must run, not skip")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _all_loaded(driver, selector: str = ".card img") -> int:
    """Scroll every lazy image into view; return how many have not loaded (yet)."""
    return driver.execute_script(
        """const imgs = [...document.querySelectorAll(arguments[0])];
        imgs.forEach(i => i.scrollIntoView());
        return imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;""",
        selector,
    )


def _visible(driver, selector: str) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(e => e.offsetParent !== null).length",
        selector,
    )


def _full_page_screenshot(driver, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height + 120, 600), 4000))
    driver.execute_script("window.scrollTo(0, 0); document.activeElement.blur()")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path))


def test_every_png_carries_its_metadata_row(job) -> None:
    _, meta = job
    assert {r["mode"] for r in meta} == {"txt2img", "img2img", "inpaint"}
    for row in meta:
        check_png(Path(row["image_uri"]).read_bytes(), row)


def test_gallery_in_headless_chromium(job, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    spec, meta = job
    g = build_gallery(spec.output)
    assert (g.images, g.failures) == (8, 1)
    browser.set_window_size(1280, 900)
    browser.get(Path(g.uri).as_uri())

    # 1. Every thumbnail loaded (lazy images load once scrolled into view).
    assert len(browser.find_elements(By.CSS_SELECTOR, ".card img")) == len(meta)
    WebDriverWait(browser, 20).until(lambda d: _all_loaded(d) == 0)

    # 2. The failure is listed with its reason.
    failures = browser.find_elements(By.CSS_SELECTOR, "#failures tr.failure")
    assert len(failures) == 1
    text = failures[0].text
    assert "missing" in text and "MissingInput" in text and "nope.png" in text

    # 3. The mode filter: click it, count the visible cards.
    modes = {m: sum(r["mode"] == m for r in meta) for m in ("txt2img", "img2img", "inpaint")}
    for mode, count in modes.items():
        browser.find_element(By.CSS_SELECTOR, f'button[data-filter="{mode}"]').click()
        assert _visible(browser, ".card") == count, mode
        assert _visible(browser, "tr.failure") == (mode == "img2img")
    browser.find_element(By.CSS_SELECTOR, 'button[data-filter=""]').click()
    assert _visible(browser, ".card") == len(meta)
    search = browser.find_element(By.ID, "q")
    search.send_keys("lighthouse")
    assert _visible(browser, ".card") == 1
    search.clear()
    search.send_keys(" ")  # an input event with an empty filter shows everything again
    assert _visible(browser, ".card") == len(meta)

    # 4. Prompts render as text, not markup; a click opens the details panel.
    card = browser.find_element(By.CSS_SELECTOR, '.card[data-text^="t1 "]')
    t1 = next(r for r in meta if r["id"] == "t1")
    assert card.find_element(By.CSS_SELECTOR, ".prompt").text == t1["prompt"]
    _full_page_screenshot(browser, ARTIFACTS / "gallery.png")
    browser.set_window_size(1280, 900)
    card.click()
    dialog = browser.find_element(By.ID, "details")
    assert dialog.get_attribute("open") is not None
    from PIL import Image

    with Image.open(t1["image_uri"]) as im:
        assert browser.find_element(By.ID, "dinfo").text == im.text["parameters"]
    assert browser.execute_script("return document.getElementById('dimg').naturalWidth") > 0
    seed = browser.find_element(By.XPATH, "//table[@id='dfields']//tr[th='seed']/td")
    assert seed.text == str(t1["seed"]) and t1["seed"] > 2**53  # not rounded by JS numbers
    browser.save_screenshot(str(ARTIFACTS / "gallery-details.png"))


def test_sweep_grid_in_headless_chromium(tmp_path, browser) -> None:
    """A hand-made sweep output (3 × 2 × 2 grid) laid out as two grids per prompt."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    items = sweep_items()
    output = fake_output(str(tmp_path / "out"), items)
    g = build_gallery(output)
    assert g.sweep_grids == 2
    browser.set_window_size(1280, 900)
    browser.get(Path(g.uri).as_uri())
    grids = browser.find_elements(By.CSS_SELECTOR, ".sweep table")
    assert len(grids) == 2
    for grid in grids:
        assert len(grid.find_elements(By.CSS_SELECTOR, "thead th")) == 1 + 3
        assert len(grid.find_elements(By.CSS_SELECTOR, "tbody tr")) == 2
        assert len(grid.find_elements(By.CSS_SELECTOR, "tbody img")) == 6
    WebDriverWait(browser, 20).until(lambda d: _all_loaded(d, ".sweep img, .card img") == 0)
    _full_page_screenshot(browser, ARTIFACTS / "gallery-sweep.png")

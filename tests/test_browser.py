"""The draw-a-digit page in headless Chromium: draw digits with real pointer input, upload and drop images."""
from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitlens.classifier import Classifier
from pipeline.datasets import load_split
from tests.conftest import MONITOR, quick_params

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = Path("/tmp/serve-screenshot.png")
WAIT = 20  # seconds for the page to answer

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    MISSING = "no /usr/bin/chromium or /usr/bin/chromedriver: apt-get install chromium chromium-driver"
    if os.environ.get("CI"):
        pytest.fail(f"{MISSING} (CI must run this test)", pytrace=False)
    pytest.skip(MISSING, allow_module_level=True)
if not os.environ.get("CI"):  # in CI a missing package fails the import below
    pytest.importorskip("selenium", reason="selenium is not installed (pip install '.[test]')")
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install '.[serve]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from tests.conftest import serve_process  # noqa: E402

pytestmark = pytest.mark.slow


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 36) -> list[tuple[float, float]]:
    return [(cx + rx * math.sin(2 * math.pi * i / n), cy - ry * math.cos(2 * math.pi * i / n)) for i in range(n + 1)]


def segments(*corners: tuple[float, float], step: float = 12) -> list[tuple[float, float]]:
    """Points every `step` pixels along the polyline through `corners`, as a hand moving would give them."""
    points = [corners[0]]
    for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
        n = max(1, round(math.dist((x0, y0), (x1, y1)) / step))
        points += [(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(1, n + 1)]
    return points


# strokes in canvas pixels (the canvas is 280x280)
STROKES = {
    0: [ellipse(140, 140, 55, 85)],
    1: [segments((150, 50), (132, 230))],
    7: [segments((80, 60), (200, 60), (120, 230))],
}


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory, data_root, params) -> Path:
    """simple_cnn trained for one epoch on the full MNIST training set (about 97 %), exported to ONNX."""
    import torch

    from pipeline.conversion import export
    from pipeline.models import load_checkpoint, save_checkpoint
    from pipeline.tensors import to_inputs
    from pipeline.training import train

    out = tmp_path_factory.mktemp("browser-model")
    ckpt = train(quick_params(params, epochs=1, train_limit=None), "mnist", "simple_cnn", data_root / "mnist",
                 log=lambda msg: None, monitor=MONITOR)
    save_checkpoint(ckpt, out / "digits.ckpt")
    model, ckpt = load_checkpoint(out / "digits.ckpt")
    info = dataclasses.replace(ckpt.info, export_id="test-browser")
    images, labels = load_split(data_root / "mnist", "test")
    x = to_inputs(images[:500], info.mean, info.std, torch.device("cpu")).numpy()
    _, _, onnx_bytes, _ = export(model, info, x, labels[:500], batch_size=250)
    (out / "digits.onnx").write_bytes(onnx_bytes)
    return out / "digits.onnx"


def scan(data_root: Path, dataset: str, label: int, model: Path, folder: Path) -> tuple[Path, str]:
    """A test image of `label`, dark on light and enlarged like a scan, that `model` gets right: (file, its class)."""
    images, labels = load_split(data_root / dataset, "test")
    clf = Classifier(model)
    for i in np.flatnonzero(labels == label)[:50]:
        path = folder / f"{dataset}-{label}-{i}.png"
        Image.fromarray(255 - images[i]).resize((140, 140), Image.Resampling.BILINEAR).save(path)
        if clf.predict(path).top.index == label:
            return path, clf.classes[label]
    raise AssertionError(f"the model gets no {dataset} test image of class {label} right")


@pytest.fixture(scope="module")
def page(digits_model, exported, tmp_path_factory):
    """(driver, server URL): headless Chromium on the page of a server with the digits and a fashion model."""
    tmp = tmp_path_factory.mktemp("browser")
    fashion = exported("fashion-mnist", "cnn")[0]
    with serve_process([digits_model, fashion], log=tmp / "serve.log") as (url, _):
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--no-first-run",
                    "--window-size=1000,800", f"--user-data-dir={tmp / 'profile'}"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
        try:
            driver.get(url + "/")
            WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
            yield driver, url
            errors = [e["message"] for e in driver.get_log("browser")
                      if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
            assert not errors, errors  # no script error, no resource refused by the page's security policy
        finally:
            driver.quit()
            shutil.rmtree(tmp / "profile", ignore_errors=True)


def answer(driver) -> str:
    """The top label once the page shows the answer for what the canvas holds now."""
    canvas, predictions = driver.find_element(By.ID, "canvas"), driver.find_element(By.ID, "predictions")

    def current(d):
        done = predictions.get_attribute("data-version") == canvas.get_attribute("data-version")
        return done and (d.find_element(By.ID, "top-label").text or d.find_element(By.ID, "status").text or None)

    WebDriverWait(driver, WAIT).until(current)
    return driver.find_element(By.ID, "top-label").text


def draw(driver, strokes) -> None:
    """Real pointer input (WebDriver actions): press, move through the points, release, per stroke."""
    canvas = driver.find_element(By.ID, "canvas")
    size = canvas.size
    actions = ActionBuilder(driver, mouse=PointerInput(interaction.POINTER_MOUSE, "mouse"), duration=10)
    for points in strokes:
        # move_to offsets are from the element's centre
        at = [(round(x * size["width"] / 280 - size["width"] / 2), round(y * size["height"] / 280 - size["height"] / 2))
              for x, y in points]
        actions.pointer_action.move_to(canvas, *at[0]).pointer_down()
        for x, y in at[1:]:
            actions.pointer_action.move_to(canvas, x, y)
        actions.pointer_action.pointer_up()
    actions.perform()


def choose(driver, model: str) -> None:
    Select(driver.find_element(By.ID, "model")).select_by_value(model)


@pytest.mark.parametrize("digit", sorted(STROKES))
def test_drawn_digit_is_recognised(page, digit, tmp_path):
    driver, _ = page
    choose(driver, "digits")
    driver.find_element(By.ID, "clear").click()
    assert driver.find_element(By.ID, "top-label").text == ""
    draw(driver, STROKES[digit])
    label = answer(driver)
    bars = driver.find_elements(By.CSS_SELECTOR, "#predictions .bar-row")
    assert label.startswith(f"{digit} - "), f"drew {digit}, the page says {label!r}"
    assert len(bars) == 5 and bars[0].find_element(By.CSS_SELECTOR, ".label").text == label
    if digit == 7:
        driver.save_screenshot(str(tmp_path / "page.png"))
        driver.save_screenshot(str(SCREENSHOT))


def test_picked_file_is_classified(page, data_root, digits_model, tmp_path):
    driver, _ = page
    choose(driver, "digits")
    path, expected = scan(data_root, "mnist", 3, digits_model, tmp_path)
    driver.find_element(By.ID, "file").send_keys(str(path))
    assert answer(driver) == expected


def test_dropped_file_is_classified(page, data_root, digits_model, tmp_path):
    driver, _ = page
    choose(driver, "digits")
    path, expected = scan(data_root, "mnist", 4, digits_model, tmp_path)
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    """, base64.b64encode(path.read_bytes()).decode())
    assert answer(driver) == expected


def test_fashion_model_takes_pictures(page, data_root, exported, tmp_path):
    driver, _ = page
    fashion = exported("fashion-mnist", "cnn")[0]
    choose(driver, fashion.stem)
    assert "clothing" in driver.find_element(By.ID, "hint").text
    path, expected = scan(data_root, "fashion-mnist", 1, fashion, tmp_path)  # a trouser
    driver.find_element(By.ID, "file").send_keys(str(path))
    assert answer(driver) == expected
    choose(driver, "digits")


def test_blank_drawing_says_so(page):
    driver, _ = page
    choose(driver, "digits")
    driver.find_element(By.ID, "clear").click()
    img = io.BytesIO()
    Image.new("L", (100, 100), 255).save(img, "PNG")
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "blank.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    """, base64.b64encode(img.getvalue()).decode())
    assert answer(driver) == ""
    assert "no content" in driver.find_element(By.ID, "status").text

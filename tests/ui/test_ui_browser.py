"""The pages in a real browser: Debian's headless Chromium driven by Selenium (chromedriver from the same package:
no browser is downloaded). A person signs in, moves two sliders with the keyboard, generates, sees the progress bar
reach its end and an image whose pixels equal the API's for the same request, restores an earlier result from the
history, downloads a PNG whose ``parameters`` text other tools read; then opens a sweep in the viewer, filters it
and opens a cell. Screenshots go to test-output/screenshots/ for a person to look at.

Without /usr/bin/chromium the tests skip on a developer's machine and FAIL under CI (``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from serve_support import TOKEN, RunningServer, assert_same_image, decode_png, free_port, make_world  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
REQUEST = {"prompt": "a red circle on a blue background", "seed": 7, "steps": 3, "width": 32, "height": 32}

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if os.environ.get("CI"):
        raise RuntimeError("the browser tests need Debian's chromium and chromium-driver: .ci/run installs them")
    pytest.skip("no /usr/bin/chromium + chromedriver here (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("page-world"))


@pytest.fixture(scope="module")
def server(world):
    running = RunningServer(world)
    yield running
    running.stop()


def _wait(driver, condition, what: str, limit_s: float = 120.0):
    return WebDriverWait(driver, limit_s, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def _shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def _blob_bytes(driver, element) -> bytes:
    """The bytes behind an <img>'s (blob:) URL, read inside the page."""
    data = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0].src).then(r => r.arrayBuffer()).then(b => {"
        "  let s = ''; new Uint8Array(b).forEach(x => s += String.fromCharCode(x)); done(btoa(s)); })"
        ".catch(e => done('error: ' + e));", element)
    assert not data.startswith("error"), data
    return base64.b64decode(data)


def _sign_in(driver, url: str) -> None:
    driver.get(url + "/")
    driver.execute_script("sessionStorage.clear()")  # a new person: nothing remembered from an earlier test
    driver.refresh()
    token = _wait(driver, lambda d: d.find_element(By.ID, "token"), "the sign-in form")
    token.send_keys(TOKEN)
    token.send_keys(Keys.ENTER)  # the form submits from the keyboard
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#lora-table tbody input")) >= 2, "the LoRA list")


def _generate(driver) -> None:
    results = lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history .thumb"))  # noqa: E731
    before = results(driver)
    driver.find_element(By.ID, "generate").click()
    _wait(driver, lambda d: results(d) > before or d.find_element(By.ID, "status").text.startswith("Not generated"),
          "the result")
    assert driver.find_element(By.ID, "status").text.startswith("Done"), driver.find_element(By.ID, "status").text


def _fill(driver, **values) -> None:
    for field, value in values.items():
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))


def test_a_person_blends_two_loras_and_gets_the_apis_image(browser, server):
    _sign_in(browser, server.url)
    assert TOKEN not in browser.current_url  # the token is never in a URL ...
    assert browser.execute_script("return sessionStorage.getItem('lorablend.token')") == TOKEN  # ... but in the tab
    names = [box.get_attribute("data-name") for box in browser.find_elements(By.CSS_SELECTOR, "#lora-table tbody input")]
    first, second = names[:2]
    for name in (first, second):
        browser.find_element(By.ID, f"use-{name}").send_keys(Keys.SPACE)  # keyboard: a checkbox toggles with space
    sliders = {n: browser.find_element(By.ID, f"w-{n}") for n in (first, second)}
    sliders[first].send_keys(*[Keys.ARROW_LEFT] * 6)   # 1.00 -> 0.70
    sliders[second].send_keys(*[Keys.ARROW_LEFT] * 4)  # 1.00 -> 0.80
    weights = {n: float(s.get_attribute("value")) for n, s in sliders.items()}
    assert weights == {first: pytest.approx(0.7), second: pytest.approx(0.8)}
    _fill(browser, prompt=REQUEST["prompt"], seed=REQUEST["seed"], steps=REQUEST["steps"], width=32, height=32)
    _generate(browser)
    bar = browser.find_element(By.ID, "progress")
    assert float(bar.get_attribute("value")) == float(bar.get_attribute("max")) > 0  # the bar reached its end
    _shot(browser, "playground-blend")

    shown = _blob_bytes(browser, browser.find_element(By.ID, "image-a"))
    with server.client() as client:
        answer = client.post("/v1/images", json={**REQUEST, "loras": weights, "response_format": "png"})
    assert answer.status_code == 200, answer.text
    assert_same_image(decode_png(shown), decode_png(answer.content), "page vs API")
    from PIL import Image

    parameters = Image.open(io.BytesIO(shown)).text["parameters"]  # what A1111's PNG Info reads
    assert parameters.startswith(REQUEST["prompt"]) and f"<lora:{first}:0.7>" in parameters
    assert "Seed: 7" in parameters and "Steps: 3" in parameters and "Size: 32x32" in parameters


def test_history_restores_an_earlier_result_and_ab_compares_with_the_base(browser, server):
    _sign_in(browser, server.url)
    name = browser.find_elements(By.CSS_SELECTOR, "#lora-table tbody input")[0].get_attribute("data-name")
    browser.find_element(By.ID, f"use-{name}").click()
    _fill(browser, prompt="a green square", seed=1, steps=2, width=32, height=32)
    _generate(browser)
    first_image = _blob_bytes(browser, browser.find_element(By.ID, "image-a"))
    _fill(browser, seed=2)
    browser.find_element(By.ID, "compare").send_keys(Keys.SPACE)
    assert browser.find_element(By.ID, "compare").is_selected()
    _generate(browser)
    assert browser.find_element(By.ID, "fig-b").is_displayed()  # A/B: the base beside the mix, same seed
    with server.client() as client:
        base = client.post("/v1/images", json={"prompt": "a green square", "seed": 2, "steps": 2, "width": 32,
                                               "height": 32, "response_format": "png"})
    assert_same_image(decode_png(_blob_bytes(browser, browser.find_element(By.ID, "image-b"))), decode_png(base.content),
                      "base beside the mix")
    _shot(browser, "playground-compare")
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#history .thumb")
    assert len(thumbs) == 2
    thumbs[0].click()
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "1"
    assert not browser.find_element(By.ID, "compare").is_selected()
    assert _blob_bytes(browser, browser.find_element(By.ID, "image-a")) == first_image


def test_the_page_is_public_but_the_api_is_not_and_it_carries_a_content_security_policy(server):
    import httpx

    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text  # no inline script: the policy forbids it
    assert httpx.get(server.url + "/v1/loras", timeout=30).status_code == 401
    for name in ("nope.js", "..%2Fcli.py", "%2E%2E%2F__init__.py"):  # only the shipped files, never a path
        assert httpx.get(f"{server.url}/ui/{name}", timeout=30).status_code == 404, name


@pytest.fixture(scope="module")
def sweep_folder(world, tmp_path_factory):
    from lorablend.sweep import run_sweep
    from lorablend.sweep.plan import SweepSettings

    names = sorted(world.files)[:1]
    spec = SweepSettings(str(world.model), [(str(world.files[n]), n) for n in names], [0.0, 1.0],
                         ["a red circle", "a blue square"], [0, 1], steps=2, width=32, height=32)
    out = tmp_path_factory.mktemp("sweep") / "out"
    run_sweep(spec, out)
    return out


def test_the_sweep_viewer_shows_the_grid_filters_it_and_opens_a_cell(browser, sweep_folder):
    import uvicorn

    from lorablend.ui.viewer import create_viewer_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_viewer_app(sweep_folder), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:  # start-up, not a timing assertion
            time.sleep(0.02)
        browser.get(f"http://127.0.0.1:{port}/")
        cells = lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .cell:not(.pending)")  # noqa: E731
        _wait(browser, lambda d: len(cells(d)) == 8, "8 cells (2 prompts x 2 seeds x 2 mixes)")
        _wait(browser, lambda d: all((i.get_attribute("src") or "").startswith("blob:")
                                     for i in d.find_elements(By.CSS_SELECTOR, "#grid .cell img")), "the images")
        assert "finished" in browser.find_element(By.ID, "summary").text
        _shot(browser, "viewer-grid")
        Select(browser.find_element(By.ID, "f-seed")).select_by_visible_text("1")
        _wait(browser, lambda d: len(cells(d)) == 4, "4 cells with seed 1")
        Select(browser.find_element(By.ID, "f-prompt")).select_by_visible_text("a blue square")
        _wait(browser, lambda d: len(cells(d)) == 2, "2 cells: seed 1, 'a blue square'")
        cells(browser)[1].click()
        line = browser.find_element(By.ID, "detail-line").text
        assert '"prompt": "a blue square"' in line and '"seed": 1' in line and '"sha256"' in line
        _wait(browser, lambda d: (d.find_element(By.ID, "detail-image").get_attribute("src") or "").startswith("blob:"),
              "the cell's image")
        _shot(browser, "viewer-cell")
        shown = _blob_bytes(browser, browser.find_element(By.ID, "detail-image"))
        record = __import__("json").loads(line)
        assert shown == (sweep_folder / record["file"]).read_bytes()
    finally:
        server.should_exit = True
        thread.join()

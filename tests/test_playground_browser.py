"""The playground page in a real browser: headless Debian Chromium driven by Selenium against a real `m2pt
serve` (a subprocess, the shipped demo model and bundles, an API key required). It asks for the key, picks
`digits`, uploads `demo/examples/digit_7.png`, asks, and sees "7"; compare mode answers with the base model
and bundles at once; Stop aborts the request on the server (its slot is free again on /metrics); an
oversized image shows the server's own 413 message. Screenshots: see `shots`. If Chromium or its driver is
missing the test FAILS (run `make setup-browser`), it never skips."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from api_fakes import _free_port
from PIL import Image

from bench.serve_proc import wait_ready

REPO = Path(__file__).resolve().parents[1]
DIGIT_7 = REPO / "demo" / "examples" / "digit_7.png"
API_KEY = "playground-test-key"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: a temp dir, or `$M2PT_SCREENSHOT_DIR` (`M2PT_SCREENSHOT_DIR=docs` refreshes the
    README's; a plain test run never changes tracked files)."""
    chosen = os.environ.get("M2PT_SCREENSHOT_DIR")
    return Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `m2pt serve` on the demo model, with an empty user store in a temp M2PT_HOME."""
    port = _free_port()
    home = tmp_path_factory.mktemp("playground-home")
    env = dict(
        os.environ, M2PT_HOME=str(home), M2PT_API_KEY=API_KEY, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"
    )
    env.pop("M2PT_OPS_TOKEN", None)
    cmd = [sys.executable, "-m", "m2pt_cli.main", "--log-level", "WARNING", "serve", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    if not wait_ready(lambda: httpx.get(url + "/ready", timeout=2), 120, proc, 0.3):
        proc.kill()
        pytest.fail(f"m2pt serve did not become ready: {proc.stderr.read() if proc.stderr else ''}")
    yield url
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):  # fail loudly: CI must install them (make setup-browser)
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: run `make setup-browser`")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=options)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def wait_for(browser, condition, timeout: float = 60):
    """Wait for `condition(browser)`; on timeout fail with what the page shows (answers, errors)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        shown = [browser.find_element(By.ID, i).text for i in ("server-info", "error", "panels")]
        pytest.fail(f"timed out after {timeout} s; the page shows: {shown}")


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
    return sum(values)


def open_page(browser, server):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    wait_for(browser, lambda b: b.find_element(By.ID, "keybox").is_displayed())  # the server wants a key
    assert "needs an API key" in browser.find_element(By.ID, "server-info").text
    assert "401" in browser.find_element(By.ID, "error").text
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "key-save").click()
    wait_for(browser, lambda b: "digits" in b.find_element(By.ID, "bundle").text)
    storage = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
    assert storage == [0, 0, ""]  # the key stays in memory only


def ask(browser, question: str, image: Path, n_panels: int, timeout: float = 90) -> list:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "image-input").send_keys(str(image))
    wait_for(browser, lambda b: b.find_element(By.ID, "preview").is_displayed())
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    browser.find_element(By.ID, "ask").click()
    wait_for(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#panels .panel")) == n_panels)
    wait_for(browser, lambda b: b.find_element(By.ID, "ask").is_enabled(), timeout)
    return browser.find_elements(By.CSS_SELECTOR, "#panels .panel")


def test_pick_digits_upload_ask_and_see_7(browser, server, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, server)
    Select(browser.find_element(By.ID, "bundle")).select_by_value("digits")
    card = browser.find_element(By.ID, "card").text
    assert "v1" in card and "86.0 % exact match" in card and "shipped demo" in card
    assert browser.find_elements(By.CSS_SELECTOR, "#card svg path")  # the held-out curve
    (panel,) = ask(browser, "What digit is this?", DIGIT_7, 1)
    assert panel.find_element(By.CLASS_NAME, "answer").text == "7"
    assert "digits@v1" in panel.find_element(By.CLASS_NAME, "status").text
    assert browser.save_screenshot(str(shots / "playground.png"))


def test_compare_mode_answers_with_base_and_bundles_side_by_side(browser, server, shots):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    browser.find_element(By.ID, "compare").click()
    for name in ("digits", "size"):
        browser.find_element(By.CSS_SELECTOR, f"#compare-list input[value='{name}']").click()
    panels = ask(browser, "What digit is this?", DIGIT_7, 3)
    answers = {p.get_attribute("data-bundle"): p.find_element(By.CLASS_NAME, "answer").text for p in panels}
    assert answers[""] == "1"  # the base has never seen a digit (README table)
    assert answers["digits"] == "7"
    assert all(p.get_attribute("data-finish") == "stop" for p in panels)
    assert browser.save_screenshot(str(shots / "playground_compare.png"))


def test_stop_aborts_the_request_on_the_server(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    aborted_before = metric(server, "m2pt_engine_finished_total")
    browser.find_element(By.ID, "ignore-eos").click()
    browser.execute_script("document.getElementById('max-tokens').value = '400'")
    browser.find_element(By.ID, "image-input").send_keys(str(DIGIT_7))
    browser.find_element(By.ID, "question").send_keys("What digit is this?")
    browser.find_element(By.ID, "ask").click()
    wait_for(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#panel-0 .answer").text != "")
    assert metric(server, "m2pt_running_batch_size") == 1  # generating
    browser.find_element(By.ID, "stop").click()
    wait_for(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#panel-0 .status").text == "stopped")
    deadline = time.monotonic() + 30
    while metric(server, "m2pt_running_batch_size") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "m2pt_running_batch_size") == 0 and metric(server, "m2pt_queue_depth") == 0
    text = httpx.get(server + "/metrics").text
    assert re.search(r'^m2pt_engine_finished_total\{bundle="none",reason="abort"\} [1-9]', text, re.M), text
    assert metric(server, "m2pt_engine_finished_total") == aborted_before + 1
    assert len(browser.find_element(By.CSS_SELECTOR, "#panel-0 .answer").text.split()) < 400


def test_an_oversized_image_shows_the_servers_413_message(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    big = tmp_path / "wide.png"
    Image.new("RGB", (5000, 8), (255, 255, 255)).save(big)  # longer side over --max-image-side (4096)
    direct = httpx.post(
        server + "/v1/chat",
        json={"instruction": "hi", "image": base64.b64encode(big.read_bytes()).decode()},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert direct.status_code == 413
    error = direct.json()["error"]
    open_page(browser, server)
    (panel,) = ask(browser, "What is this?", big, 1)
    status = panel.find_element(By.CLASS_NAME, "status").text
    assert status == f"413 {error['type']}: {error['message']}"


def test_drop_and_paste_give_a_preview_and_non_images_are_refused(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    data = base64.b64encode(DIGIT_7.read_bytes()).decode()
    script = """
      const [kind, b64, name, type] = arguments;
      const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], name, {type}));
      const event = kind === "drop"
        ? new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true})
        : new ClipboardEvent("paste", {clipboardData: dt, bubbles: true});
      (kind === "drop" ? document.getElementById("drop") : document).dispatchEvent(event);
    """
    for kind, name in (("drop", "dropped_7.png"), ("paste", "pasted_7.png")):
        assert not browser.find_element(By.ID, "preview").is_displayed()
        browser.execute_script(script, kind, data, name, "image/png")
        wait_for(browser, lambda b: b.find_element(By.ID, "preview").is_displayed())
        assert browser.find_element(By.ID, "image-info").text.startswith(name)
        browser.find_element(By.ID, "clear-image").click()
    browser.execute_script(
        script, "drop", base64.b64encode(b"not an image").decode(), "notes.txt", "text/plain"
    )
    assert browser.find_element(By.ID, "error").text == "that is not an image file"

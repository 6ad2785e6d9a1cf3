"""The web app in a real browser: Debian's headless chromium, driven through WebDriver by selenium with Debian's
chromium-driver (same source package, so the driver always matches the browser, and nothing is downloaded at test
time). `blip serve` runs on a free localhost port; the test uploads a synthetic image, reads the caption from the
page, asks a question and reads the answer, searches the index, and saves a screenshot of each step."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import make_config, make_tokenizer, random_image
from PIL import Image

from transformers_blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    build_processor,
)
from transformers_blip.app import BlipApp
from transformers_blip.retrieval_index import ImageIndex

DEBIAN_PACKAGES = ("chromium", "chromium-driver")
WAIT_SECONDS = 60


def _install_chromium() -> None:
    """Installs Debian's chromium and its driver with apt-get (the test machines run as root)."""
    commands = [["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES]]
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            pytest.fail(f"the browser test needs {' and '.join(DEBIAN_PACKAGES)}; `{' '.join(command)}`: {error}")
        if done.returncode != 0:
            pytest.fail(
                f"the browser test needs Debian's {' and '.join(DEBIAN_PACKAGES)}; `{' '.join(command)}` failed "
                f"(exit {done.returncode}): {done.stderr.strip()[-500:]}"
            )


@pytest.fixture(scope="module")
def browser():
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        _install_chromium()
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")), options=options
    )
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`blip serve` in its own process on a free port, with tiny models saved as a user's would be; yields the same
    app loaded in this process (to compute what the page must show) and the page's address."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    processor = build_processor(make_tokenizer(), image_size=32)
    vqa_model = BlipForQuestionAnswering(make_config())
    vqa_model.generation_config.min_length = 4  # a random decoder would end at once: an empty answer shows nothing
    heads = {
        "captioner": BlipForConditionalGeneration(make_config()),
        "vqa": vqa_model,
        "retrieval": BlipForImageTextRetrieval(make_config()),
    }
    for name, model in heads.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    photos = root / "photos"
    photos.mkdir()
    for index in range(3):
        random_image(index).save(photos / f"photo{index}.png")
    ImageIndex.build(heads["retrieval"].eval(), processor, photos, root / "photos.index.safetensors")
    models = {
        "model": str(root / "captioner"),
        "vqa_model": str(root / "vqa"),
        "retrieval_model": str(root / "retrieval"),
        "index": str(root / "photos.index.safetensors"),
    }
    port = _free_port()
    command = [sys.executable, "-m", "transformers_blip.cli", "serve", "--port", str(port), "--device", "cpu"]
    for option, value in models.items():
        command += [f"--{option.replace('_', '-')}", value]
    log = open(root / "serve.log", "w")
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        app = BlipApp.load(**models)
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(server, url, root / "serve.log")
        yield app, url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _wait_for_server(server: subprocess.Popen, url: str, log_path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"blip serve exited with {server.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"blip serve did not answer at {url} within {WAIT_SECONDS} s: {log_path.read_text()[-2000:]}")


def _value(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector).get_attribute("value") or ""


def _screenshot(driver, path) -> None:
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    with Image.open(path) as shot:
        assert shot.width > 0 and shot.height > 0


def test_caption_answer_and_search_in_the_browser(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, url = served
    image_path = tmp_path / "upload.png"
    random_image(7).save(image_path)
    wait = WebDriverWait(browser, WAIT_SECONDS)
    browser.get(url)
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#caption-image input[type=file]"))

    # Caption: upload, press the button, read the caption the page shows.
    browser.find_element(By.CSS_SELECTOR, "#caption-image input[type=file]").send_keys(str(image_path))
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#caption-image img"))
    browser.find_element(By.ID, "caption-button").click()
    wait.until(lambda driver: _value(driver, "#caption-output textarea"))
    assert _value(browser, "#caption-output textarea") == app.caption(str(image_path))[0]
    _screenshot(browser, tmp_path / "caption.png")

    # Ask: the same image in the second tab, a question typed in, the answer read back.
    browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Ask']").click()
    wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#vqa-image input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#vqa-image input[type=file]").send_keys(str(image_path))
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#vqa-image img"))
    question = "what colour is the square ?"
    browser.find_element(By.CSS_SELECTOR, "#vqa-question textarea").send_keys(question)
    browser.find_element(By.ID, "vqa-button").click()
    wait.until(lambda driver: _value(driver, "#vqa-answer textarea"))
    assert _value(browser, "#vqa-answer textarea") == app.answer(str(image_path), question)
    _screenshot(browser, tmp_path / "answer.png")

    # Search: a description typed in, the gallery shows the index's best matches.
    browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Search']").click()
    query = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#search-query textarea"))
    query.send_keys("a red square")
    browser.find_element(By.ID, "search-button").click()
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#search-results img")) == len(app.index))
    _screenshot(browser, tmp_path / "search.png")


def test_a_bad_upload_shows_its_error_on_the_page(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = served
    wait = WebDriverWait(browser, WAIT_SECONDS)
    browser.get(url)
    button = wait.until(lambda driver: driver.find_element(By.ID, "caption-button"))
    button.click()  # no image uploaded
    wait.until(lambda driver: "no image" in driver.find_element(By.TAG_NAME, "body").text)
    assert _value(browser, "#caption-output textarea") == ""
    _screenshot(browser, tmp_path / "error.png")

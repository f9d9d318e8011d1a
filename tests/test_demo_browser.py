"""The Gradio interpolation demo in a real browser (Debian's headless Chromium through Selenium): the page
loads and shows an image, moving the slider changes the image, the path gallery fills; a screenshot is
kept in test-artifacts/. `make setup` installs chromium and chromium-driver."""
import io
import shutil
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image

import boftvision as bv
from boftvision.data.shapes import WORDS
from boftvision.integrations.diffusers import UNET_PRESETS, pipeline_from_components, tiny_components

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
sys.path.insert(0, str(ROOT / "demos"))


def serve(root: Path, pipe):
    """Save ``pipe`` and a BOFT adapter on its UNet attention under ``root``; start the demo on them."""
    import butterfly_interpolation_app as demo_module

    pipe.save_pretrained(str(root / "model"))
    torch.manual_seed(0)
    bv.add_adapter(pipe.unet, bv.BOFTConfig(block_size=4, n_butterfly_factor=2, init_weights=False,
                                            target_modules=UNET_PRESETS["attention"]))
    bv.save_adapter(pipe.unet, root / "adapter" / "unet")
    demo = demo_module.build(str(root / "model"), str(root / "adapter"))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    demo, url = serve(tmp_path_factory.mktemp("app"), pipeline_from_components(tiny_components(WORDS, seed=0)))
    yield url
    demo.close()


@pytest.fixture
def sdxl_app(tmp_path):
    """The demo on a tiny SDXL pipeline (two text encoders, "text_time" UNet) built from configs."""
    from diffusers import StableDiffusionXLPipeline

    from boftvision.integrations.diffusers.sdxl import tiny_sdxl_components
    from boftvision.integrations.diffusers.tiny import build_clip_tokenizer

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(build_clip_tokenizer(WORDS, 16)))
    demo, url = serve(tmp_path, pipe)
    yield url
    demo.close()


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def image_pixels(src: str) -> np.ndarray:
    with urllib.request.urlopen(src) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"), np.float32)


def test_slider_changes_the_image_in_a_real_browser(app):
    slider_changes_the_image(app, "butterfly_interpolation_app.png")


def slider_changes_the_image(app: str, screenshot: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(app)
        wait = WebDriverWait(driver, 120)
        first = wait.until(lambda d: (d.find_elements(By.CSS_SELECTOR, "#result img") or [None])[0])
        first = first.get_attribute("src")
        stage = lambda: driver.find_element(By.CSS_SELECTOR, "#stage textarea").get_attribute("value")
        wait.until(lambda d: stage() == "fine-tuned")
        slider = driver.find_element(By.CSS_SELECTOR, "#components input[type=range]")
        slider.send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda d: stage().startswith("1/2"))
        second = wait.until(lambda d: (lambda s: s if s != first else None)(
            d.find_element(By.CSS_SELECTOR, "#result img").get_attribute("src")))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".gallery-item, button.thumbnail-item")) >= 4)
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / screenshot))
    finally:
        driver.quit()
    a, b = image_pixels(first), image_pixels(second)
    assert a.shape == b.shape and np.abs(a - b).mean() > 1.0  # a different image, not just a new URL
    assert (ARTIFACTS / screenshot).stat().st_size > 10_000


def test_app_serves_only_its_own_models_and_shows_no_paths(app, monkeypatch):
    """The page offers labels, not paths: /config holds no server path; a model or adapter a visitor
    names that the app was not started with is refused before anything is loaded (no hub request)."""
    import butterfly_interpolation_app as demo_module
    import gradio as gr

    with urllib.request.urlopen(app + "/config") as response:
        config = response.read().decode()
    assert all(path not in config for path in list(demo_module.MODELS.values()) + list(demo_module.ADAPTERS.values()))
    assert "/tmp" not in config and str(ROOT) not in config
    loads = []
    monkeypatch.setattr(demo_module, "load_pipeline", lambda *a, **k: loads.append(a))
    adapter = next(iter(demo_module.ADAPTERS))
    for model in ("stabilityai/stable-diffusion-xl-base-1.0", "/etc", "../model"):
        with pytest.raises(gr.Error, match="pick one from the lists"):
            demo_module.image_at(model, adapter, "a photo", 0, 2, 0)
    assert loads == []


def test_errors_show_as_messages_in_the_page(app):
    """An empty prompt is refused with a message the visitor reads on the page (not an "Error" badge)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(app)
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result img"))
        box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "type a prompt first" in d.page_source)
    finally:
        driver.quit()


def test_slider_changes_the_image_on_sdxl(sdxl_app):
    """Last in the file: the demo module keeps one model list, which this second app replaces."""
    slider_changes_the_image(sdxl_app, "butterfly_interpolation_app_sdxl.png")

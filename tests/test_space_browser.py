"""A real browser on the Space: headless Chromium loads the page, clicks Generate, and the gallery fills.

Needs Debian's `chromium` and `chromium-driver` (the Makefile's set-up installs them) and selenium (dev extra).
Selenium is given both paths, so Selenium Manager never tries to download a browser or driver.
"""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Flags that work on these machines: no sandbox as root, no GPU, and no background traffic to a closed network.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1280,1400",
]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def launched_demo(tmp_path, monkeypatch, load_script):
    from mergevq_hf.defaults import RANDOM_MODEL_NOTICE, build_tiny_random_pipeline

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    app = load_script("space/app.py")
    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    demo = app.build_demo(pipe, notice=RANDOM_MODEL_NOTICE)
    app.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    yield demo
    demo.close()


def test_generate_in_a_real_browser(browser, launched_demo, tmp_path_factory):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(launched_demo.local_url)
    wait = WebDriverWait(browser, 30)
    button = wait.until(lambda d: d.find_element(By.ID, "generate-button"))
    assert "randomly initialised" in browser.find_element(By.ID, "model-notice").text
    empty = _grey(browser.find_element(By.ID, "generate-gallery").screenshot_as_png)
    button.click()

    def gallery_images_loaded(driver):
        images = driver.find_elements(By.CSS_SELECTOR, "#generate-gallery img")
        loaded = [img for img in images if img.get_attribute("src") and driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", img)]
        return loaded if len(loaded) >= 4 else False  # the default request is 4 images

    images = wait.until(gallery_images_loaded)
    assert all("/file=" in img.get_attribute("src") for img in images)

    out_dir = tmp_path_factory.mktemp("screenshots")  # kept by pytest after the run, for a person to look at
    assert browser.save_screenshot(str(out_dir / "space_generate.png"))
    gallery_png = browser.find_element(By.ID, "generate-gallery").screenshot_as_png
    (out_dir / "space_generate_gallery.png").write_bytes(gallery_png)
    print(f"screenshots in {out_dir}")

    # A filled gallery is mostly random-model noise; the empty one was a flat panel with a small icon.
    filled = _grey(gallery_png)
    print(f"gallery pixel std: empty {empty.std():.1f}, filled {filled.std():.1f}")
    assert empty.std() < 30 < filled.std(), "the gallery region of the screenshot does not show images"


def _grey(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)

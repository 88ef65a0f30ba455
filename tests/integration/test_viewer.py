"""The radiologist's viewer, end to end in headless Chromium against a real ``bentoml serve``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium
chromium-driver``); the tests skip with that reason when they are missing. The
server runs without an API key: this is the "auth off" case (``test_service.py``
covers "on"). Screenshots go to pytest's tmp folder, and also to
``$BONEFRAC_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from tests._factories import make_dicom, make_png, make_truncated_jpeg
from tests.integration._server import make_tiny_bundle, running_server

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
)
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "headless Chromium not available: apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("viewer")
    model = make_tiny_bundle(work / "model.pt")
    with running_server(model, work, BONEFRAC_MAX_LATENCY_MS="20000") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except Exception as err:  # a broken browser install is an environment problem, not a test failure
        pytest.skip(f"cannot start headless Chromium: {err}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _shot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    if out := os.environ.get("BONEFRAC_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)
    assert path.stat().st_size > 10_000  # a real rendered page, not a blank one
    return path


def _upload(driver, path: Path) -> None:
    driver.find_element(By.ID, "file-input").send_keys(str(path))


def test_viewer_shows_prediction_overlay_and_decisions(server, browser, tmp_path):
    img = make_png(tmp_path / "wrist.png", size=(400, 300), seed=3)
    with httpx.Client(base_url=server.url, timeout=60) as c:  # auth off: no key needed
        api = c.post("/predict", files={"file": ("wrist.png", img.read_bytes())}).json()
    browser.get(server.url + "/")
    assert "bonefrac" in browser.title
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "version t0" in d.find_element(By.ID, "model-info").text)
    _upload(browser, img)
    wait.until(EC.visibility_of_element_located((By.ID, "result")))
    # The probability shown is the service's, as a percentage with one decimal.
    shown = browser.find_element(By.ID, "probability").text
    assert shown == f"{100 * api['probability']:.1f} %"
    items = browser.find_elements(By.CSS_SELECTOR, "#decisions li")
    assert len(items) == 2
    texts = {li.get_attribute("data-op"): li.text for li in items}
    for op, label in (("high_sensitivity", "(high-sensitivity)"), ("high_specificity", "(high-specificity)")):
        expected = "Fracture suspected" if api["decisions"][op] else "No fracture detected"
        assert expected in texts[op] and label in texts[op]
    # The overlay is on screen: base image and heatmap loaded, same displayed size.
    base = browser.find_element(By.ID, "base-image")
    heat = browser.find_element(By.ID, "heatmap")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", base) == 300
    assert heat.is_displayed() and heat.size == base.size and base.size["height"] >= 300
    assert "t0" in browser.find_element(By.ID, "details").text
    assert "transverse" in browser.find_element(By.ID, "types").text
    _shot(browser, tmp_path, "viewer-result")
    # Toggle and opacity change the heatmap layer.
    browser.find_element(By.ID, "heat-toggle").click()
    assert not heat.is_displayed()
    browser.find_element(By.ID, "heat-toggle").click()
    browser.execute_script(
        "const s=document.getElementById('heat-opacity'); s.value=20;s.dispatchEvent(new Event('input'));"
    )
    WebDriverWait(browser, 5).until(lambda d: abs(float(heat.value_of_css_property("opacity")) - 0.2) < 0.01)


def test_viewer_accepts_dicom_and_explains_bad_files(server, browser, tmp_path):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    _upload(browser, make_dicom(tmp_path / "study.dcm"))
    wait.until(EC.visibility_of_element_located((By.ID, "result")))
    assert "DICOM" in browser.find_element(By.ID, "details").text
    _upload(browser, make_truncated_jpeg(tmp_path / "broken.jpg"))
    err = wait.until(EC.visibility_of_element_located((By.ID, "error")))
    assert "truncated JPEG" in err.text and "HTTP 422" in err.text
    assert not browser.find_element(By.ID, "result").is_displayed()  # no stale result next to an error
    _shot(browser, tmp_path, "viewer-error")

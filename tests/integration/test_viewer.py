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
    # The browser tests are part of the product: a missing browser fails, never skips silently.
    pytest.fail("headless Chromium not available: apt-get install -y chromium chromium-driver", pytrace=False)
from selenium import webdriver  # noqa: E402  (in requirements.lock: missing is an error)
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
    except Exception as err:  # a broken browser install fails the suite: the viewer is part of the product
        pytest.fail(f"cannot start headless Chromium: {err}", pytrace=False)
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


def _canvas_digest(driver) -> tuple[float, float]:
    """(mean, spread) of the viewer canvas pixels: changes whenever what is drawn changes."""
    return tuple(
        driver.execute_script(
            """const c=document.getElementById('view-canvas');
            const d=c.getContext('2d').getImageData(0,0,c.width,c.height).data;
            let s=0,s2=0,n=0;for(let i=0;i<d.length;i+=4){const v=(d[i]+d[i+1]+d[i+2])/3;s+=v;s2+=v*v;n++;}
            const m=s/n;return [m, Math.sqrt(Math.max(0,s2/n-m*m))];"""
        )
    )


def _wait_drawn(driver, timeout: float = 60) -> None:
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return window.bonefracViewer && window.bonefracViewer.view.loaded")
    )


def test_viewer_shows_prediction_overlay_and_decisions(server, browser, tmp_path):
    img = make_png(tmp_path / "wrist.png", size=(400, 300), seed=3)
    with httpx.Client(base_url=server.url, timeout=60) as c:  # auth off: no key needed
        api = c.post("/predict", files={"file": ("wrist.png", img.read_bytes())}).json()
    browser.get(server.url + "/")
    assert "bonefrac" in browser.title
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "version t0" in d.find_element(By.ID, "model-info").text)
    assert "Model model" not in browser.find_element(By.ID, "model-info").text
    # The favicon is inline: no request, no 404.
    assert browser.find_element(By.CSS_SELECTOR, "link[rel=icon]").get_attribute("href").startswith("data:")
    _upload(browser, img)
    wait.until(EC.visibility_of_element_located((By.ID, "result")))
    _wait_drawn(browser)
    # The probability shown is the service's, as a percentage with one decimal.
    shown = browser.find_element(By.ID, "probability").text
    assert shown == f"{100 * api['probability']:.1f} %"
    items = browser.find_elements(By.CSS_SELECTOR, "#decisions li")
    assert len(items) == 2
    texts = {li.get_attribute("data-op"): li.text for li in items}
    for op, label in (("high_sensitivity", "(high-sensitivity)"), ("high_specificity", "(high-specificity)")):
        expected = "Fracture suspected" if api["decisions"][op] else "No fracture detected"
        assert expected in texts[op] and label in texts[op]
    # The image is read at the resolution the service sent (300 x 400 here), on a canvas.
    base = browser.find_element(By.ID, "base-image")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", base) == 300
    view = browser.execute_script("const v=window.bonefracViewer.view; return [v.w, v.h, v.contours.length]")
    assert view[:2] == [300, 400] and view[2] > 0  # the evidence outline exists
    assert "full resolution" in browser.find_element(By.ID, "res-note").text
    assert "t0" in browser.find_element(By.ID, "details").text
    # Trust context is on screen: the model and what is (not) known about its performance.
    trust = browser.find_element(By.ID, "trust").text
    assert "bonefrac-test" in trust and "version t0" in trust and "AUROC 0.500" in trust
    _shot(browser, tmp_path, "viewer-result")
    # Toggle and opacity change the heatmap layer, i.e. the drawn pixels.
    with_heat = _canvas_digest(browser)
    browser.find_element(By.ID, "heat-toggle").click()
    browser.execute_script("window.bonefracViewer.redraw()")
    assert _canvas_digest(browser) != with_heat
    browser.find_element(By.ID, "heat-toggle").click()
    browser.execute_script(
        "const s=document.getElementById('heat-opacity'); s.value=20;s.dispatchEvent(new Event('input'));"
    )
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "stage").get_attribute("data-opacity") == "0.2")


def test_viewer_keyboard_only_upload_is_announced(server, browser, tmp_path):
    """Tab reaches the upload control (not display:none); the result is read out by a live region."""
    img = make_png(tmp_path / "kbd.png", size=(200, 260), seed=5)
    browser.get(server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: "version" in d.find_element(By.ID, "model-info").text)
    from selenium.webdriver.common.keys import Keys

    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    focused = browser.switch_to.active_element
    for _ in range(10):
        if focused.get_attribute("id") == "file-input":
            break
        focused.send_keys(Keys.TAB)
        focused = browser.switch_to.active_element
    assert focused.get_attribute("id") == "file-input", "the upload control is not reachable with Tab"
    assert browser.execute_script(
        "const r=document.getElementById('dropzone'); return getComputedStyle(r).outlineStyle"
    ) != "none"  # the focus is visible on the drop zone
    _shot(browser, tmp_path, "viewer-focus")
    focused.send_keys(str(img))  # what the OS file dialog does once chosen with the keyboard
    live = browser.find_element(By.ID, "announce")
    assert live.get_attribute("aria-live") == "polite"
    WebDriverWait(browser, 60).until(lambda d: "complete" in (live.get_attribute("textContent") or ""))
    text = live.get_attribute("textContent")
    assert "Fracture probability" in text and "high-sensitivity" in text and "kbd.png" in text


def test_viewer_zoom_and_window_level_change_pixels(server, browser, tmp_path):
    img = make_png(tmp_path / "zoom.png", size=(320, 240), seed=7)
    browser.get(server.url + "/")
    _upload(browser, img)
    _wait_drawn(browser)
    stage = browser.find_element(By.ID, "stage")
    browser.find_element(By.ID, "heat-toggle").click()  # judge the image itself
    browser.find_element(By.ID, "contour-toggle").click()
    browser.execute_script("window.bonefracViewer.redraw()")
    fit_scale = float(stage.get_attribute("data-scale"))
    before = _canvas_digest(browser)
    # Keyboard zoom (+) then wheel zoom at a point: scale grows, pixels change.
    stage.click()
    stage.send_keys("+")
    browser.execute_script(
        "const s=document.getElementById('stage'),r=s.getBoundingClientRect();"
        "s.dispatchEvent(new WheelEvent('wheel',{deltaY:-400,clientX:r.left+r.width/2,"
        "clientY:r.top+r.height/3,bubbles:true,cancelable:true}));"
    )
    browser.execute_script("window.bonefracViewer.redraw()")
    zoomed = _canvas_digest(browser)
    assert float(stage.get_attribute("data-scale")) > 1.5 * fit_scale
    assert zoomed != before
    _shot(browser, tmp_path, "viewer-zoomed")
    # Shift-drag changes window and level: the rendered pixels change, not just a number.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    (
        ActionChains(browser)
        .move_to_element(stage)
        .key_down(Keys.SHIFT)
        .click_and_hold()
        .move_by_offset(-150, -60)
        .release()
        .key_up(Keys.SHIFT)
        .perform()
    )
    browser.execute_script("window.bonefracViewer.redraw()")
    default = browser.execute_script("const w=window.bonefracViewer.view.defaultWindow; return [w.w, w.l]")
    # Left narrows the window, up raises the level (one screen px = 1/256 of the Auto window).
    assert float(stage.get_attribute("data-window")) < default[0] - 50
    assert float(stage.get_attribute("data-level")) > default[1] + 20
    windowed = _canvas_digest(browser)
    assert windowed != zoomed
    _shot(browser, tmp_path, "viewer-window-level")
    # A preset and the reset key. The click goes through the DOM (a synthetic pointer click can land
    # while the drag's pointer release is still being handled), and the attribute is awaited.
    # (An 8-bit PNG: preset 2 is its full stored range, 0-255.)
    preset = browser.find_element(By.CSS_SELECTOR, "#wl-presets button[data-key='2']")
    assert preset.text.startswith("Full range")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", preset)
    WebDriverWait(browser, 10).until(lambda _: stage.get_attribute("data-window") == "255")
    stage.send_keys("0")
    browser.execute_script("window.bonefracViewer.redraw()")
    assert abs(float(stage.get_attribute("data-scale")) - fit_scale) < 1e-3
    assert stage.get_attribute("data-window") == str(round(default[0]))
    assert _canvas_digest(browser) == before


def test_viewer_caveats_fracture_types_by_macro_f1(server, browser, tmp_path):
    img = make_png(tmp_path / "types.png", size=(200, 200), seed=9)
    browser.get(server.url + "/")
    _upload(browser, img)
    _wait_drawn(browser)
    # The test bundle records no type macro-F1: the types are caveated and folded away.
    caveat = browser.find_element(By.ID, "types-caveat")
    assert caveat.is_displayed() and "Types unreliable" in caveat.text and "not reported" in caveat.text
    assert not browser.find_element(By.ID, "types").is_displayed()
    # A model whose type macro-F1 is 0.31: still caveated, with the number.
    meta = httpx.get(server.url + "/metadata", timeout=30).json()
    meta["metrics"] = {**meta["metrics"], "type_macro_f1": 0.31, "high_sensitivity.sensitivity": 0.93,
                       "high_sensitivity.sensitivity_ci_low": 0.88, "high_sensitivity.sensitivity_ci_high": 0.97}
    browser.execute_script("window.bonefracViewer.applyMetadata(arguments[0])", meta)
    assert "macro-F1 0.31" in caveat.text
    perf = browser.find_element(By.ID, "perf")
    assert perf.is_displayed() and "93.0 % (88 %–97 %)" in perf.text
    browser.execute_script("document.getElementById('types-card').scrollIntoView()")
    _shot(browser, tmp_path, "viewer-types-caveat")
    # A good one (0.72): bars shown openly, no caveat.
    meta["metrics"]["type_macro_f1"] = 0.72
    browser.execute_script("window.bonefracViewer.applyMetadata(arguments[0])", meta)
    assert not caveat.is_displayed()
    assert "transverse" in browser.find_element(By.ID, "types").text


def test_viewer_accepts_dicom_and_explains_bad_files(server, browser, tmp_path):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    _upload(browser, make_dicom(tmp_path / "study.dcm"))
    wait.until(EC.visibility_of_element_located((By.ID, "result")))
    _wait_drawn(browser)
    assert "DICOM" in browser.find_element(By.ID, "details").text
    _upload(browser, make_truncated_jpeg(tmp_path / "broken.jpg"))
    err = wait.until(EC.visibility_of_element_located((By.ID, "error")))
    assert "truncated JPEG" in err.text and "HTTP 422" in err.text
    assert not browser.find_element(By.ID, "result").is_displayed()  # no stale result next to an error
    _shot(browser, tmp_path, "viewer-error")


def test_viewer_shows_the_services_ood_warning(server, browser, tmp_path):
    """The contract for the service's per-image OOD signal (bonefrac.monitoring.ood's JSON under "ood").

    The response is extended in the page to check the viewer's side for a warning from both checks
    (the service's own answer is tested in test_service.py): a warning above the image naming the
    checks that fired, announced first.
    """
    img = make_png(tmp_path / "odd.png", size=(240, 240), seed=11)
    browser.get(server.url + "/")
    browser.execute_script(
        """const f = window.fetch;
        window.fetch = async (u, o) => {
          const r = await f(u, o);
          if (!String(u).includes('/explain') || !r.ok) return r;
          const b = await r.json();
          b.ood = {flag: true, score: 3.2, threshold: 1.0, group: 'image', fired: ['image', 'embedding'],
                   reason: 'image statistics unlike the training images (log10_pixels +50.0 SD); ' +
                    "the model's internal features (embedding) unlike the training images (emb_residual +4 SD)"};
          return new Response(JSON.stringify(b), {status: 200, headers: {'Content-Type': 'application/json'}});
        };"""
    )
    _upload(browser, img)
    _wait_drawn(browser)
    box = browser.find_element(By.ID, "ood")
    assert box.is_displayed() and "Unusual image for this model" in box.text and "score 3.20" in box.text
    # which check fired is on screen: image statistics, the model's embedding, or both
    assert "(image statistics and the model's internal features)" in box.text
    live = browser.find_element(By.ID, "announce")
    WebDriverWait(browser, 30).until(lambda d: "complete" in (live.get_attribute("textContent") or ""))
    assert live.get_attribute("textContent").startswith("Warning: unusual image")
    _shot(browser, tmp_path, "viewer-ood")


def _base_row(driver, y: int, xs: list[int]) -> list[int]:
    """Gray values the viewer rendered (W/L applied, before zoom) at image pixels ``(x, y)``."""
    return driver.execute_script(
        "const v=window.bonefracViewer.view, d=v.baseCanvas.getContext('2d').getImageData(0,arguments[0],v.w,1).data;"
        "return arguments[1].map((x) => d[4*x]);",
        y,
        xs,
    )


def _click_preset(driver, name: str) -> None:
    button = next(b for b in driver.find_elements(By.CSS_SELECTOR, "#wl-presets button") if b.text.startswith(name))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", button)


def test_window_level_on_a_12bit_dicom_follows_its_window(server, browser, tmp_path):
    """The DICOM's VOI window is the default; other windows reach values the VOI window clipped."""
    import numpy as np

    w = 400
    ramp = np.round(np.arange(w) / (w - 1) * 4095)  # stored value of column x
    arr = np.tile(ramp, (96, 1)).astype(np.uint16)
    img = make_dicom(tmp_path / "ramp.dcm", arr, bits_stored=12, window=(1000.0, 800.0))
    browser.get(server.url + "/")
    _upload(browser, img)
    _wait_drawn(browser)
    stage = browser.find_element(By.ID, "stage")
    assert stage.get_attribute("data-pixels") == "400x96"
    assert (stage.get_attribute("data-window"), stage.get_attribute("data-level")) == ("800", "1000")
    assert browser.find_element(By.CSS_SELECTOR, "#wl-presets button[aria-pressed='true']").text.startswith("DICOM")
    xs = list(range(0, w, 7))

    def expected(centre: float, width: float) -> list[int]:
        return [int(np.clip(np.round((ramp[x] - (centre - width / 2)) / width * 255), 0, 255)) for x in xs]

    got = _base_row(browser, 50, xs)
    assert max(abs(a - b) for a, b in zip(got, expected(1000, 800), strict=True)) <= 1
    assert got[-1] == 255 and got[0] == 0  # outside the window: clipped on screen, not in the data
    before = _canvas_digest(browser)
    _click_preset(browser, "Full range")  # 0-4095: the values above 1400 come back
    WebDriverWait(browser, 10).until(lambda _: stage.get_attribute("data-window") == "4095")
    got = _base_row(browser, 50, xs)
    assert max(abs(a - b) for a, b in zip(got, expected(4095 / 2, 4095), strict=True)) <= 1
    assert len({g for g, x in zip(got, xs, strict=True) if ramp[x] > 1400}) > 20  # distinct grays, not one white
    browser.execute_script("window.bonefracViewer.redraw()")
    assert _canvas_digest(browser) != before
    browser.execute_script("window.bonefracViewer.setWindow(300, 3000)")  # a narrow window high up
    got = _base_row(browser, 50, xs)
    assert max(abs(a - b) for a, b in zip(got, expected(3000, 300), strict=True)) <= 1
    _shot(browser, tmp_path, "viewer-dicom-window")


def test_zoom_shows_the_native_pixels_of_a_2304x2880_radiograph(server, browser, tmp_path):
    """Not a 1024-px copy: at 8x, one image pixel is an 8x8 block and a 1-px checkerboard stays one."""
    import numpy as np
    from PIL import Image

    h, w = 2880, 2304
    yy, xx = np.mgrid[0:h, 0:w]
    arr = (30 + 120 * (xx + yy) / (h + w)).astype(np.uint8)
    y0, x0 = 1500, 1000
    arr[y0 : y0 + 32, x0 : x0 + 32] = np.where((yy[:32, :32] + xx[:32, :32]) % 2 == 0, 40, 220)
    path = tmp_path / "large.png"
    Image.fromarray(arr).save(path)
    browser.get(server.url + "/")
    _upload(browser, path)
    _wait_drawn(browser, timeout=120)
    stage = browser.find_element(By.ID, "stage")
    assert stage.get_attribute("data-pixels") == "2304x2880"
    assert "full resolution (2304×2880" in browser.find_element(By.ID, "res-note").text
    browser.find_element(By.ID, "heat-toggle").click()
    browser.find_element(By.ID, "contour-toggle").click()
    # Wheel-zoom at the checkerboard until 8 screen px per image px (the point under the cursor stays put).
    cx, cy = x0 + 16, y0 + 16
    for _ in range(12):
        if float(stage.get_attribute("data-scale")) >= 8:
            break
        browser.execute_script(
            """const v=window.bonefracViewer.view, s=document.getElementById('stage'), r=s.getBoundingClientRect();
            s.dispatchEvent(new WheelEvent('wheel',{deltaY:-400,clientX:r.left+v.tx+v.scale*arguments[0],
              clientY:r.top+v.ty+v.scale*arguments[1],bubbles:true,cancelable:true}));
            window.bonefracViewer.redraw();""",
            cx,
            cy,
        )
    scale, tx, ty, win, lev, dpr = browser.execute_script(
        "const v=window.bonefracViewer.view; return [v.scale, v.tx, v.ty, v.win, v.lev, window.devicePixelRatio||1]"
    )
    assert scale >= 8
    _shot(browser, tmp_path, "viewer-native-pixels")

    def screen(x: int, y: int) -> int:  # the on-screen canvas at the centre of image pixel (x, y)
        return browser.execute_script(
            "return document.getElementById('view-canvas').getContext('2d')"
            ".getImageData(Math.floor(arguments[0]), Math.floor(arguments[1]), 1, 1).data[0]",
            dpr * (tx + scale * (x + 0.5)),
            dpr * (ty + scale * (y + 0.5)),
        )

    def windowed(v: int) -> int:
        return int(np.clip(np.round((v - (lev - win / 2)) / win * 255), 0, 255))

    for dy, dx in ((10, 10), (10, 11), (11, 11), (12, 13), (20, 17)):
        x, y = cx + dx - 16, cy + dy - 16
        assert abs(screen(x, y) - windowed(int(arr[y, x]))) <= 2, (x, y)
    assert abs(screen(cx, cy) - screen(cx + 1, cy)) > 100  # neighbours stay apart: native pixels, no blur

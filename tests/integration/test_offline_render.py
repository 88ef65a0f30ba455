"""What people open must render with the network off: report, model card, Data Docs, DVC plots.

Each page is opened from disk in headless Chromium with network emulation set to offline;
the DevTools log must show no failed request and nothing fetched from anything but
``file:`` or ``data:``, and the page must not be blank. Screenshots go to pytest's tmp
folder and to ``$BONEFRAC_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

# The evaluation fixtures of the report tests: one small real evaluation run.
from tests.unit.test_report import _registry_knows_blobnet, evaluated, workspace  # noqa: F401

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    # The browser tests are part of the product: a missing browser fails, never skips silently.
    pytest.fail("headless Chromium not available: apt-get install -y chromium chromium-driver", pytrace=False)
from selenium import webdriver  # noqa: E402  (in requirements.lock: missing is an error)


@pytest.fixture(scope="module")
def offline_browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for f in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except Exception as err:  # a broken browser install is an environment problem
        pytest.fail(f"cannot start headless Chromium: {err}", pytrace=False)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0},
    )
    yield driver
    driver.quit()


def _open_offline(driver, page: Path, tmp_path: Path, name: str) -> str:
    driver.get_log("performance")  # drop earlier events
    driver.get(page.resolve().as_uri())
    driver.execute_script("return document.readyState")
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    by_id = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in events
             if e["method"] == "Network.requestWillBeSent"}
    failed = [(by_id.get(e["params"]["requestId"]), e["params"]["errorText"]) for e in events
              if e["method"] == "Network.loadingFailed"]
    assert not failed, f"{name}: failed requests {failed[:3]}"
    remote = [u for u in urls if not u.startswith(("file:", "data:"))]
    assert not remote, f"{name}: asked the network for {remote[:5]}"
    text = driver.execute_script("return document.body ? document.body.innerText : ''")
    assert len(text.strip()) > 200, f"{name}: blank page"
    shot = tmp_path / f"offline-{name}.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if out := os.environ.get("BONEFRAC_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / shot.name)
    return text


def _dvc_plots_page(plots_dir: Path, out: Path) -> Path:
    """``dvc plots show`` for the evaluate stage's plots, with the template .dvc/config names."""
    from dvc_render import render_html
    from dvc_render.vega import VegaRenderer

    cfg = (ROOT / ".dvc" / "config").read_text()
    assert "html_template = plots/offline.html" in cfg
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    renderers = []
    for entry in stage["plots"]:
        (path, props), = entry.items()
        rows = [{**r, "rev": "workspace"} for r in csv.DictReader((plots_dir / Path(path).name).open())]
        if props.get("template") != "confusion":  # DVC reads numbers from CSV as numbers
            rows = [{**r, props["x"]: float(r[props["x"]]), props["y"]: float(r[props["y"]])} for r in rows]
        renderers.append(VegaRenderer(rows, path, **{k: v for k, v in props.items() if k != "cache"}))
    return Path(render_html(renderers, out, ROOT / ".dvc" / "plots" / "offline.html"))


def test_artefacts_render_offline(evaluated, offline_browser, tmp_path):  # noqa: F811
    import markdown

    driver = offline_browser
    # 1. The evaluation report.
    text = _open_offline(driver, evaluated["reports"] / "report.html", tmp_path, "report")
    assert "Verdict" in text and "targets met" in text
    assert driver.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    # 2. The model card, as a forge would show it (markdown → HTML), next to the model.
    card_md = evaluated["out_model"].parent / "MODEL_CARD.md"
    card_html = card_md.with_suffix(".html")
    card_html.write_text(
        "<!doctype html><meta charset=utf-8><title>Model card</title>"
        + markdown.markdown(card_md.read_text(), extensions=["tables"])
    )
    text = _open_offline(driver, card_html, tmp_path, "model-card")
    assert "Intended use" in text and "Caveats and recommendations" in text
    # 3. Great Expectations Data Docs, as the validate stage writes them.
    import great_expectations as gx
    import pandas as pd

    from bonefrac.validation.expectations import run_suite
    from bonefrac.validation.offline_docs import make_offline

    docs = tmp_path / "data_docs"
    table = pd.DataFrame({"label": [0, 1, 1, 2], "body_part": ["hand", "leg", "hip", "hand"]})
    run_suite(
        table,
        [gx.expectations.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1], meta={"check": "label_values"})],
        docs,
    )
    assert make_offline(docs)
    pages = sorted(docs.rglob("*.html"))
    text = _open_offline(driver, docs / "index.html", tmp_path, "data-docs-index")
    assert "Offline copy" in text and "bonefrac_manifest" in text  # the index's tables, written out statically
    result_page = next(p for p in pages if "validations" in p.parts)
    text = _open_offline(driver, result_page, tmp_path, "data-docs-result")
    assert "label" in text
    # 4. The DVC plots page: every plot drawn by the template's own renderer.
    page = _dvc_plots_page(evaluated["plots"], tmp_path / "dvc_plots" / "index.html")
    text = _open_offline(driver, page, tmp_path, "dvc-plots")
    n_lines = driver.execute_script("return document.querySelectorAll('.plot svg polyline').length")
    n_tables = driver.execute_script("return document.querySelectorAll('.plot table').length")
    assert n_lines >= 3 and n_tables >= 2, (n_lines, n_tables)  # both operating points' confusion tables
    assert "ROC (test)" in text

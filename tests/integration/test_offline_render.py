"""What people open must render with the network off: report, model card, Data Docs, DVC plots.

Each page is opened from disk in headless Chromium with network emulation set to offline;
the DevTools log must show no failed request and nothing fetched from anything but
``file:`` or ``data:``, and the page must not be blank. Screenshots go to pytest's tmp
folder and to ``$BONEFRAC_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

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


def _open_offline(driver, page: Path, tmp_path: Path, name: str, min_text: int = 200) -> str:
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
    assert len(text.strip()) >= min_text, f"{name}: blank page"
    shot = tmp_path / f"offline-{name}.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if out := os.environ.get("BONEFRAC_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / shot.name)
    return text


def _dvc_plots_page(plots_dir: Path, work: Path) -> tuple[Path, list[str]]:
    """The page the real ``dvc plots show`` writes for this project's dvc.yaml and .dvc/config template.

    A scratch DVC project (``dvc init --no-scm``) holding the project's dvc.yaml, its plots template
    and config line, the evaluate stage's plot files of a real (small) evaluation and DVCLive curves
    in DVCLive's layout. Returns the page and the titles of every declared plot.
    """
    import subprocess
    import sys

    cfg = (ROOT / ".dvc" / "config").read_text()
    assert "html_template = plots/offline.html" in cfg
    work.mkdir(parents=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "dvc", *a], cwd=work, env=env, check=True,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    run("init", "--no-scm", "-q")
    (work / ".dvc" / "plots").mkdir()
    shutil.copy(ROOT / ".dvc" / "plots" / "offline.html", work / ".dvc" / "plots" / "offline.html")
    with (work / ".dvc" / "config").open("a") as fh:
        fh.write("[plots]\n    html_template = plots/offline.html\n")
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")  # dvc.yaml interpolates ${data.root}
    for entry in dvc_yaml["stages"]["evaluate"]["plots"]:
        (path, _), = entry.items()
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(plots_dir / Path(path).name, work / path)
    curves = {"train/loss": [1.6, 1.2, 0.9], "val/loss": [1.5, 1.3, 1.1], "val/auroc": [0.7, 0.8, 0.85],
              "val/accuracy": [0.6, 0.7, 0.75], "val/type_macro_f1": [0.1, 0.2, 0.3], "lr": [1e-3, 8e-4, 5e-4]}
    for name, values in curves.items():  # DVCLive's files: <dir>/plots/metrics/<name>.tsv, step + the last part
        f = work / "dvclive" / "plots" / "metrics" / f"{name}.tsv"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("step\t" + name.split("/")[-1] + "\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))
    out = run("plots", "show", "-o", str(work / "dvc_plots"))
    assert "failed" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr  # every declared file read
    titles = [next(iter(e.values()))["title"] for e in dvc_yaml["stages"]["evaluate"]["plots"]]
    titles += [next(iter(e.values()))["title"] for e in dvc_yaml["plots"]]
    return work / "dvc_plots" / "index.html", titles


def _drawn_charts(driver, n: int) -> list[int]:
    """Wait until vega-embed has drawn ``n`` charts; the count of non-white pixels of each canvas."""
    import time

    deadline = time.monotonic() + 30
    while driver.execute_script("return document.querySelectorAll('.vega-embed canvas').length") < n:
        assert time.monotonic() < deadline, "vega-embed did not draw every chart"
        time.sleep(0.2)
    return driver.execute_script(
        """return [...document.querySelectorAll('.vega-embed canvas')].map((c) => {
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let k = 0;
             for (let i = 0; i < d.length; i += 4) if (d[i+3] > 0 && (d[i] < 200 || d[i+1] < 200)) k++;
             return k; });"""
    )


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
    # 4. The page `dvc plots show` writes: vega, vega-lite and vega-embed inlined by the template.
    page, titles = _dvc_plots_page(evaluated["plots"], tmp_path / "dvc_project")
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and "<script src" not in html
    for t in titles:  # every declared plot is on the page, with its title
        assert f'"{t}"' in html or json.dumps(t) in html, t
    text = _open_offline(driver, page, tmp_path, "dvc-plots", min_text=0)  # charts are canvases, not text
    drawn = _drawn_charts(driver, len(titles))
    assert len(drawn) == len(titles) and min(drawn) > 2_000, drawn  # no blank chart: axes, lines, legend
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    late = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert not [u for u in late if not u.startswith(("file:", "data:"))], late[:5]  # nothing asked while drawing
    assert not [e for e in events if e["method"] == "Network.loadingFailed"]
    driver.save_screenshot(str(tmp_path / "offline-dvc-plots.png"))
    if out := os.environ.get("BONEFRAC_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "offline-dvc-plots.png", Path(out) / "offline-dvc-plots.png")

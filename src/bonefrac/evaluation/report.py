"""One self-contained HTML evaluation report per run, and its Prefect artifacts.

Self-contained means the file can be mailed or archived and still opens
offline years later: CSS inline, every figure a base64 data URI, no script
and no link to anything outside the file.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import yaml

from bonefrac.atomic import atomic_write_text
from bonefrac.evaluation.metrics import SUBGROUPS
from bonefrac.evaluation.plots import op_label
from bonefrac.explain.gallery import CATEGORIES, GalleryItem

log = logging.getLogger(__name__)

DEFAULT_LIMITATIONS = (
    "These results are internal: the test images come from the same source as the training images, so "
    "performance at another hospital, on other devices or in another population is unknown until measured "
    "there (use external validation). Subgroups with few images have wide intervals. The model reads one "
    "image at a time, without clinical history or prior studies. Grad-CAM heatmaps are coarse indications of "
    "what raised the score, not fracture segmentations. Research software: not a medical device."
)


def pct(x: float | None, digits: int = 1) -> str:
    """0.951 → '95.1%' ('–' when undefined)."""
    if x is None or not isinstance(x, int | float) or not math.isfinite(x):
        return "–"
    return f"{100 * x:.{digits}f}%"


def num(x: float | None, digits: int = 3) -> str:
    if x is None or not isinstance(x, int | float) or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def summary_text(report: Mapping[str, Any]) -> str:
    """A two-sentence plain-language summary of the headline numbers."""
    t = report["test"]
    level = round(100 * report.get("ci_level", 0.95))
    kind = "external" if report.get("external") else "held-out test"
    parts = [
        f"On {t['n']} {kind} images ({t['n_positive']} fractured, {pct(t['prevalence'])}), the model "
        f"separates fractured from normal images with an AUROC of {num(t['auroc']['value'])} "
        f"({level}% CI {num(t['auroc']['ci_low'])}–{num(t['auroc']['ci_high'])})."
    ]
    ops = t.get("operating_points", {})
    phrases = []
    for name, op in ops.items():
        sens, spec = pct(op["sensitivity"]["value"]), pct(op["specificity"]["value"])
        phrases.append(
            f"at the {op_label(name).lower()} operating point it finds {sens} of fractures "
            f"and clears {spec} of normal images"
        )
    if phrases:
        text = "; ".join(phrases)
        parts.append(text[0].upper() + text[1:] + ".")
    return " ".join(parts)


def _validation_rows(summary: Mapping[str, Any] | None, limit: int = 60) -> list[tuple[str, str]]:
    """Flatten whatever the validate stage wrote into (check, result) rows."""
    if not summary:
        return []
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, v: Any) -> None:
        if len(rows) >= limit:
            return
        if isinstance(v, Mapping):
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            rows.append((prefix, text if len(text) <= 160 else text[:157] + "…"))

    walk("", summary)
    return rows


WEAK_AUROC = 0.7
WEAK_GAP = 0.10  # a subgroup's sensitivity/specificity this far below the overall value is flagged
_OP_METRIC = {"high_sensitivity": "sensitivity", "high_specificity": "specificity"}


def _estimate(v: Any) -> tuple[float | None, float | None, float | None]:
    if isinstance(v, Mapping):
        return v.get("value"), v.get("ci_low"), v.get("ci_high")
    return (v if isinstance(v, int | float) else None), None, None


def target_verdicts(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target of the run → met / missed and by how much, first thing in the report.

    Operating-point targets (``targets.high_sensitivity`` = minimum sensitivity at that
    point, ``targets.high_specificity`` = minimum specificity at that one) are judged on the
    test split; ``auroc`` (minimum) and ``ece`` (maximum) when the targets have them.
    A target met by the point estimate but not by the interval's bound is flagged.
    """
    t = report["test"]
    targets = report.get("targets") or {}
    ops = t.get("operating_points") or {}
    out: list[dict[str, Any]] = []

    def add(label: str, value: Any, target: float, higher: bool, as_pct: bool) -> None:
        v, lo, hi = _estimate(value)
        fmt = pct if as_pct else num
        if v is None or not math.isfinite(v):
            out.append({"label": label, "target": fmt(target), "value": "–", "ci": "", "status": "unknown",
                        "met": False, "by": "not measurable on this split"})
            return
        met = v >= target if higher else v <= target
        bound = lo if higher else hi
        sure = bound is not None and (bound >= target if higher else bound <= target)
        diff = (v - target) if higher else (target - v)
        by = (f"{100 * abs(diff):.1f} points" if as_pct else f"{abs(diff):.3f}") + (" above" if diff >= 0 else " below")
        if not higher:
            by = by.replace("above", "under the limit").replace("below", "over the limit")
        status = "met" if met and sure else ("met (interval crosses the target)" if met else "missed")
        ci = f"{fmt(lo)}–{fmt(hi)}" if lo is not None and hi is not None else ""
        out.append({"label": label, "target": ("≥ " if higher else "≤ ") + fmt(target), "value": fmt(v), "ci": ci,
                    "status": status, "met": met, "by": by})

    for name, metric in _OP_METRIC.items():
        if name in targets and name in ops:
            add(f"{metric.capitalize()} at the {op_label(name).lower()} point", ops[name][metric],
                float(targets[name]), True, True)
    for key, label, higher in (("auroc", "AUROC", True), ("ece", "Calibration error (ECE)", False)):
        tk = next((k for k in (key, f"{key}_min", f"{key}_max") if k in targets), None)
        if tk is not None and key in t:
            add(label, t[key], float(targets[tk]), higher, False)
    return out


def weak_subgroups(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Subgroups (:data:`~bonefrac.evaluation.metrics.SUBGROUPS`) with AUROC < 0.7, or
    sensitivity/specificity far below the overall value."""
    t = report["test"]
    overall = {
        name: (op or {}).get(metric, {}).get("value")
        for name, op in (t.get("operating_points") or {}).items()
        for metric in (_OP_METRIC.get(name),)
        if metric
    }
    flagged = []
    for sg in SUBGROUPS:
        for g, m in (report.get(sg.key) or {}).items():
            reasons = []
            au = (m.get("auroc") or {}).get("value")
            if isinstance(au, int | float) and au < WEAK_AUROC:
                reasons.append(f"AUROC {num(au)} < {WEAK_AUROC}")
            for name, ref in overall.items():
                metric = _OP_METRIC[name]
                v = ((m.get("operating_points") or {}).get(name) or {}).get(metric, {}).get("value")
                if isinstance(v, int | float) and isinstance(ref, int | float) and v < ref - WEAK_GAP:
                    reasons.append(f"{metric} {pct(v)} at the {op_label(name).lower()} point vs {pct(ref)} overall")
            if reasons:
                flagged.append({"group": f"{sg.label} = {g}", "n": m.get("n"), "n_positive": m.get("n_positive"),
                                "reasons": reasons})
    return flagged


def validation_table(
    summary: Mapping[str, Any] | None, params: Mapping[str, Any] | None = None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(checks, facts): one row per data check (failed first) and the remaining summary facts."""
    if not summary:
        return [], []
    sev = ((params or {}).get("validation") or {}).get("severities") or {}
    checks: dict[str, dict[str, Any]] = {}
    facts: dict[str, Any] = {}
    for k, v in summary.items():
        for suffix in ("_success", "_failures", "_errors", "_skipped"):
            if k.endswith(suffix) and k not in ("checks_failed",):
                name = k[: -len(suffix)]
                row = checks.setdefault(name, {"check": name, "success": None, "failures": 0, "errors": 0,
                                               "skipped": False, "severity": sev.get(name, "–")})
                row[suffix[1:]] = v
                break
        else:
            facts[k] = v
    rows = sorted(checks.values(), key=lambda r: (r["success"] is not False and not r["skipped"], r["check"]))
    return rows, _validation_rows(facts)


def _env() -> jinja2.Environment:
    loader = jinja2.FunctionLoader(
        lambda name: resources.files("bonefrac.evaluation").joinpath("templates", name).read_text("utf-8")
    )
    return jinja2.Environment(
        loader=loader,
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report_html(
    report: Mapping[str, Any],
    figures: Mapping[str, bytes],
    gallery: Sequence[GalleryItem] = (),
    gallery_note: str | None = None,
) -> str:
    """Render ``templates/report.html.j2`` with every figure embedded as a data URI.

    ``gallery_note`` replaces the Grad-CAM gallery with a sentence (a published
    report that must not carry the patients' images).
    """

    def img(name: str) -> str:
        if name not in figures:
            return ""
        return data_uri(figures[name])

    tpl = _env().get_template("report.html.j2")
    return tpl.render(
        r=report,
        gallery=list(gallery),
        gallery_note=gallery_note,
        categories=CATEGORIES,
        validation_rows=validation_table(report.get("validation_summary"), report.get("params"))[1],
        validation_checks=validation_table(report.get("validation_summary"), report.get("params"))[0],
        verdicts=target_verdicts(report),
        weak=weak_subgroups(report),
        params_text=yaml.safe_dump(report.get("params") or {}, sort_keys=False) or "(none given)",
        img=img,
        has_img=lambda name: name in figures,
        b64=data_uri,
        pct=pct,
        num=num,
        op_label=op_label,
        subgroups=SUBGROUPS,
        any_subgroup=any(report.get(g.key) for g in SUBGROUPS),
        figure_names=list(figures),
    )


PUBLISHED_GALLERY_NOTE = (
    "The Grad-CAM gallery is left out of this published copy: it would carry the dataset's "
    "images. The full report of the run (reports/evaluation/report.html) has it."
)


def publish_report(report_dir: Path, out_html: Path) -> Path:
    """A shareable copy of a run's report: every number and plot, no image of a patient.

    Reads ``report.json`` and the plot PNGs an evaluation wrote to ``report_dir``
    (the ``gradcam/`` tiles are not read) and writes one self-contained HTML
    file. Used for the FracAtlas report linked from the README, whose images
    must stay outside the repository.
    """
    report_dir = Path(report_dir)
    path = report_dir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no report.json in {report_dir}: run the evaluate stage first")
    report = json.loads(path.read_text())
    figures = {png.stem: png.read_bytes() for png in sorted(report_dir.glob("*.png"))}
    return atomic_write_text(Path(out_html), render_report_html(report, figures, (), PUBLISHED_GALLERY_NOTE))


# ------------------------------------------------------------------ Prefect
def headline_markdown(report: Mapping[str, Any]) -> str:
    """The headline numbers as markdown (Prefect artifact, model card)."""
    t = report["test"]
    level = round(100 * report.get("ci_level", 0.95))
    lines = [
        f"## {report.get('title', 'Evaluation')}",
        "",
        summary_text(report),
        "",
        f"| Metric (test, n={t['n']}) | Value | {level}% CI |",
        "|---|---|---|",
        f"| AUROC | {num(t['auroc']['value'])} | {num(t['auroc']['ci_low'])}–{num(t['auroc']['ci_high'])} |",
        f"| AUPRC | {num(t['auprc']['value'])} | {num(t['auprc']['ci_low'])}–{num(t['auprc']['ci_high'])} |",
    ]
    for name, op in t["operating_points"].items():
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            e = op[key]
            lines.append(
                f"| {op_label(name)} (t={op['threshold']:.3f}): {key.upper() if len(key) == 3 else key} "
                f"| {pct(e['value'])} | {pct(e['ci_low'])}–{pct(e['ci_high'])} |"
            )
    cal = report.get("calibration", {})
    if cal:
        lines.append(
            f"| ECE (after / before calibration, {cal['label']}) | {num(t['ece'])} "
            f"| before: {num(cal['test']['ece_before'])} |"
        )
    lines.append(f"| Brier score | {num(t['brier'], 4)} | |")
    return "\n".join(lines) + "\n"


def subgroup_table(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: one per body part / view."""
    rows = []
    for sg in SUBGROUPS:
        for g, m in (report.get(sg.key) or {}).items():
            row: dict[str, Any] = {"group": f"{sg.column}={g}", "n": m["n"], "fractured": m["n_positive"]}
            if "auroc" in m:
                row["auroc"] = round(m["auroc"]["value"], 4)
                for name, op in m["operating_points"].items():
                    row[f"sens_{name}"] = round(op["sensitivity"]["value"], 4)
                    row[f"spec_{name}"] = round(op["specificity"]["value"], 4)
            rows.append(row)
    return rows


def publish_prefect_artifacts(
    report: Mapping[str, Any], key_prefix: str = "bonefrac-evaluation"
) -> list[str]:
    """Publish the headline (markdown) and subgroup results (table) as Prefect artifacts.

    Only does something inside a Prefect flow or task run (returns ``[]``
    otherwise), so library callers and tests can call it unconditionally.
    Returns the artifact ids.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        log.info("not inside a Prefect run: evaluation artifacts not published")
        return []
    def _rounded(value: Any) -> Any:
        # A metric can be undefined on a small test split (e.g. PPV with no positive calls): keep None.
        return round(value, 4) if isinstance(value, (int, float)) else value

    ids = [
        str(
            create_markdown_artifact(
                markdown=headline_markdown(report),
                key=key_prefix,
                description="Fracture detection: test-split headline metrics",
            )
        )
    ]
    ops = [
        {
            "operating_point": name,
            **{k: (_rounded(v.get("value")) if isinstance(v, Mapping) else v) for k, v in op.items()},
        }
        for name, op in report["test"]["operating_points"].items()
    ]
    ids.append(
        str(
            create_table_artifact(
                table=ops,
                key=f"{key_prefix}-operating-points",
                description="Operating points (thresholds chosen on validation)",
            )
        )
    )
    rows = subgroup_table(report)
    if rows:
        ids.append(
            str(
                create_table_artifact(
                    table=rows, key=f"{key_prefix}-subgroups", description="Per body part / view"
                )
            )
        )
    return ids

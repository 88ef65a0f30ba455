"""The model card (Mitchell et al. 2019), written with every evaluated model.

Markdown, next to the model, so it travels with it in git/DVC and renders on
any forge: intended use, data, metrics with confidence intervals, operating
points and limitations, all filled in from the evaluation report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bonefrac.atomic import atomic_write_text
from bonefrac.evaluation.metrics import SUBGROUPS
from bonefrac.evaluation.plots import op_label
from bonefrac.evaluation.report import _env, num, pct, target_verdicts, weak_subgroups


def render_model_card(report: Mapping[str, Any], report_path: str = "reports/evaluation/report.html") -> str:
    env = _env()
    env.autoescape = False  # markdown, not HTML
    return env.get_template("model_card.md.j2").render(
        r=report,
        report_path=report_path,
        pct=pct,
        num=num,
        op_label=op_label,
        verdicts=target_verdicts(report),
        weak=weak_subgroups(report),
        subgroups=SUBGROUPS,
        any_subgroup=any(report.get(g.key) for g in SUBGROUPS),
    )


def write_model_card(
    path: Path, report: Mapping[str, Any], report_path: str = "reports/evaluation/report.html"
) -> Path:
    """Render the model card for ``report`` (the dict ``run_evaluation`` returns) to ``path`` atomically."""
    return atomic_write_text(Path(path), render_model_card(report, report_path))

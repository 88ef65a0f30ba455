"""Evaluation plots, twice: CSV data for ``dvc plots`` and PNG files for people.

DVC renders its plots from the CSVs (``roc.csv``: fpr,tpr; ``pr.csv``:
recall,precision; ``reliability.csv``; ``confusion.csv``: actual,predicted rows
for DVC's confusion template). The PNGs (matplotlib, Agg backend: no display
needed) go into the HTML report and ``reports/evaluation/``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from bonefrac.atomic import atomic_write_bytes
from bonefrac.evaluation.calibration import reliability_curve
from bonefrac.model.calibrate import decide

# One palette for every figure: operating points keep their colour across plots.
COLORS = {
    "model": "#1f4e79",
    "before": "#c0504d",
    "after": "#1f4e79",
    "high_sensitivity": "#e07b00",
    "high_specificity": "#2e8b57",
    "ideal": "#9a9a9a",
}
OP_LABELS = {"high_sensitivity": "High sensitivity", "high_specificity": "High specificity"}
DPI = 120


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """Atomic CSV write."""
    return atomic_write_bytes(Path(path), df.to_csv(index=False).encode())


def _fig_png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


def _style(ax: plt.Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def op_label(name: str) -> str:
    return OP_LABELS.get(name, name.replace("_", " ").capitalize())


# ------------------------------------------------------------------ DVC data
def write_dvc_plot_data(
    plots_dir: Path,
    labels: np.ndarray,
    probs: np.ndarray,
    raw_probs: np.ndarray,
    thresholds: Mapping[str, float],
    n_bins: int,
    confusion_op: str = "high_sensitivity",
) -> dict[str, Path]:
    """``roc.csv``, ``pr.csv``, ``reliability.csv`` and one ``confusion[_<op>].csv`` per operating point."""
    plots_dir = Path(plots_dir)
    y = np.asarray(labels).astype(int)
    fpr, tpr, thr = roc_curve(y, probs)
    prec, rec, pthr = precision_recall_curve(y, probs)
    rel = pd.concat(
        [
            reliability_curve(raw_probs, y, n_bins).assign(calibration="before"),
            reliability_curve(probs, y, n_bins).assign(calibration="after"),
        ]
    )
    out = {
        "roc": write_csv(
            pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)}), plots_dir / "roc.csv"
        ),
        "pr": write_csv(
            pd.DataFrame({"recall": rec, "precision": prec, "threshold": np.append(pthr, 1.0)}),
            plots_dir / "pr.csv",
        ),
        "reliability": write_csv(rel, plots_dir / "reliability.csv"),
    }
    names = {0: "normal", 1: "fracture"}
    for op, t in thresholds.items():
        d = decide(probs, {"t": t})["t"].astype(int)
        df = pd.DataFrame({"actual": [names[v] for v in y], "predicted": [names[v] for v in d]})
        fname = "confusion.csv" if op == confusion_op else f"confusion_{op}.csv"
        out[f"confusion_{op}"] = write_csv(df, plots_dir / fname)
    return out


# ---------------------------------------------------------------------- PNGs
def roc_png(
    labels: np.ndarray,
    probs: np.ndarray,
    auroc: Mapping[str, float],
    op_points: Mapping[str, Mapping[str, Any]],
) -> bytes:
    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], ls="--", color=COLORS["ideal"], lw=1, label="Chance")
    ax.plot(
        fpr,
        tpr,
        color=COLORS["model"],
        lw=2,
        label=f"AUROC {auroc['value']:.3f} ({auroc['ci_low']:.3f}–{auroc['ci_high']:.3f})",
    )
    for name, op in op_points.items():
        ax.scatter(
            1 - op["specificity"]["value"],
            op["sensitivity"]["value"],
            s=70,
            zorder=3,
            color=COLORS.get(name, "k"),
            edgecolor="white",
            lw=1.5,
            label=f"{op_label(name)} (t={op['threshold']:.2f})",
        )
    _style(
        ax, "ROC curve (test)", "1 − specificity (false-positive rate)", "Sensitivity (true-positive rate)"
    )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return _fig_png(fig)


def pr_png(
    labels: np.ndarray,
    probs: np.ndarray,
    auprc: Mapping[str, float],
    op_points: Mapping[str, Mapping[str, Any]],
) -> bytes:
    prec, rec, _ = precision_recall_curve(labels, probs)
    prevalence = float(np.mean(labels))
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.axhline(prevalence, ls="--", color=COLORS["ideal"], lw=1, label=f"Prevalence {prevalence:.2f}")
    ax.step(
        rec,
        prec,
        where="post",
        color=COLORS["model"],
        lw=2,
        label=f"AUPRC {auprc['value']:.3f} ({auprc['ci_low']:.3f}–{auprc['ci_high']:.3f})",
    )
    for name, op in op_points.items():
        ppv = op["ppv"]["value"]
        if ppv is not None and np.isfinite(ppv):
            ax.scatter(
                op["sensitivity"]["value"],
                ppv,
                s=70,
                zorder=3,
                color=COLORS.get(name, "k"),
                edgecolor="white",
                lw=1.5,
                label=op_label(name),
            )
    _style(ax, "Precision–recall curve (test)", "Recall (sensitivity)", "Precision (PPV)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    return _fig_png(fig)


def reliability_png(
    labels: np.ndarray,
    raw_probs: np.ndarray,
    probs: np.ndarray,
    n_bins: int,
    ece_before: float,
    ece_after: float,
    calibration_label: str,
) -> bytes:
    fig, (ax, axh) = plt.subplots(
        2, 1, figsize=(5.2, 5.6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    ax.plot([0, 1], [0, 1], ls="--", color=COLORS["ideal"], lw=1, label="Perfect calibration")
    for key, p, ece in (("before", raw_probs, ece_before), ("after", probs, ece_after)):
        rc = reliability_curve(p, labels, n_bins)
        lab = "Before (raw sigmoid)" if key == "before" else f"After ({calibration_label})"
        ax.plot(
            rc["mean_predicted"],
            rc["fraction_positive"],
            marker="o",
            color=COLORS[key],
            lw=1.8,
            label=f"{lab}: ECE {ece:.3f}",
        )
    _style(ax, "Reliability diagram (test)", "", "Observed fraction fractured")
    ax.set_xlabel("")
    ax.set_ylim(-0.02, 1.02)
    # Below the figure: inside, it would hide the points it explains.
    fig.legend(
        *ax.get_legend_handles_labels(),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    bins = np.linspace(0, 1, n_bins + 1)
    axh.hist([raw_probs, probs], bins=bins, color=[COLORS["before"], COLORS["after"]], alpha=0.75)
    axh.set_yscale("log")
    _style(axh, "", "Predicted probability of fracture", "Images")
    return _fig_png(fig)


def confusion_png(cm: Sequence[Sequence[int]], names: Sequence[str], title: str) -> bytes:
    m = np.asarray(cm, dtype=float)
    k = len(names)
    size = max(3.6, 0.95 * k + 2.6)  # type matrices (many classes) stay readable
    font = 11 if k > 2 else 9
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    rows = m.sum(1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}\n{frac[i, j]:.0%}" if rows[i, 0] > 0 else "n/a",  # no test image of the class
                ha="center",
                va="center",
                fontsize=font,
                color="white" if frac[i, j] > 0.55 else ("#222" if rows[i, 0] > 0 else "#999"),
            )
    rot = 30 if k > 2 else 0
    ax.set_xticks(range(k), names, rotation=rot, ha="right" if k > 2 else "center", fontsize=font)
    ax.set_yticks(range(k), [n if rows[i, 0] > 0 else f"{n} (none)" for i, n in enumerate(names)], fontsize=font)
    ax.set_xlabel("Predicted", fontsize=font)
    ax.set_ylabel("Actual", fontsize=font)
    ax.set_title(title, fontsize=font + 1, loc="left", fontweight="bold")
    return _fig_png(fig)


def group_bars_png(groups: Mapping[str, Mapping[str, Any]], title: str, op_name: str) -> bytes | None:
    """AUROC, and sensitivity/specificity at ``op_name``, per subgroup with CI whiskers."""
    ok = {g: m for g, m in groups.items() if "auroc" in m}
    if not ok:
        return None
    names = list(ok)
    series = [("AUROC", [ok[g]["auroc"] for g in names], COLORS["model"])]
    if all(op_name in ok[g]["operating_points"] for g in names):
        series.append(
            (
                f"Sensitivity ({op_label(op_name).lower()})",
                [ok[g]["operating_points"][op_name]["sensitivity"] for g in names],
                COLORS[op_name],
            )
        )
        series.append(
            (
                f"Specificity ({op_label(op_name).lower()})",
                [ok[g]["operating_points"][op_name]["specificity"] for g in names],
                "#7f7f7f",
            )
        )
    x = np.arange(len(names))
    w = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.2, 1.1 * len(names) + 2.5), 3.0))
    for i, (lab, ests, color) in enumerate(series):
        # None (undefined, e.g. no positives called) plots as NaN: no bar.
        v = np.array([e["value"] for e in ests], dtype=float)
        lo = np.array([e["ci_low"] for e in ests], dtype=float)
        hi = np.array([e["ci_high"] for e in ests], dtype=float)
        err = np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0)
        ax.bar(
            x + (i - (len(series) - 1) / 2) * w,
            v,
            w * 0.92,
            yerr=err,
            capsize=3,
            color=color,
            label=lab,
            error_kw={"lw": 1, "ecolor": "#333"},
        )
    ax.set_xticks(x, [f"{g}\n(n={ok[g]['n']}, {ok[g]['n_positive']}+)" for g in names], fontsize=8)
    ax.set_ylim(0, 1.05)
    _style(ax, title, "", "")
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(series))
    return _fig_png(fig)


def save_png(data: bytes, path: Path) -> Path:
    return atomic_write_bytes(Path(path), data)

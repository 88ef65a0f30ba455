"""Leakage-safe train/val/test splits: grouped, stratified, deterministic.

Images of one patient (or study) look alike and share anatomy; if they land on
both sides of a split, the test score measures recall of a patient rather than
fracture detection. Where ids exist, rows are grouped by ``patient_id`` (then
``study_id``); rows without ids (FracAtlas has none) are grouped by
perceptual-hash near-duplicate clusters, so copies and resizes of one picture,
and repeat exposures that hash alike, stay on one side. Over-grouping only costs
a little balance; under-grouping leaks.

Splitting uses scikit-learn's ``StratifiedGroupKFold`` on strata
``label x body_part`` twice: once for test, once (on the rest) for val. Of the
K candidate folds, the one whose label mix is closest to the whole set is
taken, so every split gets positives whenever there are enough positive groups.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from bonefrac.data.schema import SPLIT_COLUMN, SPLITS
from bonefrac.errors import BonefracError
from bonefrac.validation.near_duplicates import clusters, near_duplicate_pairs


class SplitError(BonefracError, ValueError):
    """The data cannot be split as asked (e.g. too few positive groups); the message says why."""


def _text(s: pd.Series) -> pd.Series:
    return s.fillna("").astype(str).str.strip()


def assign_groups(df: pd.DataFrame, near_duplicate_max_distance: int = 4) -> pd.Series:
    """A group id per row: ``p:<patient>``, ``s:<study>``, ``h:<first image of a cluster>``, ``i:<image>``.

    Rows with a patient (or study) id are grouped by it; the rest by near-duplicate phash clusters.
    """
    n = len(df)
    ids = _text(df["image_id"]) if "image_id" in df.columns else pd.Series([str(i) for i in range(n)])
    patient = _text(df["patient_id"]) if "patient_id" in df.columns else pd.Series([""] * n)
    study = _text(df["study_id"]) if "study_id" in df.columns else pd.Series([""] * n)
    groups = np.where(patient != "", "p:" + patient, np.where(study != "", "s:" + study, ""))
    free = np.flatnonzero(groups == "")
    if len(free):
        phash = _text(df["phash"]).to_numpy()[free] if "phash" in df.columns else [""] * len(free)
        pi, pj, _ = near_duplicate_pairs(list(phash), near_duplicate_max_distance)
        comp = clusters(len(free), pi, pj)
        free_ids = ids.to_numpy()[free]
        first: dict[int, str] = {}
        for k in np.argsort(free_ids, kind="stable"):  # name a cluster by its smallest image id
            first.setdefault(int(comp[k]), str(free_ids[k]))
        in_pair = np.zeros(len(free), bool)
        in_pair[pi] = True
        in_pair[pj] = True
        groups[free] = [
            ("h:" + first[int(comp[k])]) if in_pair[k] else ("i:" + str(free_ids[k]))
            for k in range(len(free))
        ]
    return pd.Series(groups, index=df.index, name="group_id")


def _strata(df: pd.DataFrame, n_splits: int, by_type: bool = False) -> np.ndarray:
    """label x body_part, falling back to label alone for strata too small to spread over the folds.

    ``by_type``: label x fracture type x body_part, falling back to label x fracture type, then label.
    """
    label = df["label"].astype(int).astype(str)
    bp = _text(df["body_part"]) if "body_part" in df.columns else pd.Series([""] * len(df), index=df.index)
    if by_type and "fracture_type" in df.columns:
        label = label + "|" + _text(df["fracture_type"])
        label = np.where(label.map(label.value_counts()) >= n_splits, label, df["label"].astype(int).astype(str))
        label = pd.Series(label, index=df.index)
    fine = label + "|" + bp
    counts = fine.map(fine.value_counts())
    return np.where(counts >= n_splits, fine, label).astype(str)


def _type_mix(df: pd.DataFrame, held: np.ndarray) -> float:
    """L1 distance between the fracture-type mix of the fractured rows in ``held`` and in the whole."""
    fx = df["label"].to_numpy() == 1
    types = _text(df["fracture_type"]).to_numpy()
    whole = pd.Series(types[fx]).value_counts(normalize=True)
    part = pd.Series(types[held][fx[held]]).value_counts(normalize=True)
    return float(whole.sub(part, fill_value=0.0).abs().sum())


def _pick_fold(df: pd.DataFrame, n_splits: int, seed: int, by_type: bool = False) -> np.ndarray:
    """Boolean mask of the held-out fold (about 1/n_splits of rows) closest in label (and type) mix to the whole."""
    by_type = by_type and "fracture_type" in df.columns
    y = _strata(df, n_splits, by_type)
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    target = df["label"].mean()
    best: tuple[float, np.ndarray] | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only k members"
        for _, held in cv.split(np.zeros(len(df)), y, groups=df["group_id"].to_numpy()):
            lab = df["label"].to_numpy()[held]
            has_both = 0.0 if (lab == 1).any() and (lab == 0).any() else 1.0
            size_err = abs(len(held) / len(df) - 1.0 / n_splits)
            score = has_both * 10 + abs(lab.mean() - target) + size_err
            if by_type:
                score += _type_mix(df, held)
            if best is None or score < best[0]:
                mask = np.zeros(len(df), bool)
                mask[held] = True
                best = (score, mask)
    assert best is not None
    return best[1]


def assign_splits(
    df: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    near_duplicate_max_distance: int = 4,
    stratify_fracture_type: bool = False,
) -> pd.DataFrame:
    """Return a copy of ``df`` with ``group_id`` and ``split`` (train/val/test) columns.

    Deterministic for a seed and independent of row order (rows are processed
    sorted by ``image_id``). Raises :class:`SplitError` when a split would get
    no positive or no negative image. ``stratify_fracture_type`` also stratifies the
    fractured rows by their ``fracture_type`` (and picks the fold whose type mix is closest
    to the whole), so a type head is scored on every type (issue 14); off by default, so
    existing splits do not move.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise SplitError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in (0, 1) "
            "and leave rows to train on"
        )
    if "label" not in df.columns:
        raise SplitError("the table has no 'label' column")
    labels = pd.to_numeric(df["label"], errors="coerce")
    if not labels.isin([0, 1]).all():
        raise SplitError("labels must all be 0 or 1 before splitting (run validation first)")
    out = df.copy()
    out["label"] = labels.astype(int)
    out["group_id"] = assign_groups(out, near_duplicate_max_distance)
    order = (
        np.argsort(_text(out["image_id"]).to_numpy(), kind="stable")
        if "image_id" in out.columns
        else np.arange(len(out))
    )
    work = out.iloc[order]
    n_groups = work["group_id"].nunique()
    pos_groups = work.loc[work["label"] == 1, "group_id"].nunique()
    neg_groups = work.loc[work["label"] == 0, "group_id"].nunique()
    if n_groups < 3 or pos_groups < 3 or neg_groups < 3:
        raise SplitError(
            f"need at least 3 groups with positives and 3 with negatives to fill train/val/test; "
            f"have {pos_groups} and {neg_groups} ({n_groups} groups)"
        )

    k_test = max(2, round(1.0 / test_fraction))
    test_mask = _pick_fold(work, k_test, seed, stratify_fracture_type)
    rest = work[~test_mask]
    k_val = max(2, round((1.0 - test_fraction) / val_fraction))
    val_mask_rest = _pick_fold(rest, k_val, seed + 1, stratify_fracture_type)

    split = np.full(len(work), "train", dtype=object)
    split[test_mask] = "test"
    rest_pos = np.flatnonzero(~test_mask)
    split[rest_pos[val_mask_rest]] = "val"
    work = work.assign(**{SPLIT_COLUMN: split})
    for s in SPLITS:
        lab = work.loc[work[SPLIT_COLUMN] == s, "label"]
        if not ((lab == 1).any() and (lab == 0).any()):
            raise SplitError(
                f"split {s!r} got {int((lab == 1).sum())} positive and {int((lab == 0).sum())} "
                "negative images; add data or change the fractions"
            )
    out[SPLIT_COLUMN] = work[SPLIT_COLUMN].reindex(out.index)
    return out


def split_report(df: pd.DataFrame) -> dict[str, Any]:
    """Counts per split x label x body part, group counts and a leakage check, for ``reports/splits.json``."""
    report: dict[str, Any] = {"rows": len(df), "groups": int(df["group_id"].nunique()), "splits": {}}
    bp = (
        _text(df["body_part"])
        if "body_part" in df.columns
        else pd.Series(["unknown"] * len(df), index=df.index)
    )
    for s in SPLITS:
        part = df[df[SPLIT_COLUMN] == s]
        lab = part["label"].astype(int)
        by_bp: dict[str, dict[str, int]] = {}
        for b, sub in part.groupby(bp.loc[part.index]):
            by_bp[str(b)] = {"0": int((sub["label"] == 0).sum()), "1": int((sub["label"] == 1).sum())}
        report["splits"][s] = {
            "rows": len(part),
            "fraction": round(len(part) / max(len(df), 1), 4),
            "groups": int(part["group_id"].nunique()),
            "positives": int((lab == 1).sum()),
            "negatives": int((lab == 0).sum()),
            "positive_fraction": round(float(lab.mean()), 4) if len(part) else 0.0,
            "by_body_part": by_bp,
        }
    crossing = df.groupby("group_id")[SPLIT_COLUMN].nunique()
    report["groups_crossing_splits"] = int((crossing > 1).sum())
    report["multi_image_groups"] = int((df["group_id"].value_counts() > 1).sum())
    return report

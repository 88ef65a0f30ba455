"""The data checks on the per-image metadata table, as Great Expectations expectations.

Each check has a name equal to its severity key in
:class:`bonefrac.config.ValidationSeverities`. Most checks are plain GX
expectations on manifest columns (value sets, ranges, not-null, table
columns). Checks that compare rows with each other (exact and near duplicates)
or combine columns (a fracture type on a normal image) are computed here in
pandas/numpy into ``dq_*`` columns, and GX then checks those columns, so every
check appears in the Data Docs and every verdict comes from one GX run.

Image-content checks (size, bit depth, intensity, near duplicates) only look at
rows that decode: an unreadable file is reported once, by ``unreadable``, not
again by every check that needs its pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from great_expectations import expectations as gxe
from great_expectations.expectations.metadata_types import FailureSeverity

from bonefrac.config import Params, ValidationParams
from bonefrac.data.schema import (
    INTAKE_REFUSED,
    KNOWN_BODY_PARTS,
    KNOWN_FRACTURE_TYPES,
    MANIFEST_COLUMNS,
    UNKNOWN_BODY_PART,
)
from bonefrac.validation.near_duplicates import clusters, near_duplicate_pairs

# Two images are "the same picture" (a copy, resize or re-encode) when their
# perceptual hashes are within `near_duplicate_max_distance` bits AND their
# global intensity statistics agree within this tolerance (on [0, 1]). On
# radiographs the hash alone is too coarse: repeat exposures of the same hand in
# the standard position are often 2-4 bits apart yet are different images (and
# may rightly carry different labels); re-encodes and resizes of one picture move
# mean and std by < 0.003. Proposed as `validation.near_duplicate_max_intensity_diff`.
DEFAULT_NEAR_DUPLICATE_MAX_INTENSITY_DIFF = 0.005

DECODABLE = "decodes_ok==True"

NUMERIC_COLUMNS = (
    "label",
    "width",
    "height",
    "depth",
    "channels",
    "bit_depth",
    "file_size",
    "intensity_mean",
    "intensity_std",
    "intensity_p01",
    "intensity_p99",
)
TEXT_COLUMNS = (
    "image_id",
    "path",
    "fracture_type",
    "body_part",
    "view",
    "patient_id",
    "study_id",
    "boxes",
    "sha256",
    "phash",
    "format",
    "modality",
    "decode_error",
)

GX_SEVERITY = {
    "critical": FailureSeverity.CRITICAL,
    "quarantine": FailureSeverity.WARNING,
    "warn": FailureSeverity.INFO,
}


@dataclass(frozen=True)
class Check:
    """One named check: its columns, whether it judges rows (vs. the whole table), and why it exists."""

    name: str
    description: str
    columns: tuple[str, ...]
    row_level: bool = True


CHECKS: tuple[Check, ...] = (
    Check("required_columns", "The manifest has every column the pipeline reads.", (), row_level=False),
    Check(
        "unreadable", "The whole image decodes (truncated, corrupt or non-image files fail).", ("decodes_ok",)
    ),
    Check(
        "exact_duplicates",
        "Byte-identical files (sha256): the first copy is kept, the others are "
        "quarantined; copies with different labels are all quarantined.",
        ("sha256", "label"),
    ),
    Check(
        "near_duplicate_label_conflict",
        "Copies of one picture (perceptual hash close and intensity "
        "statistics equal) must not carry different labels.",
        ("phash", "label", "intensity_mean", "intensity_std"),
    ),
    Check("label_values", "Labels are 0 (no fracture) or 1 (fracture).", ("label",)),
    Check(
        "fracture_type_values",
        "Fracture types are known names or empty; a normal (label 0) image "
        "carries no fracture type and no fracture boxes.",
        ("fracture_type", "label", "boxes"),
    ),
    Check("body_part_values", "Body parts are in the allowed list.", ("body_part",)),
    Check("size_range", "Image width and height lie within the allowed range.", ("width", "height")),
    Check("bit_depth", "Stored bit depth is one the pipeline supports.", ("bit_depth",)),
    Check(
        "intensity_range",
        "Images are not blank or saturated: intensity spread above the minimum "
        "and 1st percentile below the 99th.",
        ("intensity_std", "intensity_p01", "intensity_p99"),
    ),
    Check(
        "class_balance",
        "The fraction of fracture images among those that will train (after quarantine) lies within bounds.",
        ("label",),
        row_level=False,
    ),
)
CHECKS_BY_NAME: dict[str, Check] = {c.name: c for c in CHECKS}


@dataclass
class Prepared:
    """The manifest with normalised types and the derived ``dq_*`` columns, plus facts for the summary."""

    table: pd.DataFrame
    facts: dict[str, float] = field(default_factory=dict)
    # image_id of the kept copy, per redundant exact-duplicate row (for reasons)
    duplicate_of: dict[int, str] = field(default_factory=dict)
    # near-duplicate conflict group members per row (for reasons)
    conflict_members: dict[int, list[str]] = field(default_factory=dict)


def _to_bool(v: object) -> bool:
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | float | np.integer | np.floating):
        return not pd.isna(v) and v != 0
    return str(v).strip().lower() in {"true", "1", "yes"}


def _has_boxes(v: object) -> int:
    s = "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v).strip()
    return int(s not in {"", "[]", "nan", "None"})


def prepare_table(manifest: pd.DataFrame, params: ValidationParams) -> Prepared:
    """Normalise types (a CSV round trip turns "" into NaN, bools into strings) and add ``dq_*`` columns."""
    t = manifest.reset_index(drop=True).copy()
    for c in TEXT_COLUMNS:
        if c in t.columns:
            t[c] = t[c].fillna("").astype(str)
    for c in NUMERIC_COLUMNS:
        if c in t.columns:
            t[c] = pd.to_numeric(t[c], errors="coerce")
    if "decodes_ok" in t.columns:
        t["decodes_ok"] = t["decodes_ok"].map(_to_bool).astype(bool)
    prep = Prepared(table=t)
    n = len(t)
    ids = t["image_id"].tolist() if "image_id" in t.columns else [str(i) for i in range(n)]

    if "label" in t.columns:
        t["dq_label_valid"] = t["label"].isin([0, 1]).astype(int)
        # Rows the dataset-level checks judge: valid labels that will train (validate_manifest
        # narrows it to the rows no row-level check quarantines, before the final GX run).
        t["dq_trains"] = t["dq_label_valid"]
    if "boxes" in t.columns:
        t["dq_has_boxes"] = t["boxes"].map(_has_boxes).astype(int)

    if {"sha256", "label"} <= set(t.columns):
        flag = np.zeros(n, dtype=int)
        hashed = t[t["sha256"] != ""]
        groups = hashed.groupby("sha256", sort=False).indices
        n_groups = 0
        for members in groups.values():
            if len(members) < 2:
                continue
            n_groups += 1
            rows = hashed.index[members]
            if t.loc[rows, "label"].nunique(dropna=False) > 1:
                flag[rows] = 1  # which copy is right is unknown: quarantine them all
            else:
                flag[rows[1:]] = 1
                for r in rows[1:]:
                    prep.duplicate_of[int(r)] = ids[rows[0]]
        t["dq_exact_duplicate"] = flag
        prep.facts["exact_duplicate_groups"] = n_groups
        prep.facts["exact_duplicate_rows"] = int(sum(len(m) for m in groups.values() if len(m) > 1))

    if set(CHECKS_BY_NAME["near_duplicate_label_conflict"].columns) <= set(t.columns):
        _near_duplicates(t, prep, params)
    return prep


def _near_duplicates(t: pd.DataFrame, prep: Prepared, params: ValidationParams) -> None:
    n = len(t)
    ok = t["decodes_ok"].to_numpy(bool) if "decodes_ok" in t.columns else np.ones(n, bool)
    phash = [p if ok[k] else "" for k, p in enumerate(t["phash"].tolist())]
    pi, pj, _ = near_duplicate_pairs(phash, params.near_duplicate_max_distance)
    tol = float(
        getattr(params, "near_duplicate_max_intensity_diff", DEFAULT_NEAR_DUPLICATE_MAX_INTENSITY_DIFF)
    )
    mean = t["intensity_mean"].to_numpy(float)
    std = t["intensity_std"].to_numpy(float)
    same = (np.abs(mean[pi] - mean[pj]) <= tol) & (np.abs(std[pi] - std[pj]) <= tol)
    pi, pj = pi[same], pj[same]
    comp = clusters(n, pi, pj)
    labels = t["label"].to_numpy(float)
    flag = np.zeros(n, dtype=int)
    group = np.full(n, -1, dtype=np.int64)
    in_pair = np.zeros(n, bool)
    in_pair[pi] = True
    in_pair[pj] = True
    n_groups = n_conflicts = 0
    ids = t["image_id"].tolist() if "image_id" in t.columns else [str(i) for i in range(n)]
    for root in np.unique(comp[in_pair]):
        members = np.flatnonzero(comp == root)
        n_groups += 1
        group[members] = members.min()
        if len(set(labels[members].tolist())) > 1:
            n_conflicts += 1
            flag[members] = 1
            names = [ids[m] for m in members]
            for m in members:
                prep.conflict_members[int(m)] = [x for x in names if x != ids[m]]
    t["dq_near_duplicate_label_conflict"] = flag
    t["dq_near_duplicate_group"] = group
    prep.facts["near_duplicate_pairs"] = len(pi)
    prep.facts["near_duplicate_groups"] = n_groups
    prep.facts["near_duplicate_rows"] = int(in_pair.sum())
    prep.facts["near_duplicate_conflict_groups"] = n_conflicts


def required_columns() -> list[str]:
    """Columns validation needs: the whole manifest contract."""
    return list(MANIFEST_COLUMNS)


def _kw(check: str, severity: str) -> dict[str, Any]:
    c = CHECKS_BY_NAME[check]
    return {
        "meta": {"check": check, "severity": severity},
        "severity": GX_SEVERITY[severity],
        "notes": f"bonefrac check `{check}` (severity: {severity}): {c.description}",
    }


def _decodable(columns: set[str]) -> dict[str, Any]:
    return {"row_condition": DECODABLE, "condition_parser": "pandas"} if "decodes_ok" in columns else {}


def allowed_body_parts(params: ValidationParams) -> list[str]:
    """The body parts validation accepts: ``validation.allowed_body_parts`` or the project's vocabulary."""
    if params.allowed_body_parts is not None:
        return list(params.allowed_body_parts)
    return [*KNOWN_BODY_PARTS, UNKNOWN_BODY_PART]


def settings_for(params: Params) -> ValidationParams:
    """``params.validation`` with its vocabularies filled from the declared ``data`` vocabularies.

    A hospital that declares its own fracture types or body parts at intake must not see
    validation quarantine them against the project's built-in lists; intake keeps
    ``unknown`` for images whose body part was not given, so validation accepts it too.
    """
    v = params.validation
    body_parts = v.allowed_body_parts
    if body_parts is None and params.data.body_parts is not None:
        body_parts = [*params.data.body_parts, UNKNOWN_BODY_PART]
    fracture_types = v.allowed_fracture_types
    if fracture_types is None:
        fracture_types = params.data.fracture_types
    return v.model_copy(update={"allowed_body_parts": body_parts, "allowed_fracture_types": fracture_types})


def allowed_fracture_types(params: ValidationParams) -> list[str]:
    """The fracture types validation accepts: ``validation.allowed_fracture_types`` or the project's vocabulary."""
    if params.allowed_fracture_types is not None:
        return [t.strip().lower() for t in params.allowed_fracture_types]
    return list(KNOWN_FRACTURE_TYPES)


def build_expectations(params: ValidationParams, columns: set[str]) -> tuple[list[Any], dict[str, str]]:
    """The GX expectations for every check that is not ``off``.

    Returns the expectations (each tagged with ``meta.check``) and the checks
    skipped because their columns are missing (name → why).
    """
    sev = params.severities.model_dump()
    out: list[Any] = []
    skipped: dict[str, str] = {}
    dec = _decodable(columns)

    builders: dict[str, Callable[[dict[str, Any]], list[Any]]] = {
        "required_columns": lambda kw: [
            gxe.ExpectTableColumnsToMatchSet(column_set=required_columns(), exact_match=False, **kw)
        ],
        "unreadable": lambda kw: [
            gxe.ExpectColumnValuesToBeInSet(column="decodes_ok", value_set=[True], **kw)
        ],
        "exact_duplicates": lambda kw: [
            gxe.ExpectColumnValuesToBeInSet(column="dq_exact_duplicate", value_set=[0], **kw)
        ],
        "near_duplicate_label_conflict": lambda kw: [
            gxe.ExpectColumnValuesToBeInSet(column="dq_near_duplicate_label_conflict", value_set=[0], **kw)
        ],
        "label_values": lambda kw: [
            gxe.ExpectColumnValuesToNotBeNull(column="label", **kw),
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1], **kw),
        ],
        "fracture_type_values": lambda kw: [
            gxe.ExpectColumnValuesToBeInSet(
                column="fracture_type", value_set=[*allowed_fracture_types(params), ""], **kw
            ),
            gxe.ExpectColumnValuesToBeInSet(
                column="fracture_type",
                value_set=[""],
                row_condition="label==0",
                condition_parser="pandas",
                **kw,
            ),
            gxe.ExpectColumnValuesToBeInSet(
                column="dq_has_boxes",
                value_set=[0],
                row_condition="label==0",
                condition_parser="pandas",
                **kw,
            ),
        ],
        "body_part_values": lambda kw: [
            gxe.ExpectColumnValuesToBeInSet(
                column="body_part", value_set=allowed_body_parts(params), **kw
            )
        ],
        "size_range": lambda kw: (
            [gxe.ExpectColumnValuesToNotBeNull(column=c, **dec, **kw) for c in ("width", "height")]
            + [
                gxe.ExpectColumnValuesToBeBetween(
                    column=c, min_value=params.min_side, max_value=params.max_side, **dec, **kw
                )
                for c in ("width", "height")
            ]
        ),
        "bit_depth": lambda kw: [
            gxe.ExpectColumnValuesToBeInSet(
                column="bit_depth", value_set=list(params.allowed_bit_depths), **dec, **kw
            )
        ],
        "intensity_range": lambda kw: [
            gxe.ExpectColumnValuesToNotBeNull(column="intensity_std", **dec, **kw),
            gxe.ExpectColumnValuesToBeBetween(
                column="intensity_std", min_value=params.min_intensity_std, **dec, **kw
            ),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="intensity_p99", column_B="intensity_p01", **dec, **kw
            ),
        ],
        "class_balance": lambda kw: [
            gxe.ExpectColumnMeanToBeBetween(
                column="label",
                min_value=params.min_positive_fraction,
                max_value=params.max_positive_fraction,
                row_condition="dq_trains==1",
                condition_parser="pandas",
                **kw,
            )
        ],
    }
    for check in CHECKS:
        s = sev[check.name]
        if s == "off":
            continue
        missing = [c for c in check.columns if c not in columns]
        if missing:
            skipped[check.name] = f"missing column(s) {missing}"
            continue
        out.extend(builders[check.name](_kw(check.name, s)))
    return out, skipped


def row_reason(check: str, row: pd.Series, prep: Prepared, params: ValidationParams, pos: int) -> str:
    """A one-line, human-readable reason why ``row`` fails ``check``."""
    if check == "unreadable":
        err = str(row.get("decode_error", "") or "")
        return err if err.startswith(INTAKE_REFUSED) else f"does not decode: {err or 'unknown error'}"
    if check == "exact_duplicates":
        if pos in prep.duplicate_of:
            return f"byte-identical copy of {prep.duplicate_of[pos]} (kept)"
        return "byte-identical copies carry different labels"
    if check == "near_duplicate_label_conflict":
        others = prep.conflict_members.get(pos, [])
        shown = ", ".join(others[:5]) + (f" (+{len(others) - 5} more)" if len(others) > 5 else "")
        return f"same picture as {shown} but with a different label"
    if check == "label_values":
        return f"label {row.get('label')!r} is not 0 or 1"
    if check == "fracture_type_values":
        ft = row.get("fracture_type", "")
        if ft not in (*allowed_fracture_types(params), ""):
            return "fracture type not in the known vocabulary"  # the value itself is not repeated
        if ft:
            return f"fracture type {ft!r} on an image labelled no fracture"
        return "fracture boxes on an image labelled no fracture"
    if check == "body_part_values":
        return f"body part not in {allowed_body_parts(params)}"  # free text: not repeated
    if check == "size_range":
        return f"size {row.get('width')}x{row.get('height')} outside {params.min_side}..{params.max_side} px"
    if check == "bit_depth":
        return f"bit depth {row.get('bit_depth')} not in {list(params.allowed_bit_depths)}"
    if check == "intensity_range":
        std, p01, p99 = row.get("intensity_std"), row.get("intensity_p01"), row.get("intensity_p99")
        if pd.isna(std) or std < params.min_intensity_std:
            return f"blank or flat image: intensity std {std:.4g} < {params.min_intensity_std}"
        return f"saturated or flat image: p01 {p01:.4g} >= p99 {p99:.4g}"
    return check

"""Source adapters: turn a folder or manifest into one table of records (``RECORD_COLUMNS``).

One function, :func:`load_records`, knows every supported layout, so the
ingest stage does not care where data came from:

``phantom``      ``root/manifest.csv`` written by :mod:`bonefrac.data.phantom` (RECORD_COLUMNS,
                 paths relative to the manifest; ids are already synthetic pseudonyms).
``imagefolder``  ``root/<class>/[<fracture type>/]image`` — the folder is the label. Class
                 names are matched loosely (``Fractured``/``Non_fractured``, ``fracture``/``normal``,
                 ``1``/``0``, ``positive``/``negative`` …); under the positive class an optional
                 sub-folder names the fracture type.
``csv``          a CSV with ``path,label`` and optional ``image_id, fracture_type, body_part, view,
                 patient_id, study_id, boxes, hardware``; relative paths are resolved against the
                 CSV's folder; patient/study ids are pseudonymised.
``fracatlas``    the FracAtlas release layout (``images/Fractured``, ``images/Non_fractured``,
                 ``dataset.csv``, ``annotations/coco_fracture_masks.json``), see :func:`_fracatlas`.
``dicom``        2D DICOM files in an ImageFolder layout (or listed by ``manifest_csv``);
                 de-identified copies are written to ``deid_dir`` and the rows point to them.
``volume``       DICOM series folders and NIfTI files, ImageFolder layout or ``manifest_csv``.

Rows are never dropped here: a record whose file is missing keeps its path, and the
metadata step marks it undecodable with the reason. DICOM met in any source is
de-identified into ``deid_dir`` (required then), so original identifiers and file names
never reach the table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from bonefrac.atomic import atomic_link_or_copy
from bonefrac.data.deid import deidentify_file, pseudonymise, warn_if_dev_key
from bonefrac.data.dicom import DicomError, looks_like_dicom
from bonefrac.data.exif_boxes import annotated_on_display, box_to_stored, displayed_size
from bonefrac.data.ingest_cache import IngestCache, content_sha256
from bonefrac.data.schema import (
    INTAKE_ERROR,
    INTAKE_REFUSED,
    KNOWN_BODY_PARTS,
    KNOWN_FRACTURE_TYPES,
    RECORD_COLUMNS,
    UNKNOWN_BODY_PART,
)
from bonefrac.errors import BonefracError
from bonefrac.model.boxes import BoxError, polygon_coordinates

log = logging.getLogger(__name__)

SOURCES = ("phantom", "imagefolder", "csv", "fracatlas", "dicom", "volume")
# Sources that may come from a hospital: their file and folder names may be identifying, so
# every id is a keyed pseudonym and every file is referenced through a pseudonymous copy in
# ``deid_dir`` (phantom and FracAtlas are synthetic or public, named by their own ids).
HOSPITAL_SOURCES = ("imagefolder", "csv", "dicom", "volume")
VIEWS = ("frontal", "lateral", "oblique")

# Folder / label names meaning "fracture" and "no fracture", compared lower-case without
# punctuation ("Non_fractured" -> "nonfractured").
POSITIVE_NAMES = frozenset(
    {"fractured", "fracture", "fractures", "positive", "pos", "abnormal", "1", "yes", "true"}
)
NEGATIVE_NAMES = frozenset(
    {
        "nonfractured",
        "notfractured",
        "unfractured",
        "nofracture",
        "nonfracture",
        "normal",
        "negative",
        "neg",
        "0",
        "no",
        "false",
        "healthy",
    }
)
# Discovery only (the content decides the format later): image-like names and files without a suffix,
# since DICOM exports often have none. Other files (README.txt, .csv) are not images of the set.
IMAGE_SUFFIXES = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".dcm",
        ".dicom",
        ".dic",
        ".tif",
        ".tiff",
        ".bmp",
        ".gif",
        ".webp",
        ".nii",
        ".ima",
    }
)
FRACATLAS_BODY_PARTS = ("hand", "leg", "hip", "shoulder", "mixed")
FRACATLAS_VIEWS = ("frontal", "lateral", "oblique")
# DICOM BodyPartExamined (CID 4031 terms) -> the project's body-part vocabulary; an unlisted term
# passes through lower-cased and is then refused at intake unless data.body_parts declares it.
BODY_PART_TERMS = {
    "HAND": "hand", "FINGER": "hand", "THUMB": "hand", "WRIST": "hand",
    "FOREARM": "forearm", "RADIUS": "forearm", "ULNA": "forearm",
    "SHOULDER": "shoulder", "CLAVICLE": "shoulder", "SCAPULA": "shoulder",
    "HIP": "hip", "PELVIS": "hip",
    "FEMUR": "femur", "THIGH": "femur",
    "TIBIA": "tibia", "FIBULA": "tibia",
    "LEG": "leg", "LOWER LEG": "leg", "LOWERLEG": "leg", "KNEE": "leg", "ANKLE": "leg", "FOOT": "leg",
}
_VIEW_POSITIONS = {
    "AP": "frontal",
    "PA": "frontal",
    "LAT": "lateral",
    "LL": "lateral",
    "RL": "lateral",
    "OBL": "oblique",
    "LAO": "oblique",
    "RAO": "oblique",
}


class SourceError(BonefracError, ValueError):
    """A data source that cannot be read as the chosen layout; the message says what was expected."""


@dataclass
class IntakeReport:
    """Every input met gets one verdict: a manifest row (maybe refused, with its reason) or a skip.

    ``seen`` counts inputs (files, series folders, CSV rows, entries at the top of the
    layout); ``skipped`` the ones left out of the manifest, by reason; ``refused`` the
    manifest rows refused at intake (validation quarantines them), by reason; ``notes``
    facts that are not verdicts (e.g. names that are not valid UTF-8, pseudonymised).
    Reasons name patterns and settings, never a file, folder or value.
    So ``seen == rows + sum(skipped)``.
    """

    seen: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.seen += 1
        self.skipped[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "skipped": dict(sorted(self.skipped.items())),
            "refused": dict(sorted(self.refused.items())),
            "notes": dict(sorted(self.notes.items())),
        }


def _refusal(reason: str) -> str:
    return INTAKE_REFUSED + reason


def _name_ok(name: str) -> bool:
    """Whether a name from the file system is valid UTF-8 (else Python holds lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------ helpers
def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def parse_label(value: Any) -> int:
    """1 for fracture, 0 for none, -1 when unreadable (validation then stops the run naming the file)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and not pd.isna(value) and float(value) in (0.0, 1.0):
        return int(value)
    key = _norm(str(value))
    if key in ("10", "00"):  # "1.0" / "0.0" after punctuation removal
        key = key[0]
    if key in POSITIVE_NAMES:
        return 1
    if key in NEGATIVE_NAMES:
        return 0
    return -1


def _record(**kw: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "image_id": "",
        "path": "",
        "label": -1,
        "fracture_type": "",
        "body_part": "unknown",
        "view": "",
        "patient_id": "",
        "study_id": "",
        "boxes": "[]",
        "hardware": -1,
        INTAKE_ERROR: "",
    }
    rec.update({k: v for k, v in kw.items() if k in rec})
    return rec


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=[*RECORD_COLUMNS, INTAKE_ERROR])
    for col in ("label", "hardware"):
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(-1).astype(int)
    for col in (
        "image_id", "path", "fracture_type", "body_part", "view", "patient_id", "study_id", "boxes", INTAKE_ERROR
    ):
        df[col] = df[col].fillna("").astype(str)
    df.loc[df["body_part"] == "", "body_part"] = "unknown"
    df.loc[df["boxes"] == "", "boxes"] = "[]"
    return _unique_ids(df)


def _unique_ids(df: pd.DataFrame) -> pd.DataFrame:
    """image_id must be unique: repeated ids (copies of one file, one SOP UID twice) get ``~2``, ``~3``."""
    dup = df["image_id"].duplicated(keep="first")
    if dup.any():
        counts = df.groupby("image_id").cumcount() + 1
        df.loc[dup, "image_id"] = df.loc[dup, "image_id"] + "~" + counts[dup].astype(str)
        log.warning("%d repeated image ids made unique with a ~N suffix", int(dup.sum()))
    return df


def _is_candidate(p: Path) -> bool:
    if p.name.startswith("."):
        return False
    if p.name.lower().endswith(".nii.gz"):
        return True
    return p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == ""


def _files_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and _is_candidate(p)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _class_of(folder_name: str) -> int | None:
    key = _norm(folder_name)
    if key in POSITIVE_NAMES:
        return 1
    if key in NEGATIVE_NAMES:
        return 0
    return None


def _class_folders(root: Path, report: IntakeReport) -> list[tuple[Path, int]]:
    if not root.is_dir():
        raise SourceError(f"data root {root} is not a folder")
    out: list[tuple[Path, int]] = []
    unknown = 0
    for d in sorted(root.iterdir()):
        if d.name.startswith("."):
            report.skip("hidden file or folder")
            continue
        label = _class_of(d.name) if d.is_dir() else None
        if label is None:
            unknown += 1
            report.skip("outside the class folders (top-level entry naming no class)")
        else:
            out.append((d, label))
    if not out:
        raise SourceError(
            f"{root}: no class folders found (expected e.g. Fractured/ and Non_fractured/, "
            f"fracture/ and normal/, 1/ and 0/); {unknown} other top-level entr(ies), names not shown"
        )
    if unknown:
        log.warning("ignoring %d top-level entr(ies) that name no class (names not logged)", unknown)
    return out


def _walk_files(folder: Path, data_root: Path, report: IntakeReport) -> Iterator[Path]:
    """Image-like files under ``folder`` in name order, following symlinks safely; each skip counted.

    A symlink is followed when it resolves inside ``data_root``; one that resolves nowhere,
    outside the root, or to a folder already walked or above the current one (a loop) is
    skipped. Hidden entries (``.DS_Store``, ``.git``) and files that are not image-like by
    suffix (``README.txt``) are skipped too.
    """
    root_real = data_root.resolve()
    visited: set[tuple[int, int]] = set()

    def walk(d: Path) -> Iterator[Path]:
        st = d.stat()
        if (st.st_dev, st.st_ino) in visited:
            report.skip("symlink loop (folder reached twice)")
            return
        visited.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(d.iterdir())
        except OSError:
            report.skip("folder not readable")
            return
        for p in entries:
            if p.name.startswith("."):
                report.skip("hidden file or folder")
                continue
            if not _name_ok(p.name):
                report.notes["names not valid UTF-8 (pseudonymised)"] += 1
            if p.is_symlink():
                try:
                    real = p.resolve(strict=True)
                except (OSError, RuntimeError):
                    report.skip("broken or looping symlink")
                    continue
                if not real.is_relative_to(root_real):
                    report.skip("symlink pointing outside the data root")
                    continue
                if real.is_dir() and d.resolve().is_relative_to(real):
                    report.skip("symlink loop (folder reached twice)")
                    continue
            if p.is_dir():
                yield from walk(p)
            elif p.is_file():
                if _is_candidate(p):
                    yield p
                else:
                    report.skip("not an image file (by suffix)")
            else:
                report.skip("not a regular file")

    yield from walk(folder)


def _subfolder_type(name: str, class_dir: Path, vocab: frozenset[str]) -> tuple[str, str]:
    """(fracture type, intake error) of a sub-folder of the positive class: a declared type or a refusal."""
    key = name.strip().lower()
    if key in vocab:
        return key, ""
    return "", _refusal(f"unknown sub-folder under {class_dir.name}/ (not in data.fracture_types)")


def _sniff_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return looks_like_dicom(fh.read(132))
    except OSError:
        return False


# ------------------------------------------------------------------ layouts
def _imagefolder(
    root: Path,
    vocab: frozenset[str] | None,
    report: IntakeReport,
    volumes: bool = False,
) -> list[dict[str, Any]]:
    """The folder layout; ``vocab`` is the fracture-type vocabulary (None: sub-folders only group)."""
    rows: list[dict[str, Any]] = []
    for class_dir, label in _class_folders(root, report):
        for item, ftype, error in _items_in_class(class_dir, label, volumes, vocab, root, report):
            rows.append(
                _record(
                    image_id=pseudonymise(item.relative_to(root).as_posix(), "image"),
                    path="" if error else str(item.resolve()),  # a refused file is not read
                    label=label,
                    fracture_type=ftype,
                    intake_error=error,
                )
            )
    return rows


def _items_in_class(
    class_dir: Path, label: int, volumes: bool, vocab: frozenset[str] | None, root: Path, report: IntakeReport
) -> Iterable[tuple[Path, str, str]]:
    """Images (or volumes) under a class folder with their fracture type and intake error ("" when none).

    Directly under the positive class, a sub-folder names the fracture type when it is in
    ``vocab``; any other sub-folder there refuses its images (the folder may be named after
    a patient: its name is never copied). For volumes, a folder that directly holds DICOM
    files is one series; any other folder only groups items.
    """
    if not volumes:
        for f in _walk_files(class_dir, root, report):
            rel = f.relative_to(class_dir).parts
            if len(rel) > 1 and label == 1 and vocab is not None:
                yield (f, *_subfolder_type(rel[0], class_dir, vocab))
            else:
                yield f, "", ""
        return

    visited: set[tuple[int, int]] = set()
    root_real = root.resolve()

    def safe(p: Path) -> bool:
        """Hidden entries and symlinks resolving nowhere or outside the root are skipped (counted)."""
        if p.name.startswith("."):
            report.skip("hidden file or folder")
            return False
        if not _name_ok(p.name):
            report.notes["names not valid UTF-8 (pseudonymised)"] += 1
        if p.is_symlink():
            try:
                real = p.resolve(strict=True)
            except (OSError, RuntimeError):
                report.skip("broken or looping symlink")
                return False
            if not real.is_relative_to(root_real):
                report.skip("symlink pointing outside the data root")
                return False
            if real.is_dir() and p.parent.resolve().is_relative_to(real):
                report.skip("symlink loop (folder reached twice)")
                return False
        return True

    def walk(folder: Path, ftype: str, err: str) -> Iterable[tuple[Path, str, str]]:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in visited:
            report.skip("symlink loop (folder reached twice)")
            return
        visited.add((st.st_dev, st.st_ino))
        entries = [p for p in sorted(folder.iterdir()) if safe(p)]
        files = [p for p in entries if p.is_file()]
        if any(_sniff_dicom(p) for p in files):
            yield folder, ftype, err
            return
        for p in files:
            if p.name.lower().endswith((".nii", ".nii.gz")):
                yield p, ftype, err
            else:
                report.skip("not an image file (by suffix)")
        for d in (p for p in entries if p.is_dir()):
            sub_t, sub_e = ftype, err
            if folder == class_dir and label == 1 and vocab is not None:
                holds_dicom = any(_sniff_dicom(p) for p in d.iterdir() if p.is_file())
                if not holds_dicom:
                    sub_t, sub_e = _subfolder_type(d.name, class_dir, vocab)
            yield from walk(d, sub_t, sub_e)

    yield from walk(class_dir, "", "")


def _read_csv(csv_path: Path) -> pd.DataFrame:
    if not csv_path.is_file():
        raise SourceError(f"manifest CSV {csv_path} not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as err:
        raise SourceError(f"manifest CSV {csv_path} cannot be parsed: {err}") from None
    df.columns = [c.strip().lower() for c in df.columns]
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise SourceError(
            f"manifest CSV {csv_path} lacks required column(s) {missing}; has {list(df.columns)}"
        )
    return df


def _csv_view(value: Any, report: IntakeReport) -> str:
    """The view column within its vocabulary (``frontal``, ``lateral``, ``oblique``, joined by ``+``)."""
    text = str(value or "").strip().lower()
    if not text:
        return ""
    if all(v in VIEWS for v in text.split("+")):
        return text
    report.notes["view values outside the vocabulary (blanked)"] += 1
    return ""


def _csv_rows(
    csv_path: Path,
    vocab: frozenset[str] | None,
    pseudonymise_ids: bool,
    report: IntakeReport,
    data_root: Path | None = None,
) -> list[dict[str, Any]]:
    """Rows of a manifest CSV. With ``data_root``, a path resolving outside it is refused (never read).

    ``vocab`` is the fracture-type vocabulary (None: fracture types not used); a value outside
    it refuses the row. ``pseudonymise_ids`` turns image, patient and study ids into pseudonyms.
    """
    df = _read_csv(csv_path)
    base = csv_path.parent
    root_real = data_root.resolve() if data_root is not None else None
    rows: list[dict[str, Any]] = []
    bad_labels = 0
    for i, r in enumerate(df.to_dict("records")):
        raw_path = str(r.get("path", "")).strip()
        path, error = "", ""
        if raw_path:
            p = Path(raw_path)
            full = p if p.is_absolute() else base / p
            try:
                real = full.resolve()
            except (OSError, RuntimeError):  # a symlink loop
                real, error = full, _refusal("path is a symlink loop (not read)")
            if root_real is not None and not error and not real.is_relative_to(root_real):
                error = _refusal("path outside the data root (not read)")
            path = "" if error else str(real)
        label = parse_label(r.get("label", ""))
        bad_labels += label == -1
        patient, study = str(r.get("patient_id", "")).strip(), str(r.get("study_id", "")).strip()
        image_id = str(r.get("image_id", "") or "").strip() or (Path(raw_path).as_posix() if raw_path else f"row{i}")
        if pseudonymise_ids:
            patient, study = pseudonymise(patient, "patient"), pseudonymise(study, "study")
            image_id = pseudonymise(image_id, "image")
        ftype = str(r.get("fracture_type", "")).strip().lower() if vocab is not None and label == 1 else ""
        if ftype and ftype not in vocab:  # type: ignore[operator]
            ftype = ""
            error = error or _refusal("fracture_type column value not in data.fracture_types")
        boxes = str(r.get("boxes", "") or "[]")
        try:
            json.loads(boxes)
        except ValueError:
            boxes = "[]"
        hardware = pd.to_numeric(r.get("hardware", -1), errors="coerce")
        rows.append(
            _record(
                image_id=image_id,
                path=path,
                label=label,
                fracture_type=ftype,
                body_part=str(r.get("body_part", "")).strip().lower() or "unknown",
                view=_csv_view(r.get("view", ""), report),
                patient_id=patient,
                study_id=study,
                boxes=boxes,
                hardware=-1 if pd.isna(hardware) else int(hardware),
                intake_error=error,
            )
        )
    if bad_labels:
        log.warning("manifest CSV: %d row(s) with an unreadable label (kept with label -1)", bad_labels)
    return rows


def _onehot_names(row: dict[str, Any], names: Iterable[str]) -> list[str]:
    return [n for n in names if str(row.get(n, "0")).strip() in ("1", "1.0", "True", "true")]


def _fracatlas(root: Path) -> list[dict[str, Any]]:
    """FracAtlas release layout → records.

    * label: the folder (``images/Fractured`` = 1), as the release defines it; ``dataset.csv``'s
      ``fractured`` column is only compared (disagreements are logged).
    * body_part: the one-hot column set; several set → ``"mixed"``; none → ``"unknown"``.
    * view: the one-hot views joined with ``+`` in the order frontal, lateral, oblique
      (``"frontal+lateral"``): a FracAtlas image may show several views side by side
      (its ``multiscan`` flag), so keeping all of them is more truthful than the first.
    * hardware: the release's column (1/0).
    * boxes: COCO ``bbox`` of ``annotations/coco_fracture_masks.json``, scaled from the size the
      COCO file records to the size of the stored file (this copy re-encoded large images).
    * patient_id / study_id: ``""`` — FracAtlas has no patient ids, so splits fall back to
      near-duplicate clusters.
    """
    img_root = root / "images"
    folders = {"Fractured": 1, "Non_fractured": 0}
    if not img_root.is_dir() or not any((img_root / f).is_dir() for f in folders):
        raise SourceError(
            f"{root}: not the FracAtlas layout (expected images/Fractured and images/Non_fractured)"
        )
    on_disk: dict[str, list[tuple[Path, int]]] = {}
    for name, label in folders.items():
        if (img_root / name).is_dir():
            for f in _files_under(img_root / name):
                on_disk.setdefault(f.name, []).append((f, label))
    table_path = root / "dataset.csv"
    meta_rows: dict[str, dict[str, Any]] = {}
    if table_path.is_file():
        df = pd.read_csv(table_path, dtype=str, keep_default_na=False)
        df.columns = [c.strip().lower() for c in df.columns]
        if "image_id" not in df.columns:
            raise SourceError(f"{table_path}: no image_id column")
        meta_rows = {r["image_id"]: r for r in df.to_dict("records")}
    else:
        log.warning("%s missing: body part, view and hardware unknown", table_path)
    boxes = _coco_boxes(root / "annotations" / "coco_fracture_masks.json")

    rows: list[dict[str, Any]] = []
    conflicts = not_in_table = 0
    for fname in sorted(set(on_disk) | set(meta_rows)):
        meta = meta_rows.get(fname)
        found = on_disk.get(fname) or []
        if meta is None:
            not_in_table += len(found)
        if not found:
            # Listed but absent: keep the row; the metadata step records "file not found".
            label = parse_label(meta.get("fractured", "")) if meta else -1
            folder = "Fractured" if label == 1 else "Non_fractured"
            found = [(img_root / folder / fname, label)]
        for path, label in found:
            if meta is not None and parse_label(meta.get("fractured", "")) not in (label, -1):
                conflicts += 1
            parts = _onehot_names(meta, FRACATLAS_BODY_PARTS) if meta else []
            body = parts[0] if len(parts) == 1 else ("mixed" if parts else "unknown")
            views = _onehot_names(meta, FRACATLAS_VIEWS) if meta else []
            hw = pd.to_numeric(meta.get("hardware", -1), errors="coerce") if meta else -1
            image_id = Path(fname).stem if len(found) == 1 else f"{path.parent.name}/{Path(fname).stem}"
            rows.append(
                _record(
                    image_id=image_id,
                    path=str(path.resolve()),
                    label=label,
                    body_part=body,
                    view="+".join(views),
                    hardware=-1 if pd.isna(hw) else int(hw),
                    boxes=json.dumps(_scaled_boxes(path, boxes.get(fname))),
                )
            )
    if conflicts:
        log.warning(
            "fracatlas: %d image(s) whose folder label disagrees with dataset.csv (folder kept)", conflicts
        )
    if not_in_table:
        log.warning("fracatlas: %d image(s) not listed in dataset.csv (body part/view unknown)", not_in_table)
    return rows


def _coco_boxes(coco_path: Path) -> dict[str, dict[str, Any]]:
    """file name → {"size": (w, h) recorded by COCO, "bboxes": [[x, y, w, h], ...],
    "outlines": one list of polygons ``[x1, y1, x2, y2, ...]`` per box (``[]``: none, or RLE)}."""
    if not coco_path.is_file():
        log.warning("%s missing: no fracture boxes", coco_path)
        return {}
    try:
        coco = json.loads(coco_path.read_text())
    except ValueError as err:
        raise SourceError(f"{coco_path}: not valid JSON ({err})") from None
    by_id = {im["id"]: im for im in coco.get("images", [])}
    out: dict[str, dict[str, Any]] = {
        im["file_name"]: {"size": (im.get("width"), im.get("height")), "bboxes": [], "outlines": []}
        for im in by_id.values()
    }
    for ann in coco.get("annotations", []):
        im = by_id.get(ann.get("image_id"))
        if im is not None and ann.get("bbox"):
            out[im["file_name"]]["bboxes"].append([float(v) for v in ann["bbox"]])
            out[im["file_name"]]["outlines"].append(_coco_polygons(ann.get("segmentation")))
    return out


def _coco_polygons(segmentation: Any) -> list[list[float]]:
    """A COCO ``segmentation`` → its polygons (``[x1, y1, x2, y2, ...]``, at least three points each);
    ``[]`` for run-length masks (``iscrowd``) and anything malformed (non-numbers, NaN, infinities)."""
    if not isinstance(segmentation, list):
        return []
    polygons = []
    for poly in segmentation:
        try:
            xy = polygon_coordinates(poly)
        except BoxError:
            continue  # one broken polygon costs its box the outline, not the image its record
        if xy is not None:
            polygons.append(xy)
    return polygons


def _scaled_boxes(path: Path, entry: dict[str, Any] | None) -> list[list[float]]:
    """COCO boxes in pixels of the stored file (header read only, no decoding), each followed by its
    outline (a list of polygons) where COCO has one: ``[x, y, w, h, [[x1, y1, ...], ...]]``
    (:mod:`bonefrac.data.schema`, column ``boxes``).

    Scaled from the size COCO records to the stored size; a box drawn on the EXIF-turned
    image (COCO's size is the displayed one) is first turned back (:mod:`bonefrac.data.exif_boxes`).
    """
    if not entry or not entry["bboxes"]:
        return []
    cw, ch = entry["size"]
    outlines = entry.get("outlines") or [[]] * len(entry["bboxes"])
    as_recorded = [
        [*(round(float(v), 2) for v in b[:4]), *([[[round(c, 2) for c in p] for p in o]] if o else [])]
        for b, o in zip(entry["bboxes"], outlines, strict=True)
    ]
    if not (cw and ch):  # no recorded size: nothing says which frame or scale the boxes are in
        return as_recorded
    try:
        with Image.open(path) as im:
            stored = im.size
            orientation = im.getexif().get(0x0112)
    except Exception:  # unreadable or missing: keep COCO's coordinates; metadata flags the file
        return as_recorded
    turned = annotated_on_display((cw, ch), stored, orientation)
    frame = displayed_size(stored, orientation) if turned else stored
    sx, sy = frame[0] / float(cw), frame[1] / float(ch)

    def to_stored(box: list[float]) -> list[float]:
        box = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
        return [round(v, 2) for v in (box_to_stored(box, orientation, stored) if turned else box)]

    out = []
    for box, polygons in zip(entry["bboxes"], outlines, strict=True):
        # An outline's vertices move as zero-size boxes: one scaling and EXIF turn for both.
        outline = [[c for px, py in zip(p[0::2], p[1::2], strict=True) for c in to_stored([px, py, 0.0, 0.0])[:2]]
                   for p in polygons]  # fmt: skip
        out.append([*to_stored(list(box)), *([outline] if outline else [])])
    return out


# ------------------------------------------------------------------ DICOM de-identification
BURNED_IN_REFUSAL = (
    "BurnedInAnnotation is YES (text burned into the pixels may identify the patient; "
    "set data.allow_burned_in_annotation: true to accept)"
)


def _deidentify(src: Path, dst: Path, cache: IngestCache | None, allow_burned_in: bool) -> dict[str, Any]:
    """:func:`deidentify_file`, or its stored result when the same bytes were de-identified before.

    The cache keeps the de-identified bytes and the pseudonyms, or the error; a file flagged
    with burned-in annotation keeps no pixel copy (its pixels may show a name), so it is
    de-identified again only when burned-in files are accepted.
    """
    if cache is None:
        return deidentify_file(src, dst)
    key = content_sha256(src)
    hit = cache.get("deid", key)
    stored = cache.file("deid", key, ".dcm")
    if hit is not None and "error" in hit:
        raise DicomError(str(hit["error"]))
    if hit is not None and hit["ids"]["burned_in_annotation"] and not allow_burned_in:
        return dict(hit["ids"])  # refused by the caller: nothing to write
    if hit is not None and stored.is_file():
        atomic_link_or_copy(stored, dst)
        return dict(hit["ids"])
    try:
        ids = deidentify_file(src, dst)
    except Exception as err:
        cache.put("deid", key, {"error": str(err) if isinstance(err, DicomError) else type(err).__name__})
        raise
    if not ids["burned_in_annotation"]:
        cache.put_file("deid", key, ".dcm", dst)
    cache.put("deid", key, {"ids": ids})
    return ids


def _deid_rows(
    df: pd.DataFrame,
    deid_dir: Path | None,
    source: str,
    allow_burned_in: bool = False,
    cache: IngestCache | None = None,
) -> pd.DataFrame:
    """Replace every DICOM file (or series folder) by its de-identified copy; fill ids from DICOM.

    Rows keep the pseudonymised SOP-instance id as image_id, and their path points into
    ``deid_dir/<patient>/…``, so neither original identifiers nor original file names
    (which hospitals often build from names) reach the table. A file that looks like DICOM
    but cannot be de-identified, or that declares burned-in annotation (unless
    ``allow_burned_in``), is refused: its row keeps no path and says why. With a ``cache``,
    a file de-identified before is not parsed again (:func:`_deidentify`).
    """
    if df.empty:
        return df
    n_dicom = n_failed = 0
    written: set[Path] = set()
    for idx, row in zip(df.index, df.to_dict("records"), strict=True):  # iterrows: ~1 ms a row
        if row[INTAKE_ERROR]:
            continue
        path = Path(row["path"]) if row["path"] else None
        if path is None or not path.exists():
            continue
        is_series = path.is_dir()
        files = (
            [p for p in sorted(path.rglob("*")) if p.is_file() and _sniff_dicom(p)]
            if is_series
            else ([path] if _sniff_dicom(path) else [])
        )
        if not files:
            continue
        if deid_dir is None:
            raise SourceError(
                f"source {source!r} holds DICOM; pass deid_dir so it is de-identified at ingest "
                "(original identifiers must not reach the table)"
            )
        n_dicom += 1
        first_ids: dict[str, Any] | None = None
        series_dir: Path | None = None
        burned_in = False
        last_error = ""
        copies: list[Path] = []
        for f in files:
            tmp = deid_dir / ".incoming" / f"{os.getpid()}-{pseudonymise(str(f), 'file')}.dcm"
            try:
                ids = _deidentify(f, tmp, cache, allow_burned_in)
            except Exception as err:  # DicomError, or a header pydicom cannot write back
                n_failed += 1
                tmp.unlink(missing_ok=True)
                last_error = str(err) if isinstance(err, DicomError) else type(err).__name__
                continue
            if ids["burned_in_annotation"] and not allow_burned_in:
                tmp.unlink(missing_ok=True)
                burned_in = True
                break
            patient = ids["patient_id"] or "no-patient"
            if is_series:
                series_dir = deid_dir / patient / (ids["series_id"] or ids["study_id"] or "series")
                dst = series_dir / f"{ids['image_id'] or row['image_id']}.dcm"
            else:
                dst = deid_dir / patient / f"{ids['image_id'] or row['image_id']}.dcm"
            k = 2
            while dst in written:  # the same SOP instance twice: keep both copies
                dst = dst.with_name(f"{dst.stem}~{k}.dcm")
                k += 1
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dst)
            written.add(dst)
            copies.append(dst)
            first_ids = first_ids or {**ids, "dst": dst}
        if burned_in or first_ids is None:
            for c in copies:  # a series is refused whole
                c.unlink(missing_ok=True)
            df.at[idx, "path"] = ""
            df.at[idx, INTAKE_ERROR] = _refusal(
                BURNED_IN_REFUSAL if burned_in else f"looks like DICOM but cannot be de-identified ({last_error})"
            )
            continue
        df.at[idx, "path"] = str((series_dir if is_series else first_ids["dst"]).resolve())
        new_id = first_ids["series_id"] if is_series else first_ids["image_id"]
        df.at[idx, "image_id"] = new_id or row["image_id"]
        if not row["patient_id"]:
            df.at[idx, "patient_id"] = first_ids["patient_id"]
        if not row["study_id"]:
            df.at[idx, "study_id"] = first_ids["study_id"]
    incoming = (deid_dir / ".incoming") if deid_dir is not None else None
    if incoming is not None and incoming.is_dir() and not any(incoming.iterdir()):
        incoming.rmdir()
    if n_dicom:
        log.info("de-identified %d DICOM item(s) (%d file(s) unreadable as DICOM)", n_dicom, n_failed)
    return df


def _pseudonymous_copies(df: pd.DataFrame, deid_dir: Path) -> pd.DataFrame:
    """Point every other row of a hospital source at a copy named by its pseudonymous image_id.

    Original file and folder names (often built from patient names) never reach the table:
    non-DICOM files are hard-linked (copied across file systems) to
    ``deid_dir/files/<image_id><suffix>``; DICOM rows already
    point into ``deid_dir``. A row whose file is missing or unreadable keeps no path and
    says why (no file name in the message).
    """
    files_dir = deid_dir / "files"
    deid_real = deid_dir.resolve()
    for idx, row in zip(df.index, df.to_dict("records"), strict=True):  # iterrows: ~1 ms a row
        if row[INTAKE_ERROR]:
            continue
        if not row["path"]:
            df.at[idx, INTAKE_ERROR] = _refusal("no path given")
            continue
        p = Path(row["path"])
        if p.resolve().is_relative_to(deid_real):
            continue  # a de-identified DICOM copy
        error = ""
        if not p.exists():
            error = "listed file not found"
        elif p.is_dir():
            error = "a folder without DICOM files"
        if error:
            df.at[idx, "path"] = ""
            df.at[idx, INTAKE_ERROR] = _refusal(error)
            continue
        name = p.name.lower()
        suffix = ".nii.gz" if name.endswith(".nii.gz") else p.suffix.lower()
        suffix = suffix if suffix in IMAGE_SUFFIXES or suffix == ".nii.gz" else ""
        dst = files_dir / f"{row['image_id']}{suffix}"
        try:
            atomic_link_or_copy(p, dst)  # a hard link where possible: the image is not stored twice
        except OSError as err:
            df.at[idx, "path"] = ""
            df.at[idx, INTAKE_ERROR] = _refusal(f"file not readable ({err.strerror or type(err).__name__})")
            continue
        df.at[idx, "path"] = str(dst.resolve())
    return df


def _fill_from_dicom_headers(df: pd.DataFrame) -> pd.DataFrame:
    """Body part and view from the (de-identified) DICOM headers when the source did not give them."""
    from bonefrac.data.dicom import read_dataset

    for idx, row in zip(df.index, df.to_dict("records"), strict=True):  # iterrows: ~1 ms a row
        if not row["path"]:
            continue
        p = Path(row["path"])
        f = next((x for x in sorted(p.glob("*.dcm"))), None) if p.is_dir() else p
        if f is None or not f.is_file() or not _sniff_dicom(f):
            continue
        try:
            ds = read_dataset(f, stop_before_pixels=True)
        except DicomError:
            continue
        if row["body_part"] in ("", "unknown") and ds.get("BodyPartExamined"):
            term = str(ds.BodyPartExamined).strip().upper()
            df.at[idx, "body_part"] = BODY_PART_TERMS.get(term, term.lower())
        if not row["view"] and ds.get("ViewPosition"):
            df.at[idx, "view"] = _VIEW_POSITIONS.get(str(ds.ViewPosition).strip().upper(), "")
    return df


BODY_PART_REFUSAL = "body part not in data.body_parts (a body_part column value or DICOM BodyPartExamined term)"


def _declared_body_parts(df: pd.DataFrame, vocab: frozenset[str], deid_dir: Path | None) -> pd.DataFrame:
    """Refuse rows whose body part is outside ``vocab``; their value is replaced by "unknown".

    A value outside the declared vocabulary may be free text (a CSV column) and is never
    copied into a table; the reason names the setting, not the value. A copy already made
    in ``deid_dir`` for such a row is removed with its path.
    """
    parts = df["body_part"].str.strip().str.lower()
    outside = ~parts.isin(vocab | {UNKNOWN_BODY_PART})
    df["body_part"] = parts.where(~outside, UNKNOWN_BODY_PART)
    refuse = outside & (df[INTAKE_ERROR] == "")
    deid_real = deid_dir.resolve() if deid_dir is not None else None
    for path in df.loc[refuse, "path"]:
        p = Path(path) if path else None
        if deid_real is None or p is None or not p.resolve().is_relative_to(deid_real):
            continue  # only our own copies are removed, never a source file
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)  # a de-identified series
        else:
            p.unlink(missing_ok=True)
    df.loc[refuse, INTAKE_ERROR] = _refusal(BODY_PART_REFUSAL)
    return df


# ------------------------------------------------------------------ entry point
def load_records(
    source: str,
    root: Path,
    manifest_csv: Path | None = None,
    use_fracture_types: bool = True,
    deid_dir: Path | None = None,
    *,
    fracture_types: Iterable[str] | None = None,
    body_parts: Iterable[str] | None = None,
    allow_burned_in_annotation: bool = False,
    report: IntakeReport | None = None,
    cache: IngestCache | None = None,
) -> pd.DataFrame:
    """Read the source ``source`` at ``root`` into a DataFrame with ``RECORD_COLUMNS`` + ``intake_error``.

    ``manifest_csv`` overrides the default manifest (phantom: ``root/manifest.csv``; csv: a file
    ``root`` or ``root/manifest.csv``; dicom/volume: list items instead of the class folders).
    ``use_fracture_types=False`` blanks fracture types; otherwise they come only from a
    sub-folder of the positive class or a ``fracture_type`` column whose value is in
    ``fracture_types`` (default :data:`KNOWN_FRACTURE_TYPES`); other values refuse the row.
    Body parts (a ``body_part`` column, FracAtlas's flags, a DICOM ``BodyPartExamined`` term)
    must be in ``body_parts`` (default :data:`KNOWN_BODY_PARTS`; ``unknown`` = not given);
    others refuse the row and are not copied.
    ``deid_dir`` receives de-identified copies of every DICOM file and, for the hospital
    sources (:data:`HOSPITAL_SOURCES`, where it is required), pseudonymously named copies of
    every other image; ids there are keyed pseudonyms. A non-empty ``intake_error`` says why
    a row was refused (no path then); ``report`` collects every input's verdict. A hospital
    source read with the development key prints a warning on stderr (every run). ``cache``
    keeps de-identified DICOM per content (:mod:`bonefrac.data.ingest_cache`).
    Raises :class:`SourceError` for a layout that does not match ``source``.
    """
    root = Path(root)
    manifest = Path(manifest_csv) if manifest_csv else None
    rep = report if report is not None else IntakeReport()
    vocab = (
        frozenset(t.strip().lower() for t in (fracture_types or KNOWN_FRACTURE_TYPES))
        if use_fracture_types
        else None
    )
    if source not in SOURCES:
        raise SourceError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if source in HOSPITAL_SOURCES and deid_dir is None:
        raise SourceError(
            f"source {source!r} needs deid_dir for the de-identified DICOM copies and the "
            "pseudonymously named copies of other images"
        )
    if source in HOSPITAL_SOURCES:
        warn_if_dev_key()  # on every run that makes pseudonyms with the public key
    if source == "phantom":
        rows = _csv_rows(manifest or root / "manifest.csv", vocab, False, rep)
    elif source == "csv":
        csv_path = manifest or (root if root.is_file() else root / "manifest.csv")
        data_root = root if root.is_dir() else csv_path.parent
        rows = _csv_rows(csv_path, vocab, True, rep, data_root=data_root)
    elif source == "imagefolder":
        rows = _imagefolder(root, vocab, rep)
    elif source == "fracatlas":
        rows = _fracatlas(root)
    elif source in ("dicom", "volume"):
        rows = (
            _csv_rows(manifest, vocab, True, rep, data_root=root)
            if manifest
            else _imagefolder(root, vocab, rep, volumes=source == "volume")
        )
    rep.seen += len(rows)
    df = _frame(rows)
    if source != "fracatlas":  # FracAtlas is JPEG by definition: skip sniffing 2,860 files
        deid = Path(deid_dir) if deid_dir is not None else None
        df = _deid_rows(df, deid, source, allow_burned_in=allow_burned_in_annotation, cache=cache)
        df = _unique_ids(df)
        if source in HOSPITAL_SOURCES and deid is not None:
            df = _pseudonymous_copies(df, deid)
        df = _fill_from_dicom_headers(df)
    body_vocab = frozenset(b.strip().lower() for b in (body_parts or KNOWN_BODY_PARTS))
    df = _declared_body_parts(df, body_vocab, Path(deid_dir) if deid_dir is not None else None)
    df.loc[df[INTAKE_ERROR] != "", "path"] = ""  # refused rows keep no path: it may identify
    rep.refused.update(
        e[len(INTAKE_REFUSED):] if e.startswith(INTAKE_REFUSED) else e for e in df[INTAKE_ERROR] if e
    )
    missing = int((~df["path"].map(lambda p: bool(p) and Path(p).exists())).sum()) - sum(rep.refused.values())
    if missing > 0:
        log.warning(
            "%s: %d record(s) point to missing files (kept; marked undecodable at ingest)", source, missing
        )
    return df.reset_index(drop=True)

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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from bonefrac.data.deid import deidentify_file, pseudonymise
from bonefrac.data.dicom import DicomError, looks_like_dicom
from bonefrac.data.schema import RECORD_COLUMNS
from bonefrac.errors import BonefracError

log = logging.getLogger(__name__)

SOURCES = ("phantom", "imagefolder", "csv", "fracatlas", "dicom", "volume")

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
# DICOM BodyPartExamined (CID 4031 terms) -> the project's body-part vocabulary; unlisted terms
# pass through lower-cased, so validation flags them instead of this module guessing.
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
    }
    rec.update({k: v for k, v in kw.items() if k in rec})
    return rec


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    for col in ("label", "hardware"):
        df[col] = pd.to_numeric(df[col], errors="coerce").fillna(-1).astype(int)
    for col in ("image_id", "path", "fracture_type", "body_part", "view", "patient_id", "study_id", "boxes"):
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


def _class_folders(root: Path) -> list[tuple[Path, int]]:
    if not root.is_dir():
        raise SourceError(f"data root {root} is not a folder")
    out: list[tuple[Path, int]] = []
    unknown: list[str] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = _class_of(d.name)
        if label is None:
            unknown.append(d.name)
        else:
            out.append((d, label))
    if not out:
        raise SourceError(
            f"{root}: no class folders found (expected e.g. Fractured/ and Non_fractured/, "
            "fracture/ and normal/, "
            f"1/ and 0/); sub-folders seen: {unknown or 'none'}"
        )
    if unknown:
        log.warning("ignoring %d folder(s) that name no class: %s", len(unknown), ", ".join(unknown))
    return out


def _sniff_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return looks_like_dicom(fh.read(132))
    except OSError:
        return False


# ------------------------------------------------------------------ layouts
def _imagefolder(root: Path, use_fracture_types: bool, volumes: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for class_dir, label in _class_folders(root):
        for item, ftype in _items_in_class(class_dir, label, volumes):
            rel = item.relative_to(root).as_posix()
            rows.append(
                _record(
                    image_id=rel,
                    path=str(item.resolve()),
                    label=label,
                    fracture_type=ftype if (use_fracture_types and label == 1) else "",
                )
            )
    return rows


def _items_in_class(class_dir: Path, label: int, volumes: bool) -> Iterable[tuple[Path, str]]:
    """Images (or volumes) under a class folder with their fracture type ("" when none).

    For volumes, a folder that directly holds DICOM files is one series; any other
    folder only groups items (and directly under the positive class, names the type).
    """
    if not volumes:
        for f in _files_under(class_dir):
            rel = f.relative_to(class_dir).parts
            yield f, (rel[0].lower() if len(rel) > 1 and label == 1 else "")
        return

    def walk(folder: Path, ftype: str) -> Iterable[tuple[Path, str]]:
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
        if any(_sniff_dicom(p) for p in files):
            yield folder, ftype
            return
        for p in files:
            if p.name.lower().endswith((".nii", ".nii.gz")):
                yield p, ftype
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            yield from walk(d, ftype or (d.name.lower() if folder == class_dir and label == 1 else ""))

    yield from walk(class_dir, "")


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


def _csv_rows(csv_path: Path, use_fracture_types: bool, pseudonymise_ids: bool) -> list[dict[str, Any]]:
    df = _read_csv(csv_path)
    base = csv_path.parent
    rows: list[dict[str, Any]] = []
    bad_labels = 0
    for i, r in enumerate(df.to_dict("records")):
        raw_path = str(r.get("path", "")).strip()
        p = Path(raw_path)
        path = str((p if p.is_absolute() else base / p).resolve()) if raw_path else ""
        label = parse_label(r.get("label", ""))
        bad_labels += label == -1
        patient, study = str(r.get("patient_id", "")).strip(), str(r.get("study_id", "")).strip()
        if pseudonymise_ids:
            patient, study = pseudonymise(patient, "patient"), pseudonymise(study, "study")
        boxes = str(r.get("boxes", "") or "[]")
        try:
            json.loads(boxes)
        except ValueError:
            boxes = "[]"
        hardware = pd.to_numeric(r.get("hardware", -1), errors="coerce")
        rows.append(
            _record(
                image_id=str(r.get("image_id", "") or "").strip()
                or (p.as_posix() if raw_path else f"row{i}"),
                path=path,
                label=label,
                fracture_type=str(r.get("fracture_type", "")).strip().lower()
                if use_fracture_types and label == 1
                else "",
                body_part=str(r.get("body_part", "")).strip().lower() or "unknown",
                view=str(r.get("view", "")).strip().lower(),
                patient_id=patient,
                study_id=study,
                boxes=boxes,
                hardware=-1 if pd.isna(hardware) else int(hardware),
            )
        )
    if bad_labels:
        log.warning("%s: %d row(s) with an unreadable label (kept with label -1)", csv_path.name, bad_labels)
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
    """file name → {"size": (w, h) recorded by COCO, "bboxes": [[x, y, w, h], ...]}."""
    if not coco_path.is_file():
        log.warning("%s missing: no fracture boxes", coco_path)
        return {}
    try:
        coco = json.loads(coco_path.read_text())
    except ValueError as err:
        raise SourceError(f"{coco_path}: not valid JSON ({err})") from None
    by_id = {im["id"]: im for im in coco.get("images", [])}
    out: dict[str, dict[str, Any]] = {
        im["file_name"]: {"size": (im.get("width"), im.get("height")), "bboxes": []} for im in by_id.values()
    }
    for ann in coco.get("annotations", []):
        im = by_id.get(ann.get("image_id"))
        if im is not None and ann.get("bbox"):
            out[im["file_name"]]["bboxes"].append([float(v) for v in ann["bbox"]])
    return out


def _scaled_boxes(path: Path, entry: dict[str, Any] | None) -> list[list[float]]:
    """COCO boxes in pixels of the stored file (header read only, no decoding)."""
    if not entry or not entry["bboxes"]:
        return []
    sx = sy = 1.0
    cw, ch = entry["size"]
    if cw and ch:
        try:
            with Image.open(path) as im:
                w, h = im.size
            sx, sy = w / float(cw), h / float(ch)
        except Exception:  # unreadable or missing: keep COCO's coordinates; metadata flags the file
            pass
    return [
        [round(x * sx, 2), round(y * sy, 2), round(bw * sx, 2), round(bh * sy, 2)]
        for x, y, bw, bh in entry["bboxes"]
    ]


# ------------------------------------------------------------------ DICOM de-identification
def _deid_rows(df: pd.DataFrame, deid_dir: Path | None, source: str) -> pd.DataFrame:
    """Replace every DICOM file (or series folder) by its de-identified copy; fill ids from DICOM.

    Rows keep the pseudonymised SOP-instance id as image_id, and their path points into
    ``deid_dir/<patient>/…``, so neither original identifiers nor original file names
    (which hospitals often build from names) reach the table.
    """
    if df.empty:
        return df
    n_dicom = n_failed = 0
    written: set[Path] = set()
    for idx, row in df.iterrows():
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
        for f in files:
            tmp = deid_dir / ".incoming" / f"{os.getpid()}-{pseudonymise(str(f), 'file')}.dcm"
            try:
                ids = deidentify_file(f, tmp)
            except DicomError:
                n_failed += 1
                tmp.unlink(missing_ok=True)
                continue
            patient = ids["patient_id"] or "no-patient"
            if is_series:
                series_dir = deid_dir / patient / (ids["series_id"] or ids["study_id"] or "series")
                dst = series_dir / f"{ids['image_id']}.dcm"
            else:
                dst = deid_dir / patient / f"{ids['image_id']}.dcm"
            k = 2
            while dst in written:  # the same SOP instance twice: keep both copies
                dst = dst.with_name(f"{dst.stem}~{k}.dcm")
                k += 1
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dst)
            written.add(dst)
            first_ids = first_ids or {**ids, "dst": dst}
        if first_ids is None:
            continue
        df.at[idx, "path"] = str((series_dir if is_series else first_ids["dst"]).resolve())
        df.at[idx, "image_id"] = first_ids["series_id"] if is_series else first_ids["image_id"]
        if not row["patient_id"]:
            df.at[idx, "patient_id"] = first_ids["patient_id"]
        if not row["study_id"]:
            df.at[idx, "study_id"] = first_ids["study_id"]
    incoming = (deid_dir / ".incoming") if deid_dir is not None else None
    if incoming is not None and incoming.is_dir() and not any(incoming.iterdir()):
        incoming.rmdir()
    if n_dicom:
        log.info(
            "de-identified %d DICOM item(s) into %s (%d file(s) unreadable as DICOM)",
            n_dicom,
            deid_dir,
            n_failed,
        )
    return df


def _fill_from_dicom_headers(df: pd.DataFrame) -> pd.DataFrame:
    """Body part and view from the (de-identified) DICOM headers when the source did not give them."""
    from bonefrac.data.dicom import read_dataset

    for idx, row in df.iterrows():
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


# ------------------------------------------------------------------ entry point
def load_records(
    source: str,
    root: Path,
    manifest_csv: Path | None = None,
    use_fracture_types: bool = True,
    deid_dir: Path | None = None,
) -> pd.DataFrame:
    """Read the source ``source`` at ``root`` into a DataFrame with exactly ``RECORD_COLUMNS``.

    ``manifest_csv`` overrides the default manifest (phantom: ``root/manifest.csv``; csv: a file
    ``root`` or ``root/manifest.csv``; dicom/volume: list items instead of the class folders).
    ``use_fracture_types=False`` blanks fracture types. ``deid_dir`` receives de-identified
    copies of every DICOM file; it is required whenever the source holds DICOM.
    Raises :class:`SourceError` for a layout that does not match ``source``.
    """
    root = Path(root)
    manifest = Path(manifest_csv) if manifest_csv else None
    if source not in SOURCES:
        raise SourceError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "phantom":
        rows = _csv_rows(manifest or root / "manifest.csv", use_fracture_types, pseudonymise_ids=False)
    elif source == "csv":
        rows = _csv_rows(
            manifest or (root if root.is_file() else root / "manifest.csv"),
            use_fracture_types,
            pseudonymise_ids=True,
        )
    elif source == "imagefolder":
        rows = _imagefolder(root, use_fracture_types)
    elif source == "fracatlas":
        rows = _fracatlas(root)
    elif source in ("dicom", "volume"):
        if deid_dir is None:
            raise SourceError(f"source {source!r} needs deid_dir for the de-identified DICOM copies")
        rows = (
            _csv_rows(manifest, use_fracture_types, pseudonymise_ids=True)
            if manifest
            else _imagefolder(root, use_fracture_types, volumes=source == "volume")
        )
    df = _frame(rows)
    if source != "fracatlas":  # FracAtlas is JPEG by definition: skip sniffing 2,860 files
        df = _deid_rows(df, Path(deid_dir) if deid_dir is not None else None, source)
        df = _fill_from_dicom_headers(df)
        df = _unique_ids(df)
    missing = int((~df["path"].map(lambda p: bool(p) and Path(p).exists())).sum())
    if missing:
        log.warning(
            "%s: %d record(s) point to missing files (kept; marked undecodable at ingest)", source, missing
        )
    return df.reset_index(drop=True)

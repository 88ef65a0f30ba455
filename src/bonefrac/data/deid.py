"""De-identify DICOM at ingest (DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile).

The profile is driven by the standard's own table: PS3.15 Table E.1-1 as shipped by
``dicom-anonymizer`` (:data:`TABLE_PACKAGE`, edition :data:`TABLE_EDITION`), read as data,
attribute → allowed actions. This module applies

1. the table's action for every attribute it names, at every depth of sequences
   (``X`` remove, ``Z`` empty, ``D`` dummy value of the VR, ``U`` keyed UID remap; where
   several are allowed the most protective, see :func:`applied_action`),
2. for attributes the table does not name (``K``), rules by value representation: every
   person name (PN) emptied, every date/time (DA, DT, TM) emptied, every instance UID (UI
   not in pydicom's registry of standard UIDs) remapped with a keyed hash,
3. private tags, curves (50xx) and overlays (60xx) removed,
4. a final sweep: any text element still containing one of the file's original
   identifiers (e.g. a name typed into a comment) is emptied,
5. ``PatientIdentityRemoved = YES`` and ``DeidentificationMethod`` (+ code 113100) set.

Pseudonyms are HMAC-SHA256 of the original value with a secret key, so the same
patient, study or UID maps to the same pseudonym in every file and every run
(series stay consistent, splits group correctly) while the original cannot be
recovered without the key. The key comes from the environment variable
``BONEFRAC_DEID_KEY``; :data:`DEV_KEY` is used when it is unset, which is fine
for development and public data but **must be replaced for hospital data**
(anyone with the default key can test guesses against the pseudonyms).

Pixel data is not inspected: images flagged ``BurnedInAnnotation = YES`` are
reported by :func:`deidentify_file` so the caller can decide.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from bonefrac.atomic import atomic_write_bytes
from bonefrac.data.dicom import read_dataset

log = logging.getLogger(__name__)

KEY_ENV = "BONEFRAC_DEID_KEY"
DEV_KEY = "bonefrac-development-key-not-secret"  # documented default; set BONEFRAC_DEID_KEY in production
METHOD = "DICOM PS3.15 E.1 basic profile (bonefrac, HMAC pseudonyms)"  # LO: at most 64 chars

# Prefixes make pseudonyms readable in tables ("P-…" patient, "S-…" study).
_PREFIX = {"patient": "P", "study": "S", "series": "R", "image": "I", "uid": "U"}

# PS3.15 Table E.1-1 (basic profile column) as data: dicom-anonymizer ships the table, parsed
# from the standard, per edition; this edition is pinned with the package in requirements.lock.
TABLE_PACKAGE = "dicom-anonymizer==2.1.0"
TABLE_EDITION = "dicomfields_2026c"
# The package's categories → the actions the standard allows for the attribute.
_CATEGORY_ACTIONS: dict[str, str] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "ZD",
    "X_Z_TAGS": "XZ",
    "X_D_TAGS": "XD",
    "X_Z_D_TAGS": "XZD",
    "X_Z_U_STAR_TAGS": "XZU",
}


def _load_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """``{tag: allowed actions}`` and the masked entries ``(group, elem, gmask, emask, actions)``."""
    import importlib

    mod = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.{TABLE_EDITION}")
    table: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, actions in _CATEGORY_ACTIONS.items():
        for entry in getattr(mod, category):
            if len(entry) == 4:
                masked.append((*entry, actions))
            else:
                table[(entry[0] << 16) | entry[1]] = actions
    return table, masked


E1_1_ACTIONS, E1_1_MASKED = _load_table()


def applied_action(tag: int) -> str:
    """The one action this module applies to ``tag`` under Table E.1-1 ("" when not in the table).

    Where the standard allows several, the most protective is applied: remove (X) when
    allowed, else empty (Z), else dummy (D) or UID remap (U). PatientID (Z or D) is the
    exception: it gets the patient pseudonym (a D) so copies of one patient stay grouped.
    """
    actions = E1_1_ACTIONS.get(int(tag), "")
    if not actions:
        for group, elem, gmask, emask, _acts in E1_1_MASKED:
            if (tag >> 16) & gmask == group and (tag & 0xFFFF) & emask == elem:
                return "X"  # curves (50xx) and overlays (60xx): removed whole, see _clean
        return ""
    for a in "XZ":
        if a in actions:
            return a
    return actions[0]


_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT", "UR"}
)
_DATE_VRS = frozenset({"DA", "DT", "TM"})
# Original values the final sweep looks for (too-short values would match by accident).
_SWEEP_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "AccessionNumber",
    "StudyID",
    "StationName",
)


def _key() -> bytes:
    return os.environ.get(KEY_ENV, DEV_KEY).encode()


def warn_if_dev_key(stream: Any = None) -> bool:
    """Print a warning (stderr, not a log: seen whatever the log level) when the public key is in use.

    Called by every ingest run; returns whether it warned.
    """
    if not using_dev_key():
        return False
    import sys

    (stream or sys.stderr).write(
        f"WARNING: {KEY_ENV} is not set: pseudonyms use the public development key; anyone can "
        "test guesses against them. Set a secret key before ingesting hospital data.\n"
    )
    return True


def using_dev_key() -> bool:
    """True when ``BONEFRAC_DEID_KEY`` is unset (pseudonyms then use the public development key)."""
    return not os.environ.get(KEY_ENV)


def _digest(value: str, kind: str) -> str:
    # surrogatepass: a file name that is not valid UTF-8 (os gives lone surrogates) still hashes
    data = f"{kind}\x00{value}".encode("utf-8", "surrogatepass")
    return hmac.new(_key(), data, hashlib.sha256).hexdigest()


def pseudonymise(value: str, kind: str) -> str:
    """Stable pseudonym for an identifier, e.g. ``pseudonymise("PHI-123456", "patient") -> "P-3f9a…"``.

    Same value, kind and key → same pseudonym, in every process and run. ``kind``
    separates name spaces (a patient id and a study id with equal text get different
    pseudonyms). An empty value stays empty: "unknown" must not become one shared group.
    """
    value = str(value).strip()
    if not value:
        return ""
    prefix = _PREFIX.get(kind, kind[:1].upper() or "X")
    return f"{prefix}-{_digest(value, kind)[:16]}"


def remap_uid(uid: str) -> str:
    """Keyed, consistent replacement of an instance UID, as a ``2.25.<128-bit integer>`` UID."""
    return "2.25." + str(int(_digest(str(uid), "uid")[:32], 16))


def _is_standard_uid(uid: str) -> bool:
    """SOP classes, transfer syntaxes, coding schemes: registered UIDs identify no one."""
    return str(uid) in UID_dictionary


def _strings(value: Any) -> Iterable[str]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value.decode(errors="ignore") if isinstance(value, bytes) else value]
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]


def _original_identifiers(ds: Dataset) -> set[str]:
    found: set[str] = set()
    for kw in _SWEEP_KEYWORDS:
        for v in _strings(ds.get(kw)):
            v = v.strip()
            if len(v) >= 4:
                found.add(v)
                # Name components ("DOE^JANE" -> "DOE", "JANE") are found too if long enough.
                found.update(p for p in v.replace("^", " ").split() if len(p) >= 4)
    return found


_BYTES_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"})
_DUMMY_FIXED = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "PN": "ANONYMOUS",
                "IS": "0", "DS": "0", "UR": "urn:bonefrac:removed"}


def _dummy(elem: Any) -> Any:
    """A non-empty value of the element's VR that says nothing: D in Table E.1-1."""
    vr = elem.VR
    if vr == "UI":
        vals = [v for v in _strings(elem.value) if v]
        new = [v if _is_standard_uid(v) else remap_uid(v) for v in vals] or [remap_uid("dummy")]
        return new[0] if len(new) == 1 else new
    if vr in _DUMMY_FIXED:
        return _DUMMY_FIXED[vr]
    if vr in _BYTES_VRS:
        return b"\x00\x00"
    if vr in _NUMBER_VRS:
        return 0
    # text VRs (AE, CS, LO, LT, SH, ST, UC, UT): a keyed hash of the value, 12 chars (fits AE/CS/SH)
    original = " ".join(_strings(elem.value))
    return "ANON" + _digest(original, "dummy")[:8].upper()


def _empty(elem: Any) -> Any:
    if elem.VR == "SQ":
        return Sequence([])
    if elem.VR in _BYTES_VRS:
        return b""
    return "" if elem.VR in _TEXT_VRS or elem.VR in ("UI", "UR") else None


def _dummy_sequence(seq: Sequence) -> None:
    """D on a sequence: every value inside replaced by a dummy, at every depth."""
    for item in seq:
        item.remove_private_tags()
        for elem in list(item):
            if elem.VR == "SQ":
                _dummy_sequence(elem.value or [])
            else:
                elem.value = _dummy(elem)


def _clean(ds: Dataset, originals: set[str]) -> None:
    """Apply the profile to one dataset level, recursing into sequences.

    Table E.1-1 first (see :func:`applied_action`); attributes the table does not name are
    kept (K) except: person names (PN) emptied, dates/times emptied, instance UIDs remapped,
    private tags, curves (50xx) and overlays (60xx) removed, and any text still holding one
    of the file's original identifiers emptied.
    """
    ds.remove_private_tags()
    for elem in list(ds):
        tag = elem.tag
        if tag.group & 0xFF00 in (0x5000, 0x6000):
            del ds[tag]
            continue
        action = applied_action(tag)
        if action == "X":
            del ds[tag]
            continue
        if action == "Z":
            elem.value = _empty(elem)
            continue
        if action == "D" and elem.VR == "SQ":
            _dummy_sequence(elem.value or [])
            continue
        if action in ("D", "U"):
            elem.value = _dummy(elem)  # for UI, the keyed remap
            continue
        if elem.VR == "SQ":
            for item in elem.value or []:
                _clean(item, originals)
            continue
        # Not in the table (K), but never kept: person names, dates and times.
        if elem.VR in _DATE_VRS or elem.VR == "PN":
            elem.value = ""
            continue
        if elem.VR == "UI" and elem.value:
            vals = list(_strings(elem.value))
            new = [v if _is_standard_uid(v) else remap_uid(v) for v in vals]
            elem.value = new[0] if len(new) == 1 else new
            continue
        if elem.VR in _TEXT_VRS and originals:
            text = " ".join(_strings(elem.value)).upper()
            if any(o.upper() in text for o in originals):
                elem.value = ""


def deidentify_dataset(ds: Dataset) -> Dataset:
    """De-identify ``ds`` in place (basic profile, see module docstring) and return it.

    PatientName and PatientID become the patient pseudonym (from PatientID, or the
    name when there is no ID); all instance UIDs, including the file meta's, are remapped
    consistently; PatientIdentityRemoved and DeidentificationMethod are set.
    """
    originals = _original_identifiers(ds)
    patient_src = str(ds.get("PatientID", "") or "").strip() or str(ds.get("PatientName", "") or "").strip()
    patient = pseudonymise(patient_src, "patient")
    _clean(ds, originals)
    ds.PatientName = patient
    ds.PatientID = patient
    fm = getattr(ds, "file_meta", None)
    if fm is not None:
        if "MediaStorageSOPInstanceUID" in fm and not _is_standard_uid(fm.MediaStorageSOPInstanceUID):
            fm.MediaStorageSOPInstanceUID = remap_uid(fm.MediaStorageSOPInstanceUID)
        for kw in (
            "SourceApplicationEntityTitle",
            "SendingApplicationEntityTitle",
            "ReceivingApplicationEntityTitle",
        ):
            if kw in fm:
                del fm[kw]
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    return ds


def deidentify_file(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write a de-identified copy of DICOM ``src`` at ``dst`` (atomically) and return its pseudonyms.

    Returns ``{"patient_id", "study_id", "series_id", "image_id", "burned_in_annotation"}``,
    the ids being pseudonyms (``""`` when the file had no such identifier). Raises
    :class:`bonefrac.data.dicom.DicomError` when ``src`` is not DICOM. The original is untouched.
    """
    ds = read_dataset(src)
    patient_src = str(ds.get("PatientID", "") or "").strip() or str(ds.get("PatientName", "") or "").strip()
    ids = {
        "patient_id": pseudonymise(patient_src, "patient"),
        "study_id": pseudonymise(str(ds.get("StudyInstanceUID", "") or ""), "study"),
        "series_id": pseudonymise(str(ds.get("SeriesInstanceUID", "") or ""), "series"),
        "image_id": pseudonymise(str(ds.get("SOPInstanceUID", "") or ""), "image"),
        "burned_in_annotation": str(ds.get("BurnedInAnnotation", "")).upper() == "YES",
    }
    deidentify_dataset(ds)
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)  # Part-10 file: preamble + file meta
    except (AttributeError, ValueError):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)  # e.g. a preamble-less source without SOP UIDs
    atomic_write_bytes(dst, buf.getvalue())
    return ids

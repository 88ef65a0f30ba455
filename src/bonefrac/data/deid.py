"""De-identify DICOM at ingest (DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile).

Why by hand on top of pydicom: pydicom reads and writes the attributes but ships
no de-identification profile, and the dedicated packages are not among this
project's dependencies. The profile is implemented here as

1. explicit actions for the attributes of PS3.15 Table E.1-1 that carry identity
   (``D`` replace with a pseudonym, ``Z`` empty, ``X`` remove), then
2. rules by value representation, so attributes the table names by the dozen are
   not missed: every person name (PN) is emptied, every date/time (DA, DT, TM)
   emptied, every instance UID (UI not in pydicom's registry of standard UIDs)
   remapped with a keyed hash, recursively inside sequences,
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
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from bonefrac.data.dicom import read_dataset

log = logging.getLogger(__name__)

KEY_ENV = "BONEFRAC_DEID_KEY"
DEV_KEY = "bonefrac-development-key-not-secret"  # documented default; set BONEFRAC_DEID_KEY in production
METHOD = "DICOM PS3.15 E.1 basic profile (bonefrac, HMAC pseudonyms)"  # LO: at most 64 chars

# Prefixes make pseudonyms readable in tables ("P-…" patient, "S-…" study).
_PREFIX = {"patient": "P", "study": "S", "series": "R", "image": "I", "uid": "U"}

# PS3.15 Table E.1-1, basic profile column: Z (zero length) and D (dummy) actions.
_ZERO: tuple[str, ...] = (
    "AccessionNumber",
    "ContentCreatorName",
    "FillerOrderNumberImagingServiceRequest",
    "PatientBirthDate",
    "PatientSex",
    "PlacerOrderNumberImagingServiceRequest",
    "ReferringPhysicianName",
    "StudyID",
    "VerifyingObserverName",
    "StudyDate",
    "StudyTime",
)
# X (remove).
_REMOVE: tuple[str, ...] = (
    "AcquisitionComments",
    "AcquisitionProtocolDescription",
    "ActualHumanPerformersSequence",
    "AdditionalPatientHistory",
    "AdmissionID",
    "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "AuthorObserverSequence",
    "BranchOfService",
    "CassetteID",
    "ConfidentialityConstraintOnPatientDataDescription",
    "ContentCreatorIdentificationCodeSequence",
    "ContributionDescription",
    "CountryOfResidence",
    "CurrentPatientLocation",
    "CustodialOrganizationSequence",
    "DataSetTrailingPadding",
    "DerivationDescription",
    "DetectorID",
    "DeviceSerialNumber",
    "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription",
    "DistributionAddress",
    "DistributionName",
    "FrameComments",
    "GantryID",
    "GeneratorID",
    "HumanPerformerName",
    "HumanPerformerOrganization",
    "IconImageSequence",
    "IdentifyingComments",
    "ImageComments",
    "ImagePresentationComments",
    "ImagingServiceRequestComments",
    "Impressions",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionCodeSequence",
    "InstitutionName",
    "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence",
    "InterpretationApproverSequence",
    "InterpretationAuthor",
    "InterpretationDiagnosisDescription",
    "InterpretationIDIssuer",
    "InterpretationRecorder",
    "InterpretationText",
    "InterpretationTranscriber",
    "IssuerOfAdmissionID",
    "IssuerOfPatientID",
    "IssuerOfServiceEpisodeID",
    "MedicalAlerts",
    "MedicalRecordLocator",
    "MilitaryRank",
    "ModifiedAttributesSequence",
    "ModifiedImageDescription",
    "ModifyingDeviceID",
    "NameOfPhysiciansReadingStudy",
    "NamesOfIntendedRecipientsOfResults",
    "Occupation",
    "OperatorIdentificationSequence",
    "OperatorsName",
    "OriginalAttributesSequence",
    "OrderCallbackPhoneNumber",
    "OrderEnteredBy",
    "OrderEntererLocation",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "ParticipantSequence",
    "PatientAddress",
    "PatientAge",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientComments",
    "PatientInstitutionResidence",
    "PatientInsurancePlanCodeSequence",
    "PatientMotherBirthName",
    "PatientPrimaryLanguageCodeSequence",
    "PatientReligiousPreference",
    "PatientSexNeutered",
    "PatientSize",
    "PatientState",
    "PatientTelephoneNumbers",
    "PatientWeight",
    "EthnicGroup",
    "PerformedLocation",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName",
    "PerformedStationNameCodeSequence",
    "PerformingPhysicianIdentificationSequence",
    "PerformingPhysicianName",
    "PersonAddress",
    "PersonTelephoneNumbers",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence",
    "PlateID",
    "PreMedication",
    "PregnancyStatus",
    "ProtocolName",
    "ReasonForStudy",
    "ReasonForTheImagingServiceRequest",
    "ReferencedPatientAliasSequence",
    "ReferencedPatientSequence",
    "ReferencedPerformedProcedureStepSequence",
    "ReferencedStudySequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence",
    "RequestAttributesSequence",
    "RequestedContrastAgent",
    "RequestedProcedureComments",
    "RequestedProcedureDescription",
    "RequestedProcedureID",
    "RequestedProcedureLocation",
    "RequestingPhysician",
    "RequestingService",
    "ResponsibleOrganization",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResultsComments",
    "ResultsDistributionListSequence",
    "ResultsIDIssuer",
    "ReviewerName",
    "ScheduledHumanPerformersSequence",
    "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepLocation",
    "ScheduledStationAETitle",
    "ScheduledStationName",
    "SeriesDescription",
    "ServiceEpisodeDescription",
    "ServiceEpisodeID",
    "SmokingStatus",
    "SpecialNeeds",
    "StationName",
    "StudyComments",
    "StudyDescription",
    "StudyIDIssuer",
    "TextComments",
    "TextString",
    "TopicAuthor",
    "TopicKeywords",
    "TopicSubject",
    "TopicTitle",
    "VerifyingOrganization",
    "VisitComments",
)
_ZERO_TAGS = frozenset(t for t in (tag_for_keyword(k) for k in _ZERO) if t is not None)
_REMOVE_TAGS = frozenset(t for t in (tag_for_keyword(k) for k in _REMOVE) if t is not None)
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


def using_dev_key() -> bool:
    """True when ``BONEFRAC_DEID_KEY`` is unset (pseudonyms then use the public development key)."""
    return not os.environ.get(KEY_ENV)


def _digest(value: str, kind: str) -> str:
    return hmac.new(_key(), f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()


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


def _clean(ds: Dataset, originals: set[str]) -> None:
    """Apply the profile to one dataset level, recursing into sequences."""
    ds.remove_private_tags()
    for elem in list(ds):
        tag = elem.tag
        if tag in _REMOVE_TAGS or tag.group & 0xFF00 in (0x5000, 0x6000):
            del ds[tag]
            continue
        if elem.VR == "SQ":
            for item in elem.value or []:
                _clean(item, originals)
            continue
        # Every person name is emptied, at every level; the top-level PatientName gets its pseudonym after.
        if tag in _ZERO_TAGS or elem.VR in _DATE_VRS or elem.VR == "PN":
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
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".deid-", suffix=".dcm")
    os.close(fd)
    try:
        try:
            ds.save_as(tmp, enforce_file_format=True)  # Part-10 file: preamble + file meta
        except (AttributeError, ValueError):
            ds.save_as(tmp, enforce_file_format=False)  # e.g. a preamble-less source without SOP UIDs
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ids

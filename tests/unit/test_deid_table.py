"""Every attribute of PS3.15 Table E.1-1 gets the action the table allows, checked one by one.

A dataset holds each attribute of the table with a made-up value (and once more inside a
sequence item), is de-identified, and each attribute is compared with its allowed actions.
"""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from bonefrac.data.deid import (
    E1_1_ACTIONS,
    E1_1_MASKED,
    TABLE_EDITION,
    applied_action,
    deidentify_dataset,
    remap_uid,
)

FAKE_TEXT = "FAKEPHI77"
FAKE_UID = "1.2.3.777.4242"


def _vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:  # newer than pydicom's dictionary: the table still applies by tag
        return "LO"
    return vr.split(" or ")[0]


def _fake(tag: int, vr: str):
    if vr == "SQ":
        item = Dataset()
        item.CodeMeaning = FAKE_TEXT  # K inside, but the sequence's own action governs
        item.PersonName = FAKE_TEXT  # (0040,A123) D
        return Sequence([item])
    if vr == "UI":
        return FAKE_UID
    if vr in ("DA",):
        return "20230102"
    if vr == "TM":
        return "101112"
    if vr == "DT":
        return "20230102101112"
    if vr in ("US", "SS", "UL", "SL"):
        return 77
    if vr in ("FL", "FD"):
        return 7.7
    if vr in ("DS", "IS"):
        return "77"
    if vr == "AS":
        return "077Y"
    if vr in ("OB", "OW", "UN"):
        return FAKE_TEXT.encode()
    if vr in ("AE", "CS", "SH"):
        return FAKE_TEXT
    return FAKE_TEXT


def _attribute_tags() -> list[int]:
    # group 0000 (commands) and 0002 (file meta) never sit in a data set; 0002's one entry is
    # checked by test_deid.test_deidentify_file_removes_every_identifier.
    return sorted(t for t in E1_1_ACTIONS if t >> 16 not in (0x0000, 0x0002))


def _build() -> Dataset:
    ds = Dataset()
    for tag in _attribute_tags():
        vr = _vr(tag)
        ds.add(DataElement(tag, vr, _fake(tag, vr)))
    return ds


def _observed(before: DataElement, after: DataElement | None) -> str:
    """X (gone), Z (empty), U (UID remapped), D (changed to another non-empty value), K (unchanged)."""
    if after is None:
        return "X"
    v = after.value
    if v is None or (hasattr(v, "__len__") and len(v) == 0):
        return "Z"
    if after.VR == "UI":
        return "U" if v == remap_uid(FAKE_UID) else ("K" if v == FAKE_UID else "D")
    if after.VR == "SQ":
        text = str(v)
        return "K" if FAKE_TEXT in text else "D"
    return "K" if v == before.value else "D"


def test_table_is_loaded_from_the_package():
    assert TABLE_EDITION.startswith("dicomfields_")
    assert len(E1_1_ACTIONS) > 600 and E1_1_MASKED
    assert E1_1_ACTIONS[0x00100010] == "Z"  # Patient's Name
    assert E1_1_ACTIONS[0x00100020] == "ZD"  # Patient ID
    assert E1_1_ACTIONS[0x0020000D] == "U"  # Study Instance UID
    assert set("".join(E1_1_ACTIONS.values())) <= set("DZXU")


def test_every_table_attribute_gets_an_allowed_action():
    ds = _build()
    before = {e.tag: copy.deepcopy(e) for e in ds}  # de-identification works in place
    nested = Dataset()
    nested.add(DataElement(0x00081115, "SQ", Sequence([_build()])))  # ReferencedSeriesSequence (K)
    deidentify_dataset(ds)
    deidentify_dataset(nested)
    item = nested.ReferencedSeriesSequence[0]
    wrong: list[str] = []
    for tag in _attribute_tags():
        allowed = E1_1_ACTIONS[tag]
        # Z also allows "a non-zero length value that may be a dummy" (PS3.15 E.1-1 legend).
        ok = set(allowed) | ({"D"} if "Z" in allowed else set())
        for where, got in (("top", ds.get(Tag(tag))), ("nested", item.get(Tag(tag)))):
            obs = _observed(before[Tag(tag)], got)
            if obs == "U" and "D" in allowed:  # the dummy of a UID is its keyed remap
                obs = "D"
            if obs not in ok:
                wrong.append(f"{Tag(tag)} {where}: table {allowed}, applied {obs}")
            if where == "top" and obs != applied_action(tag) and not (
                applied_action(tag) == "Z" and obs == "D"  # PatientName/ID: the pseudonym
            ):
                wrong.append(f"{Tag(tag)}: applied_action says {applied_action(tag)}, saw {obs}")
    assert not wrong, "\n".join(wrong[:40])


@pytest.mark.parametrize("group", [0x5000, 0x5002, 0x6000, 0x601E])
def test_masked_entries_curves_and_overlays_removed(group):
    ds = Dataset()
    ds.add(DataElement((group << 16) | 0x3000, "OW", b"\x01\x02"))
    ds.add(DataElement((group << 16) | 0x4000, "LT", FAKE_TEXT))
    deidentify_dataset(ds)
    assert not [e for e in ds if e.tag.group == group]


def test_written_file_keeps_no_fake_value(tmp_path):
    ds = _build()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = FAKE_UID + ".1"
    deidentify_dataset(ds)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    raw = (tmp_path / "x.dcm").read_bytes()
    assert FAKE_TEXT.encode() not in raw and FAKE_UID.encode() not in raw

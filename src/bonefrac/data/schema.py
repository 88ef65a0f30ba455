"""Column names of the tables that flow between stages.

One place defines them so ingest, validation, preprocessing, evaluation and
monitoring agree on what a row holds. Ids are pseudonyms: original DICOM
identifiers never reach these tables.
"""

from __future__ import annotations

# Written by the data source adapters (what each image *is*).
RECORD_COLUMNS: list[str] = [
    "image_id",       # unique, stable id (pseudonymised for DICOM)
    "path",           # path of the file (or DICOM series folder); in tables: relative to the project root
    "label",          # 1 = fracture, 0 = no fracture
    "fracture_type",  # "" when none / unknown
    "body_part",      # "unknown" when not known
    "view",           # frontal | lateral | oblique | "" when not known
    "patient_id",     # pseudonymised
    "study_id",       # pseudonymised
    "boxes",          # JSON list of [x, y, w, h] in pixels of the stored image; "[]" when none. A 2D box
    #                   may carry its fracture's outline as a fifth element: a list of polygons
    #                   [x1, y1, x2, y2, ...] in the same pixels (FracAtlas's COCO masks)
    "hardware",       # 1 if orthopaedic hardware visible, 0 if not, -1 unknown
]

# Added at ingest by reading every image (what each image *contains*).
METADATA_COLUMNS: list[str] = [
    "sha256",
    "phash",          # 64-bit perceptual hash, hex ("" when undecodable)
    "width",
    "height",
    "depth",          # slices for volumes, 1 for 2D
    "spatial_dims",   # 2 or 3
    "channels",       # of the stored file (1 gray, 3 RGB, 4 CMYK/RGBA)
    "bit_depth",      # stored bits per sample (8, 12, 16)
    "format",         # png | jpeg | dicom | nifti | dicom_series | unknown
    "modality",       # DX | CR | CT | MR | XR (non-DICOM radiograph)
    "file_size",
    "intensity_mean",  # statistics on [0,1]-scaled intensities
    "intensity_std",
    "intensity_p01",
    "intensity_p99",
    "decodes_ok",     # bool: the whole image decodes
    "decode_error",   # why not ("" when ok)
]

MANIFEST_COLUMNS: list[str] = RECORD_COLUMNS + METADATA_COLUMNS

SPLIT_COLUMN = "split"  # train | val | test, added by preprocess
SPLITS = ("train", "val", "test")
FRACTURE_TYPES_PHANTOM = ["transverse", "oblique", "spiral", "comminuted", "greenstick", "segmental"]
# The declared fracture-type vocabulary (``data.fracture_types`` defaults to it): a folder or
# manifest value outside it is never copied into a table, the row is refused at intake instead.
KNOWN_FRACTURE_TYPES: list[str] = [
    *FRACTURE_TYPES_PHANTOM,
    "avulsion",
    "compression",
    "impacted",
    "buckle",
    "stress",
    "pathologic",
    "displaced",
    "nondisplaced",
]
# The declared body-part vocabulary (``data.body_parts`` defaults to it): what the project's
# sources produce (FracAtlas's regions, the phantom's, DICOM BodyPartExamined terms mapped by
# bonefrac.data.sources.BODY_PART_TERMS). A value outside it is never copied into a table: the
# row is refused at intake and its body part left "unknown" (the marker of "not given", always allowed).
KNOWN_BODY_PARTS: list[str] = ["hand", "forearm", "shoulder", "hip", "femur", "tibia", "leg", "mixed"]
UNKNOWN_BODY_PART = "unknown"
# Source adapters may add this column to the records: a non-empty value is why the row was
# refused at intake (not read; ingest records it as the row's decode_error, validation
# quarantines it). Its text names patterns and settings, never a file, folder or value.
INTAKE_ERROR = "intake_error"
INTAKE_REFUSED = "refused at intake: "

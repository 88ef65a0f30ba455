"""Data in: the phantom generator, source adapters, decoding, DICOM de-identification, the metadata table, splits."""

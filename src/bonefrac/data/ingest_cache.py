"""Per-file ingest cache: a file whose bytes did not change is not decoded or de-identified again.

Ingest reads every image of the source (metadata table) and de-identifies every DICOM
file. DVC reruns the whole stage when one file of ``data.root`` changes, so without a
cache one changed image in a folder of 1,000 means 1,000 decodes. Here each result is
stored under the SHA-256 of the file's content, inside a folder named by a fingerprint of
everything else the result depends on: the settings passed to ingest (pixel budget,
expected dimensionality), a keyed digest of the de-identification key (pseudonyms
depend on it), the source of the modules that decode and de-identify, and the versions
of the libraries they call. Change any of these and the fingerprint changes: nothing
stale is ever reused, the old folder is simply not read (and pruned later).

What is stored is what ingest would write anyway: metadata rows (the manifest's
columns: hashes, sizes, statistics, decode errors, never a path or a name) and
de-identified DICOM bytes with their pseudonyms. File names are content hashes, so the
cache holds no identifier. Files flagged with burned-in annotation keep no pixel copy.

The cache lives outside every DVC output (``Params.paths.cache``, default
``data/cache/ingest``): DVC deletes a stage's outputs before rerunning it, and a cache
inside ``data/interim/ingest`` would both vanish and change the output's hash.
``rm -rf data/cache`` is always safe: the next run is a cold one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from bonefrac.atomic import atomic_link_or_copy, atomic_write_text

# Modules whose code decides a cached result: a change to any of them starts a new cache.
_CODE_MODULES = ("imageio.py", "dicom.py", "metadata.py", "deid.py", "ingest_cache.py")
# Libraries whose versions decide a cached result (decoders, hashes, the de-identification table).
_LIBRARIES = (
    "numpy",
    "pillow",
    "imagehash",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pyjpegls",
    "dicom-anonymizer",
    "nibabel",
)
KEEP_FINGERPRINTS = 4  # cache folders kept (most recently used first); older ones are removed


def code_version() -> str:
    """SHA-256 of the decoding and de-identification code and of the versions of the libraries it calls."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_MODULES:
        h.update(name.encode() + b"\x00" + (here / name).read_bytes())
    for lib in _LIBRARIES:
        try:
            version = importlib_metadata.version(lib)
        except importlib_metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{lib}=={version}\n".encode())
    return h.hexdigest()


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class IngestCache:
    """Results of ingest per file content, in ``root/<fingerprint>/<kind>/<sha[:2]>/<sha>.<ext>``.

    ``settings`` are the ingest-relevant parameters (JSON-serialisable); together with
    :func:`code_version` they make the fingerprint. ``hits`` / ``misses`` count lookups
    by kind (``meta``: a decode and its statistics; ``deid``: a DICOM de-identification).
    """

    def __init__(self, root: str | Path, settings: Mapping[str, Any]) -> None:
        self.root = Path(root)
        blob = json.dumps({"settings": dict(settings), "code": code_version()}, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:20]
        self.dir = self.root / self.fingerprint
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def _path(self, kind: str, key: str, ext: str) -> Path:
        return self.dir / kind / key[:2] / f"{key}{ext}"

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        """The stored value of ``key`` or ``None`` (a missing or unreadable entry is a miss)."""
        try:
            value = json.loads(self._path(kind, key, ".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            value = None
        counter = self.hits if isinstance(value, dict) else self.misses
        counter[kind] = counter.get(kind, 0) + 1
        return value if isinstance(value, dict) else None

    def put(self, kind: str, key: str, value: Mapping[str, Any]) -> None:
        atomic_write_text(self._path(kind, key, ".json"), json.dumps(dict(value), sort_keys=True))

    def file(self, kind: str, key: str, ext: str) -> Path:
        """Where a stored file of ``key`` lives (it may not exist)."""
        return self._path(kind, key, ext)

    def put_file(self, kind: str, key: str, ext: str, src: Path) -> None:
        atomic_link_or_copy(src, self._path(kind, key, ext))  # a link: no second copy on disk

    def touch(self) -> None:
        """Mark this fingerprint as used now and remove all but the :data:`KEEP_FINGERPRINTS` newest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "last_used").write_text("")  # its mtime orders the folders
        folders = [d for d in self.root.iterdir() if d.is_dir() and (d / "last_used").exists()]
        folders.sort(key=lambda d: (d / "last_used").stat().st_mtime, reverse=True)
        for old in folders[KEEP_FINGERPRINTS:]:
            if old != self.dir:
                shutil.rmtree(old, ignore_errors=True)

    def stats(self) -> str:
        """``"meta 999 cached + 1 read; deid ..."`` for the ingest summary."""
        kinds = sorted(set(self.hits) | set(self.misses))
        return "; ".join(f"{k} {self.hits.get(k, 0)} cached + {self.misses.get(k, 0)} new" for k in kinds)

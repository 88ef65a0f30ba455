"""``bonefrac predict``: run a model over files, folders, CSV manifests or DICOM folders.

Images are streamed: paths are discovered lazily, decoded and preprocessed one
batch at a time, and each batch's rows are written before the next is read, so
memory stays flat on a folder of 100,000 images. A file that cannot be read gets
an ``error`` in its row and the run goes on; the caller turns "some failed" into
exit code 2. Every file given gets a row: in a folder, every file but hidden ones
and sidecar metadata (CSV, JSON, text...), so a GIF, WebP, PDF, ZIP or NIfTI among
radiographs is reported as unsupported instead of silently left out. Each file goes
through the service's own intake (:func:`bonefrac.inference.upload_policy.decode_upload`:
accepted formats, pixel and decode budgets, the strict decoder), so a file gets the
same verdict here as from ``POST /predict``.

Preprocessing, calibration and decisions are the model bundle's own
(:meth:`ModelBundle.preprocess`, :meth:`ModelBundle.calibrate`), the same code the
service runs. Pictures (Grad-CAM overlays) are a higher layer's job: the caller
passes an ``explainer`` that receives each batch.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from bonefrac.atomic import atomic_path
from bonefrac.data.imageio import DecodedImage, ImageDecodeError, read_image, sniff_format
from bonefrac.errors import BonefracError
from bonefrac.inference.upload_policy import ACCEPTED_FORMATS, InputRejected, SafetyLimits, decode_upload
from bonefrac.model.bundle import ModelBundle
from bonefrac.model.transforms import PreprocessError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}
VOLUME_SUFFIXES = {".nii", ".gz", ".dcm", ".dicom"}
#: Sidecar metadata next to images in a folder: not given to the model, no row. Anything else gets a row.
SKIP_SUFFIXES = {".csv", ".tsv", ".json", ".jsonl", ".txt", ".md", ".yaml", ".yml", ".xml", ".html", ".py"}
PATH_COLUMNS = ("path", "image_path", "file", "filename")
EXIT_SOME_FAILED = 2


class PredictInputError(BonefracError, ValueError):
    """The INPUT of ``bonefrac predict`` cannot be used (missing, empty, bad manifest)."""


#: Called once per batch with the decoded images, their model inputs, the source paths and the
#: calibrated answers (``Prediction.row``) (``bonefrac predict --gradcam`` writes overlays through it).
Explainer = Callable[[list[DecodedImage], torch.Tensor, list[str], list[dict[str, Any]]], None]


# ------------------------------------------------------------------ input discovery
def _is_extensionless_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return sniff_format(fh.read(1024)) == "dicom"
    except OSError:
        return False


def _wanted_file(path: Path, spatial_dims: int) -> bool:
    name = path.name.lower()
    if name.startswith("."):
        return False
    suffix = path.suffix.lower()
    if spatial_dims == 3:
        return name.endswith((".nii", ".nii.gz"))
    return suffix not in SKIP_SUFFIXES


def _walk_sorted(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """os.walk in a stable order (sorted), yielding (dir, sorted file names) lazily."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield Path(dirpath), sorted(filenames)


def _dicom_series_dirs(root: Path) -> Iterator[Path]:
    for d, files in _walk_sorted(root):
        if any(_is_dicom_file(d / f) for f in files[:5]):
            yield d


def _is_dicom_file(p: Path) -> bool:
    return p.suffix.lower() in (".dcm", ".dicom") or (p.suffix == "" and _is_extensionless_dicom(p))


def _manifest_paths(csv_path: Path, chunksize: int = 10_000) -> Iterator[str]:
    import pandas as pd

    try:
        reader = pd.read_csv(csv_path, chunksize=chunksize, dtype=str, keep_default_na=False)
        for chunk in reader:
            col = next((c for c in PATH_COLUMNS if c in chunk.columns), None)
            if col is None:
                raise PredictInputError(
                    f"{csv_path}: the manifest needs a column named one of {', '.join(PATH_COLUMNS)}; "
                    f"it has {', '.join(map(str, chunk.columns))}"
                )
            for value in chunk[col]:
                p = Path(value)
                yield str(p if p.is_absolute() else csv_path.parent / p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PredictInputError(f"{csv_path}: not a readable CSV manifest ({err})") from None


def iter_inputs(source: str | Path, spatial_dims: int = 2) -> Iterator[str]:
    """Every image (or volume) named by ``source``, lazily, in a stable order.

    ``source``: an image file, a CSV manifest (column ``path``; relative paths are
    relative to the CSV), or a folder searched recursively (images; for a 3D model,
    NIfTI files and DICOM series folders).
    """
    src = Path(source)
    if not src.exists():
        raise PredictInputError(f"input not found: {src}")
    if src.is_file():
        if src.suffix.lower() == ".csv":
            yield from _manifest_paths(src)
        else:
            yield str(src)
        return
    if spatial_dims == 3:
        for d, files in _walk_sorted(src):
            for f in files:
                if _wanted_file(d / f, 3):
                    yield str(d / f)
        yield from (str(d) for d in _dicom_series_dirs(src))
        return
    for d, files in _walk_sorted(src):
        for f in files:
            if _wanted_file(d / f, 2):
                yield str(d / f)


def count_inputs(source: str | Path, spatial_dims: int = 2) -> int:
    """How many rows ``source`` will give: a second walk of the same discovery, for the progress total.

    Cheap next to decoding (file names only; a CSV is read in chunks): ~1 s per 100,000 files.
    """
    return sum(1 for _ in iter_inputs(source, spatial_dims))


def batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for it in items:
        batch.append(it)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------ writing
class RowWriter:
    """Streams rows to CSV or JSON lines in a temp file; ``commit`` renames it into place."""

    def __init__(self, out: Path, fmt: Literal["csv", "jsonl"], columns: list[str]) -> None:
        self.out, self.fmt, self.columns = out, fmt, columns
        # Rows stream into a temp file beside ``out``; commit() renames it into place.
        self._atomic = atomic_path(out)
        self.tmp = self._atomic.__enter__()
        # surrogateescape: a file name that is not UTF-8 (os.fsdecode keeps its bytes as surrogates) is
        # written back as those bytes, so the row names the file the user gave; strict UTF-8 crashed here.
        self.fh = self.tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape")
        self.csv = csv.DictWriter(self.fh, fieldnames=columns, extrasaction="ignore") if fmt == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.csv:
            self.csv.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.columns})
        else:
            self.fh.write(json.dumps({k: row.get(k) for k in self.columns}) + "\n")

    def commit(self) -> Path:
        self.fh.close()
        self._atomic.__exit__(None, None, None)
        return self.out

    def abort(self) -> None:
        self.fh.close()
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def output_columns(type_names: list[str], operating_points: Iterable[str]) -> list[str]:
    return [
        "path",
        "probability",
        "logit",
        *[f"decision_{op}" for op in operating_points],
        *[f"type_prob_{t}" for t in type_names],
        "model_name",
        "model_version",
        "error",
    ]


# ------------------------------------------------------------------ running
@dataclass
class PredictSummary:
    out: Path
    n_total: int = 0
    n_ok: int = 0
    n_failed: int = 0
    backend: str = ""
    failures: list[tuple[int, str]] = field(default_factory=list)  # first few (output row, error): no paths
    positives: dict[str, int] = field(default_factory=dict)  # operating point -> images decided positive

    def counts_lines(self, thresholds: dict[str, float]) -> list[str]:
        """One line per operating point: positives among the images read."""
        out = []
        for op in sorted(self.positives):
            k = self.positives[op]
            share = f" ({100 * k / self.n_ok:.1f} %)" if self.n_ok else ""
            thr = f" at p >= {thresholds[op]:.3f}" if op in thresholds else ""
            out.append(f"{op.replace('_', '-')}{thr}: {k} of {self.n_ok} positive{share}")
        return out

    @property
    def exit_code(self) -> int:
        return 0 if self.n_failed == 0 else EXIT_SOME_FAILED


def _no_images_message(spatial_dims: int) -> str:
    """"No images" naming what this model reads (a 2D model takes no NIfTI; a 3D one no PNG/JPEG)."""
    kinds = ", ".join(f.upper() if f != "nifti" else "NIfTI" for f in sorted(ACCEPTED_FORMATS[spatial_dims]))
    return f"no images found in the given input (this {spatial_dims}D model reads {kinds})"


def _load(
    path: str, bundle: ModelBundle, max_pixels: int | None
) -> tuple[DecodedImage | None, torch.Tensor | None, str]:
    try:
        if Path(path).is_dir():  # a DICOM series (3D models)
            img = read_image(path, max_pixels=max_pixels, expected_dims=bundle.spatial_dims)
        else:
            try:
                data = Path(path).read_bytes()
            except FileNotFoundError:
                return None, None, "file not found"
            except OSError as err:
                return None, None, f"cannot read file: {err.strerror or type(err).__name__}"
            limits = SafetyLimits(
                max_upload_bytes=max(len(data), 1),  # local files: no upload limit
                max_pixels=max_pixels if max_pixels is not None else 2**62,
            )
            img = decode_upload(data, bundle.spatial_dims, limits, bundle.preprocess_spec.decode_side_hint)
        return img, bundle.preprocess(img.array), ""
    except InputRejected as err:
        return None, None, err.message
    except ImageDecodeError as err:
        return None, None, str(err)
    except PreprocessError as err:  # preprocessing refused the array (e.g. a degenerate shape)
        return None, None, f"cannot preprocess: {err}"
    except MemoryError:
        return None, None, "image too large to decode in memory"


def predict_to_file(
    source: str | Path,
    loaded: Any,
    out: str | Path,
    batch_size: int = 16,
    explainer: Explainer | None = None,
    backend: str = "auto",
    device: str | None = None,
    max_pixels: int | None = 60_000_000,
    progress: bool = True,
    workers: int = 2,
    notify: Callable[[str], None] | None = None,
    on_prediction: Callable[[DecodedImage, dict[str, Any]], None] | None = None,
) -> PredictSummary:
    """Predict every image named by ``source`` with ``loaded`` (a :class:`LoadedModel`); write ``out``.

    ``out`` ending in ``.jsonl`` writes JSON lines, anything else CSV. Returns counts;
    ``summary.exit_code`` is 0 when every image was read, 2 when some were not. ``notify``
    receives the start-up steps (backend chosen, images found) as they happen;
    ``on_prediction(image, result)`` is called for every image predicted (``result``:
    probability, logit, ``decisions`` and ``latency_ms``), e.g. to append to the prediction log.
    """
    from tqdm import tqdm

    from bonefrac.inference.backends import default_device, select_backend

    bundle = loaded.bundle
    out = Path(out)
    fmt: Literal["csv", "jsonl"] = "jsonl" if out.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    say = notify or (lambda _msg: None)
    device = device or default_device()
    model = bundle.build_model()
    if backend == "auto":
        say("choosing the backend (auto: times PyTorch against ONNX Runtime once)...")
    choice = select_backend(
        bundle,
        preference=backend,
        device=device,
        model=model,  # type: ignore[arg-type]
        batch_size=min(batch_size, 8),
    )

    say(f"backend: {choice.name} on {device}")
    total = count_inputs(source, bundle.spatial_dims)
    if total == 0:
        raise PredictInputError(_no_images_message(bundle.spatial_dims))
    # Counts only: the input path may name a patient, and stderr ends up in job logs.
    say(f"{total} image{'s' if total != 1 else ''} to read")
    ops = list(bundle.operating_points)
    writer = RowWriter(out, fmt, output_columns(bundle.type_names, ops))
    summary = PredictSummary(out=out, backend=choice.name, positives=dict.fromkeys(ops, 0))
    # A known total gives tqdm its percentage and ETA (rate over the images done so far).
    bar = tqdm(desc="predict", unit="img", total=total, disable=not progress, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for batch in batched(iter_inputs(source, bundle.spatial_dims), batch_size):
                loaded_items = list(pool.map(lambda p: _load(p, bundle, max_pixels), batch))
                ok = [i for i, (_, x, _) in enumerate(loaded_items) if x is not None]
                rows: dict[int, dict[str, Any]] = {}
                answers: list[dict[str, Any]] = []
                if ok:
                    t0 = time.perf_counter()
                    x = torch.stack([loaded_items[i][1] for i in ok])  # type: ignore[misc]
                    cal = bundle.calibrate(choice.runner(x.numpy()))
                    per_image_ms = (time.perf_counter() - t0) * 1000 / len(ok)
                    for j, i in enumerate(ok):
                        r = cal.row(j, bundle.type_names)
                        answers.append(r)
                        for op, positive in r["decisions"].items():
                            summary.positives[op] = summary.positives.get(op, 0) + int(positive)
                        if on_prediction is not None:
                            on_prediction(loaded_items[i][0], {**r, "latency_ms": per_image_ms})  # type: ignore[arg-type]
                        row: dict[str, Any] = {"probability": r["probability"], "logit": r["logit"]}
                        row.update({f"decision_{k}": v for k, v in r["decisions"].items()})
                        row.update({f"type_prob_{k}": v for k, v in r.get("fracture_type_probabilities", {}).items()})
                        rows[i] = row
                    if explainer is not None:
                        explainer([loaded_items[i][0] for i in ok], x, [batch[i] for i in ok], answers)  # type: ignore[misc]
                for i, path in enumerate(batch):
                    err = loaded_items[i][2]
                    row = rows.get(i, {})
                    row.update(
                        {
                            "path": path,
                            "model_name": loaded.name,
                            "model_version": loaded.version,
                            "error": err,
                        }
                    )
                    writer.write(row)
                    summary.n_total += 1
                    if err:
                        summary.n_failed += 1
                        if len(summary.failures) < 20:
                            summary.failures.append((summary.n_total, err))
                    else:
                        summary.n_ok += 1
                bar.update(len(batch))
                bar.set_postfix(failed=summary.n_failed)
        if summary.n_total == 0:
            raise PredictInputError(_no_images_message(bundle.spatial_dims))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return summary

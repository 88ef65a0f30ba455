"""Typer commands ``bonefrac predict`` and ``bonefrac validate-external`` (registered in ``bonefrac.cli``).

Thin: arguments in, one library call, a one-line summary out. User errors (missing
input, bad model, unreadable manifest) print their message and exit 1 without a
traceback. ``predict`` exits 2 when some images could not be read (each has its
``error`` in the output), 0 when all were predicted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="bundle file (.pt) or model-store tag name:version; default: "
        "$BONEFRAC_MODEL_PATH, else the champion in the model store",
    ),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _note(message: str) -> None:
    """A start-up or progress message: on stderr, so stdout keeps only the summary."""
    typer.echo(message, err=True)


def _model_line(loaded: Any) -> str:
    """Which model answers and where it decides: name, version, network, operating points."""
    b = loaded.bundle
    ops = ", ".join(f"{k.replace('_', '-')} p >= {v:.3f}" for k, v in sorted(b.operating_points.items()))
    what = f"{loaded.name}:{loaded.version} ({b.arch}, {b.preprocess_spec.image_size} px)"
    return f"model {what}; operating points: {ops or 'none stored'}"


def _prediction_logger(loaded: Any) -> Any:
    """Append each prediction to the prediction log the service writes (same records, same folder)."""
    from bonefrac.config import load_settings, resolve
    from bonefrac.monitoring.prediction_log import append_prediction, image_fields, prediction_record

    log_dir = resolve(load_settings().paths.predictions_log)

    def log(img: Any, result: dict[str, Any]) -> None:
        append_prediction(
            log_dir,
            prediction_record(
                image_fields(img),
                model_name=loaded.name,
                model_version=loaded.version,
                probability=result["probability"],
                logit=result["logit"],
                decisions=result["decisions"],
                latency_ms=result["latency_ms"],
            ),
        )

    return log


def predict(
    input: Annotated[
        Path,
        typer.Argument(
            help="image file, folder (recursive), CSV manifest (column 'path'), or folder of DICOM files"
        ),
    ],
    model: ModelOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output .csv or .jsonl")] = Path("predictions.csv"),
    gradcam: Annotated[
        Path | None, typer.Option(
            "--gradcam",
            help="write a heatmap overlay PNG per image here (the model's own map for a dense arch, else Grad-CAM)",
        )
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per forward pass")] = 16,
    backend: Annotated[str, typer.Option(help="auto | torch | onnx")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda if available)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
    log_predictions: Annotated[
        bool,
        typer.Option(
            "--log-predictions",
            help="also append each prediction to the service's prediction log (paths.predictions_log or "
            "$BONEFRAC_PREDICTION_LOG_DIR; same PHI-free schema), which the drift check reads",
        ),
    ] = False,
) -> None:
    """Predict fractures for every image in INPUT; one row per image (exit 2 if some could not be read)."""
    if backend not in ("auto", "torch", "onnx"):
        raise _fail(f"--backend must be auto, torch or onnx, got {backend!r}")
    # Said before the heavy imports (torch, BentoML's store): the first seconds are not silent.
    _note(f"bonefrac predict: loading {model or 'the model'} (torch start-up takes a few seconds)...")
    from bonefrac.errors import user_error_types
    from bonefrac.inference.batch_predict import PredictInputError, predict_to_file
    from bonefrac.registry.resolve import resolve_model

    try:
        loaded = resolve_model(model)
        _note(_model_line(loaded))
        explainer = None
        if gradcam is not None:
            from bonefrac.explain.display import overlay_writer
            from bonefrac.inference.backends import default_device

            explainer = overlay_writer(
                loaded.bundle.build_model(),
                loaded.bundle.preprocess_spec.image_size,
                gradcam,
                input if input.is_dir() else None,
                device or default_device(),
                thresholds=dict(loaded.bundle.operating_points),
            )
        summary = predict_to_file(
            input,
            loaded,
            out,
            batch_size=batch_size,
            explainer=explainer,
            backend=backend,
            device=device,
            progress=progress,
            notify=_note,
            on_prediction=_prediction_logger(loaded) if log_predictions else None,
        )  # type: ignore[arg-type]
    except (PredictInputError, *user_error_types()) as err:
        raise _fail(str(err)) from None
    typer.echo(
        f"predicted {summary.n_ok}/{summary.n_total} images with {loaded.name}:{loaded.version} "
        f"({summary.backend}) -> {summary.out}"
        + (f"; {summary.n_failed} could not be read (see the 'error' column)" if summary.n_failed else "")
    )
    for line in summary.counts_lines(dict(loaded.bundle.operating_points)):
        typer.echo(f"  {line}")
    # Row numbers, not paths: a file or folder name may identify a patient, and stderr lands in logs.
    for row, err in summary.failures[:5]:
        typer.echo(f"  unreadable: row {row} of the output: {err}", err=True)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


def validate_external(
    source: Annotated[str, typer.Option("--source", help="fracatlas | imagefolder | csv | dicom")],
    root: Annotated[Path, typer.Option("--root", help="dataset folder (or CSV file for --source csv)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the report")],
    model: ModelOpt = None,
    manifest: Annotated[Path | None, typer.Option(help="manifest CSV (csv/dicom sources)")] = None,
    body_part: Annotated[
        list[str] | None, typer.Option("--body-part", help="only these body parts (repeat)")
    ] = None,
    exclude_body_part: Annotated[
        list[str] | None, typer.Option("--exclude-body-part", help="drop these")
    ] = None,
    bootstrap: Annotated[int, typer.Option(min=10, help="bootstrap resamples for CIs")] = 1000,
    ci_level: Annotated[float, typer.Option(min=0.5, max=0.999)] = 0.95,
    gallery: Annotated[int, typer.Option(min=0, help="Grad-CAM gallery images per row")] = 6,
    max_images: Annotated[int | None, typer.Option(min=2, help="stratified subsample (quick checks)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Score a model on labelled data it never saw, at its stored operating points; write the HTML report."""
    from bonefrac.errors import user_error_types
    from bonefrac.evaluation.external import validate_external as run
    from bonefrac.registry.resolve import resolve_model

    try:
        loaded = resolve_model(model)
        report = run(
            source,
            root,
            loaded.bundle,
            (loaded.name, loaded.version),
            out,
            manifest_csv=manifest,
            include_body_parts=body_part,
            exclude_body_parts=exclude_body_part,
            n_bootstrap=bootstrap,
            ci_level=ci_level,
            gradcam_gallery=gallery,
            max_images=max_images,
            seed=seed,
        )
    except (ValueError, *user_error_types()) as err:
        raise _fail(str(err)) from None
    ext = report["external"]
    typer.echo(
        f"external validation of {ext['model']['name']}:{ext['model']['version']} on {ext['n_evaluated']} "
        f"images ({ext['n_unreadable']} unreadable) -> {out / 'report.html'}"
    )

"""The ``bonefrac`` command line: a thin Typer layer over the pipeline and the library.

Stage commands run the same Prefect flow scripts that ``dvc repro`` runs
(``python -m flows.<stage>``), from the project root, so a stage behaves the
same whichever way it is started. Everything else calls library functions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from bonefrac.cli import inference_commands, monitoring_commands, ops_commands, registry_commands
from bonefrac.config import ConfigError, load_params, project_root
from bonefrac.proc import tool_cmd, tool_env

app = typer.Typer(
    name="bonefrac",
    help="Bone-fracture detection pipeline: data, validation, training, evaluation, serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (default: params.yaml)")]

STAGES = ("generate", "ingest", "validate", "preprocess", "train", "evaluate")


def _run_stage(stage: str, params: Path) -> None:
    root = project_root()
    if not (root / "flows" / f"{stage}.py").exists():
        typer.echo(f"error: run this from the bonefrac project (no flows/{stage}.py under {root})", err=True)
        raise typer.Exit(2)
    rc = subprocess.call([sys.executable, "-m", f"flows.{stage}", str(params)], cwd=root)
    if rc:
        raise typer.Exit(rc)


def _stage_command(stage: str, doc: str) -> None:
    def command(params: ParamsOpt = Path("params.yaml")) -> None:
        _run_stage(stage, params)

    command.__doc__ = doc
    app.command(stage)(command)


_stage_command(
    "generate",
    "Generate the embedded phantom dataset (2D radiographs or 3D volumes), contact sheet; only with "
    "data.source: phantom (`bonefrac phantom` writes a set anywhere).",
)
_stage_command("ingest", "Read every image of the configured source into the per-image metadata table.")
_stage_command("validate", "Validate the metadata table with Great Expectations; quarantine or stop on failures.")
_stage_command("preprocess", "Split by patient/study (or near-duplicate cluster) and cache preprocessed tensors.")
_stage_command("train", "Train the configured network on the cached tensors.")
_stage_command(
    "evaluate",
    "Calibrate, measure on the test split, explain (the model's own map or Grad-CAM), write the report and model card.",
)


@app.command("run")
def run_pipeline(
    force: Annotated[bool, typer.Option(help="rerun every stage even if nothing changed")] = False,
) -> None:
    """Run the whole pipeline with DVC (`dvc repro`): only what changed is rerun.

    The stages share one Prefect server (`PREFECT_API_URL` if set, else one started for the run).
    """
    raise typer.Exit(_pipeline_call(tool_cmd("dvc", "repro", *(["--force"] if force else []))))


def _pipeline_call(cmd: list[str]) -> int:
    """``cmd`` (a DVC pipeline run) in the project root, its stages sharing one Prefect API."""
    from bonefrac.ops.prefect_api import PrefectServerError, local_prefect_api

    try:
        with local_prefect_api(tool_env()) as env:
            return subprocess.call(cmd, cwd=project_root(), env=env)
    except PrefectServerError as err:
        typer.echo(f"error: {err}", err=True)
        return 1


@app.command("exp-run")
def exp_run(
    preset: Annotated[Path, typer.Argument(help="preset YAML of params overrides, e.g. params/fracatlas.yaml")],
    name: Annotated[str | None, typer.Option(help="experiment name (default: the preset's file name)")] = None,
    dry_run: Annotated[bool, typer.Option(help="print the dvc command instead of running it")] = False,
) -> None:
    """Run the pipeline as a DVC experiment with a preset's params (`dvc exp run -S ...`)."""
    from bonefrac.presets import set_args

    try:
        args = set_args(preset, project_root() / "params.yaml")
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    cmd = tool_cmd("dvc", "exp", "run", "-n", name or preset.stem, *args)
    if dry_run:
        typer.echo(" ".join(["dvc", *cmd[3:]]))
        return
    raise typer.Exit(_pipeline_call(cmd))


@app.command("check-params")
def check_params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate a params file and print the resolved configuration."""
    try:
        p = load_params(params)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(p.model_dump_json(indent=2))


@app.command("phantom")
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="folder to write images and manifest.csv into")],
    n_patients: Annotated[int, typer.Option(help="patients to simulate")] = 20,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 256,
    spatial_dims: Annotated[int, typer.Option(help="2 = radiographs, 3 = CT-like volumes")] = 2,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same files)")] = 7,
    contact_sheet: Annotated[Path | None, typer.Option(help="also render a contact sheet PNG here")] = None,
) -> None:
    """Generate a phantom dataset anywhere (outside the pipeline), e.g. for trying the service."""
    from bonefrac.config import PhantomParams
    from bonefrac.data.contact_sheet import make_contact_sheet
    from bonefrac.data.phantom import generate_phantom_dataset

    try:
        pp = PhantomParams(n_patients=n_patients, size=size, spatial_dims=spatial_dims, seed=seed)  # type: ignore[arg-type]
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    manifest = generate_phantom_dataset(out_dir, pp)
    if contact_sheet is not None and spatial_dims == 2:
        make_contact_sheet(manifest, out_dir, contact_sheet)
    typer.echo(f"wrote {len(manifest)} phantoms to {out_dir}")


@app.command("publish-report")
def publish_report(
    report_dir: Annotated[Path, typer.Argument(help="a run's report folder, e.g. reports/evaluation")],
    out: Annotated[Path, typer.Argument(help="HTML file to write")],
) -> None:
    """Write a shareable copy of a run's report: all numbers and plots, no patient image."""
    from bonefrac.evaluation.report import publish_report as _publish

    try:
        path = _publish(report_dir, out)
    except (FileNotFoundError, ValueError, KeyError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}")


app.command("predict")(inference_commands.predict)
app.command("validate-external")(inference_commands.validate_external)
app.command("drift")(monitoring_commands.drift)
app.command("metrics")(monitoring_commands.metrics)
app.command("promote")(registry_commands.promote)
app.command("rollback")(registry_commands.rollback)
app.command("models")(registry_commands.models)
app.add_typer(ops_commands.app, name="ops")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

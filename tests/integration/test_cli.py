"""The `bonefrac` CLI: every command has --help; bad params fail by key name without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "bonefrac"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _commands() -> list[str]:
    from bonefrac.cli import app

    return [c.name for c in app.registered_commands if c.name]


def test_top_level_help_lists_stages() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    for stage in ("generate", "ingest", "validate", "preprocess", "train", "evaluate", "phantom", "predict"):
        assert stage in out.stdout


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command: str) -> None:
    out = _cli(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_bad_params_stop_a_stage_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  arch: resnet9000\n")
    out = _cli("ingest", "--params", str(bad))
    assert out.returncode == 2
    assert "model.arch" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_phantom_command_writes_a_dataset(tmp_path: Path) -> None:
    out = _cli("phantom", str(tmp_path / "ph"), "--n-patients", "3", "--size", "128")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ph" / "manifest.csv").exists()


# ------------------------------------------------------------ beyond --help
def _invoke(*args: str) -> Any:
    """In-process run of the CLI (no interpreter start per call)."""
    from typer.testing import CliRunner

    from bonefrac.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_check_params_prints_the_resolved_config_or_names_the_bad_key(tmp_path: Path) -> None:
    ok = _invoke("check-params", "--params", str(ROOT / "params.yaml"))
    assert ok.exit_code == 0
    assert json.loads(ok.stdout)["train"]["distributed"]["nproc_per_node"] == 1  # defaults resolved
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  distributed:\n    nproc_per_node: 0\n")
    out = _invoke("check-params", "--params", str(bad))
    assert out.exit_code == 2 and "train.distributed.nproc_per_node" in out.output


def test_registry_commands_promote_rollback_and_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.integration._server import make_tiny_bundle

    from bonefrac.registry import store

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    # The project's own data and models stay untouched: promote/rollback look for a cache here (none:
    # the drift reference is not rebuilt, a warning says so, the change of champion stands).
    params = tmp_path / "params.yaml"
    params.write_text(f"paths: {{processed: {tmp_path / 'processed'}, models: {tmp_path / 'models'}}}\n")
    tags = [
        store.register_model(make_tiny_bundle(tmp_path / f"m{i}.pt", image_size=32, seed=i), name="bonefrac")
        for i in range(2)
    ]
    out = _invoke("models")
    assert out.exit_code == 0 and all(t.split(":")[1][:8] in out.stdout for t in tags)
    assert out.stdout.count("challenger") == 2

    assert "does-not-exist" in _invoke_err("promote", "bonefrac:does-not-exist", "--force", "--params", str(params))
    assert "nothing to roll back" in _invoke_err("rollback", "--params", str(params))

    for tag in tags:
        out = _invoke("promote", tag, "--force", "--params", str(params))
        assert out.exit_code == 0 and "without the gate" in out.stdout
    assert store.get_champion("bonefrac")[0] == tags[1]
    assert "--force" in store.get_record(tags[1]).metadata["history"][-1]["why"]  # the override is recorded

    out = _invoke("rollback", "--params", str(params))
    assert out.exit_code == 0 and f"champion is now {tags[0]}" in out.stdout
    assert store.get_champion("bonefrac")[0] == tags[0]
    assert store.get_record(tags[1]).stage == "archived"
    listed = _invoke("models", "--stage", "champion").stdout
    assert tags[0].split(":")[1][:8] in listed and tags[1].split(":")[1][:8] not in listed
    assert "only model" in _invoke_err("rollback", "--params", str(params))  # never back to the model just rolled back


def _invoke_err(*args: str) -> str:
    out = _invoke(*args)
    assert out.exit_code == 1, out.output
    assert "Traceback" not in out.output
    return out.output


def test_exp_run_finds_dvc_without_the_venv_on_path(tmp_path: Path) -> None:
    """`.venv/bin/bonefrac exp-run PRESET` from a shell whose PATH has no venv (README's command)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "params.yaml", proj / "params.yaml")
    (proj / "dvc.yaml").write_text(
        "stages:\n  probe:\n"
        "    cmd: python -c \"import sys, yaml; e = yaml.safe_load(open('params.yaml'))['train']['epochs'];"
        " open('probe.txt', 'w').write(f'{e} {sys.executable}')\"\n"
        "    params: [train.epochs]\n    outs: [probe.txt]\n"
    )
    (proj / "preset.yaml").write_text("train:\n  epochs: 3\n")
    (proj / ".gitignore").write_text("/probe.txt\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    (proj / ".dvc").mkdir()  # what `dvc init` writes that matters here, without a DVC start to pay for
    (proj / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    subprocess.run([*git, "add", "-A"], cwd=proj, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=proj, check=True)

    env = {**os.environ, "PATH": "/usr/bin:/bin", "DVC_NO_ANALYTICS": "1"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t")
    env.update(GIT_COMMITTER_EMAIL="t@example.org")
    out = subprocess.run(
        [str(BIN / "bonefrac"), "exp-run", "preset.yaml"], cwd=proj, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    epochs, python = (proj / "probe.txt").read_text().split(" ", 1)
    assert epochs == "3"  # the preset reached the stage through `dvc exp run -S`
    assert Path(python).parent.resolve() == BIN.resolve()  # and the stage ran with the venv's python
    dry = _invoke("exp-run", str(ROOT / "params" / "fracatlas.yaml"), "--dry-run")
    assert dry.exit_code == 0 and dry.stdout.startswith("dvc exp run -n fracatlas -S ")

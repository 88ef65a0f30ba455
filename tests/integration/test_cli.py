"""The `bonefrac` CLI: every command has --help; bad params fail by key name without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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

"""`bonefrac run` / `exp-run`: the pipeline's stages share one Prefect API (bonefrac.ops.prefect_api)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from bonefrac.ops.prefect_api import LOG_NAME, PrefectServerError, local_prefect_api

cli_main = importlib.import_module("bonefrac.cli.main")  # the module (bonefrac.cli exports its main())


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return env


def _up(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_operators_api_wins_and_nothing_is_started(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "PREFECT_API_URL": "http://prefect.example:4200/api"}
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with local_prefect_api(env) as served:
        assert served["PREFECT_API_URL"] == "http://prefect.example:4200/api"
        assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    assert not (tmp_path / LOG_NAME).exists()


def test_bonefrac_run_gives_dvc_one_live_server_and_stops_it_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers while `dvc repro` runs, and is gone (with its children) when the run returns."""
    for key, value in _env(tmp_path / "prefect").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    monkeypatch.chdir(tmp_path)
    seen: dict[str, object] = {}

    def fake_call(cmd: list[str], cwd: Path, env: dict[str, str]) -> int:
        seen.update(cmd=cmd[1:], cwd=cwd, api=env["PREFECT_API_URL"], up=_up(env["PREFECT_API_URL"]))
        seen["server"] = [p.pid for p in psutil.Process().children(recursive=True)]
        return 3  # dvc's exit status is the command's

    monkeypatch.setattr(cli_main.subprocess, "call", fake_call)
    result = CliRunner().invoke(cli_main.app, ["run", "--force"])
    assert result.exit_code == 3, result.output
    assert seen["cmd"] == ["-m", "dvc", "repro", "--force"] and seen["cwd"] == tmp_path
    assert str(seen["api"]).startswith("http://127.0.0.1:") and seen["up"] is True
    assert not _up(str(seen["api"]))
    assert not [pid for pid in seen["server"] if psutil.pid_exists(pid)], "the server outlived the run"


def test_a_server_that_cannot_start_is_named_with_its_log(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "PREFECT_API_DATABASE_CONNECTION_URL": "nonsense://nowhere"}
    with pytest.raises(PrefectServerError, match="did not start") as err, local_prefect_api(env, timeout_s=60):
        pass
    assert str(tmp_path / LOG_NAME) in str(err.value)


def test_readme_quotes_the_prefect_flow_benchmark() -> None:
    """The README's per-stage figures are the committed benchmark's medians, and the shared server is the faster."""
    import json

    root = Path(__file__).resolve().parents[2]
    rows = {r["mode"]: r["seconds"]["median"] for r in json.loads(
        (root / "benchmarks/results/prefect_flow_start.json").read_text())["rows"]}
    assert rows["running_server"] < rows["ephemeral_server"]
    readme = " ".join((root / "README.md").read_text().split())
    assert (f"took {rows['running_server']:.1f} s on a running server against {rows['ephemeral_server']:.1f} s "
            "with its own temporary server") in readme

"""Drive the DVC pipeline in a copy of the repository (shared by the pipeline tests)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from bonefrac.ops.prefect_api import local_prefect_api

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]


def merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def copy_project(dst: Path) -> None:
    """The repository's files (tracked and not ignored) copied into ``dst``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def make_project(dst: Path, params_override: dict, commit_date: str | None = None) -> Path:
    """A copy of the repo at ``dst`` with ``params_override`` merged into params.yaml, committed to git.

    ``commit_date`` (e.g. ``"2026-01-01T00:00:00Z"``) fixes the commit time, which the
    stages use as ``SOURCE_DATE_EPOCH``.
    """
    dst.mkdir(parents=True)
    copy_project(dst)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(yaml.safe_dump(merge(params, params_override), sort_keys=False))
    env = dict(os.environ)
    if commit_date:
        env.update(GIT_AUTHOR_DATE=commit_date, GIT_COMMITTER_DATE=commit_date)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*GIT, "commit", "-qm", "copy"], cwd=dst, check=True, env=env)
    return dst


@contextlib.contextmanager
def prefect_server(home: Path, timeout: float = 180) -> Iterator[str]:
    """A Prefect server on 127.0.0.1 for several pipeline runs (``bonefrac.ops.prefect_api``); yields its API URL."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with local_prefect_api(env, timeout_s=timeout) as served:
        yield served["PREFECT_API_URL"]


def env_for(project: Path, api_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = f"{project / 'src'}{os.pathsep}{project}"
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["BENTOML_HOME"] = str(project / ".bentoml")
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.pop("SOURCE_DATE_EPOCH", None)  # nothing in the pipeline may depend on it
    return env


def dvc(project: Path, *args: str, api_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """``dvc *args`` in ``project``; the stages use the Prefect server at ``api_url`` or an ephemeral one."""
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=project, env=env_for(project, api_url), capture_output=True, text=True,
        timeout=1200,
    )


def bonefrac_run(project: Path, api_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """``bonefrac run`` in ``project``, as ``make run``: ``dvc repro``, all stages on one Prefect server.

    That server is ``api_url``'s (an operator's, which ``bonefrac run`` uses as it is) or, without
    one, the local server ``bonefrac run`` starts for the run and stops after it.
    """
    return subprocess.run(
        [str(BIN / "bonefrac"), "run"], cwd=project, env=env_for(project, api_url), capture_output=True, text=True,
        timeout=1200,
    )

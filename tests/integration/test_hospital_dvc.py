"""The README's "a hospital adds its own data" lines, run as written, on a made-up export.

A clone of this repository (its committed HEAD) plays the hospital's checkout; a folder
in ``tmp_path`` plays ``/mnt/pacs-export`` (patient-named folders and files with fake
identifiers, a DICOM holding made-up PHI, a folder symlink loop, a file symlink loop, a
dangling link, a text file) and another plays the shared DVC remote. The README's two
bash blocks (marked ``<!-- hospital-add -->`` and ``<!-- hospital-pull -->``) are read
from the README and run line by line with ``set -e``; only these substitutions are made:
the export, remote and repository addresses become the temp folders, and ``make install``
becomes a link to this test's own virtual environment (a fresh install takes minutes).
The venv is taken off ``PATH`` first, so ``dvc`` is found only if ``source env.sh`` puts
the checkout's ``.venv/bin`` on it. ``dvc exp run`` (training) is not part of the blocks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests._factories import FAKE_PHI, make_dicom, make_png

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
FAKE_NAMES = ["DOE^JANE_PHI-123456", "Roe_Richard_1957", "Smith-John"]


def readme_block(marker: str) -> list[str]:
    """The command lines of the bash block after ``<!-- marker -->`` in the README."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README has no block marked <!-- {marker} -->"
    return [line for line in m.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def make_export(root: Path) -> dict[str, bytes]:
    """A small PACS-like export; returns {relative path: bytes} of its regular files."""
    frac, normal = root / "Fractured", root / "Non_fractured"
    (frac / FAKE_NAMES[0]).mkdir(parents=True)
    (normal / FAKE_NAMES[1]).mkdir(parents=True)
    make_dicom(frac / FAKE_NAMES[0] / "IMG0001.dcm")  # FAKE_PHI inside
    make_png(frac / f"{FAKE_NAMES[2]}.png", seed=1)
    make_png(normal / FAKE_NAMES[1] / "wrist.png", seed=2)
    make_png(normal / "anon.png", seed=3)
    (root / "export_notes.txt").write_text(f"exported for {FAKE_PHI['PatientName']}\n")
    (normal / "loop").symlink_to("..")  # a folder loop
    (normal / "a.png").symlink_to("b.png")  # a file loop: dvc add fails on it ("Too many levels")
    (normal / "b.png").symlink_to("a.png")
    (normal / "dangling.png").symlink_to("nowhere.png")
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _env(home: Path) -> dict[str, str]:
    """This process's environment without the venv on PATH; git identity for the commit."""
    venv_bin = str(VENV / "bin")
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != Path(venv_bin)]
    path = [d for d in path if not (Path(d) / "dvc").exists()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_", "VIRTUAL_ENV"))}
    env.update(
        PATH=os.pathsep.join(path),
        HOME=str(home),
        GIT_AUTHOR_NAME="Hospital ML",
        GIT_AUTHOR_EMAIL="ml@hospital.invalid",
        GIT_COMMITTER_NAME="Hospital ML",
        GIT_COMMITTER_EMAIL="ml@hospital.invalid",
        GIT_CONFIG_NOSYSTEM="1",
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),  # not /var/tmp/dvc
    )
    env.pop("PYTHONPATH", None)
    return env


def run_block(lines: list[str], cwd: Path, env: dict[str, str], subs: dict[str, str]) -> str:
    script = ["set -euo pipefail"]
    for line in lines:
        cmd = line.split("  #")[0].strip()
        for old, new in subs.items():
            cmd = cmd.replace(old, new)
        script.append(cmd)
    script.append('echo "RESOLVED_DVC=$(command -v dvc)"')
    r = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"README block failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_readme_hospital_dvc_steps_work_as_written(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    add, pull = readme_block("hospital-add"), readme_block("hospital-pull")
    assert any(line.startswith("dvc add data/raw/hospital") for line in add)
    assert any(line.startswith("dvc pull") for line in pull)
    export, remote, home = tmp_path / "pacs-export", tmp_path / "remote", tmp_path / "home"
    home.mkdir()
    files = make_export(export)
    repo = tmp_path / "site" / "bonefrac"  # named as the README's clone URL ends
    teammate = tmp_path / "teammate"
    teammate.mkdir()
    env = _env(home)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True, env=env, timeout=120)
    subs = {
        "make install": f"ln -sfn {VENV} .venv",
        "/mnt/pacs-export": str(export),
        "/srv/dvc/bonefrac": str(remote),
        "https://git.example.org/bonefrac.git": str(repo),
    }

    out = run_block(add, repo, env, subs)
    # `source env.sh` put the checkout's .venv/bin first (the venv was taken off PATH above)
    assert f"RESOLVED_DVC={repo}/.venv/bin/dvc" in out, out
    # git holds the .dvc file and nothing of the export: no image, no name from it
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert status.strip() in ("", "?? .venv"), status
    tracked = subprocess.run(
        ["git", "ls-files", "data"], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked == ["data/.gitignore", "data/raw/.gitignore", "data/raw/hospital.dvc"]
    history = subprocess.run(
        ["git", "log", "-p", "-1"], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout
    for secret in [*FAKE_NAMES, FAKE_PHI["PatientName"], FAKE_PHI["PatientID"]]:
        assert secret not in history
    assert sum(1 for p in remote.rglob("*") if p.is_file()) == len(files) + 1  # + the folder's .dir listing

    # a teammate's fresh clone gets the same files, and no link
    out = run_block(pull, teammate, env, subs)
    got_root = teammate / "bonefrac" / "data" / "raw" / "hospital"
    got = {p.relative_to(got_root).as_posix(): p for p in sorted(got_root.rglob("*")) if not p.is_dir()}
    assert sorted(got) == sorted(files), out
    assert all(got[k].read_bytes() == v for k, v in files.items())
    assert not any(p.is_symlink() for p in got.values())

"""The project's tools are found without the venv on PATH, and no child outlives its parent."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bonefrac.proc import tool_cmd, tool_env

ROOT = Path(__file__).resolve().parents[2]
BARE_PATH = "/usr/bin:/bin"  # what a service manager or cron gives a worker: no venv


def test_tools_come_from_this_interpreter_whatever_path_says() -> None:
    assert tool_cmd("dvc", "repro") == [sys.executable, "-m", "dvc", "repro"]
    assert tool_cmd("torchrun", "-h")[:3] == [sys.executable, "-m", "torch.distributed.run"]
    env = tool_env({"PATH": BARE_PATH, "X": "1"})
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    assert env["X"] == "1"
    assert tool_env(env)["PATH"] == env["PATH"]  # idempotent: not prepended twice


def test_retrain_runs_dvc_repro_without_the_venv_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented worker's bug: `dvc` looked up on PATH, and DVC's `python` not the venv's."""
    sys.path.insert(0, str(ROOT))
    from flows.retrain import run_pipeline

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  probe:\n"
        "    cmd: python -c \"import sys, bonefrac; open('probe.txt', 'w').write(sys.executable)\"\n"
        "    outs: [probe.txt]\n"
    )
    (tmp_path / ".dvc").mkdir()  # what `dvc init --no-scm` writes, without a DVC start to pay for
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n    analytics = false\n")
    monkeypatch.setenv("PATH", BARE_PATH)
    run_pipeline.fn(str(tmp_path), timeout_s=120)
    stage_python = Path((tmp_path / "probe.txt").read_text())
    assert stage_python.parent == Path(sys.executable).parent  # the stage ran with the venv's python


def test_retrain_records_the_tag_that_bentoml_build_prints() -> None:
    """`bentoml build --output tag` prints `__tag__:bonefrac:<v>`; the decision recorded that, not the tag."""
    sys.path.insert(0, str(ROOT))
    from flows.retrain import bento_tag

    printed = "Locking PyPI package versions.\n__tag__:bonefrac:iwq7sohm6khteax4\n"
    assert bento_tag(printed) == "bonefrac:iwq7sohm6khteax4"
    assert bento_tag("bonefrac:abc\n") == "bonefrac:abc"  # a BentoML that prints the bare tag


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["run_tool", "exit_with_parent", "through_a_shell"])
def test_a_child_dies_when_its_parent_is_killed(tmp_path: Path, how: str) -> None:
    """kill -9 of the middle process: the grandchild (a flow run, a stage) and what it started stop too."""
    pidfile = tmp_path / "pids"
    # the grandchild starts a child of its own (its `dvc repro`, its training) and records both PIDs
    write_pids = (
        "import subprocess; k = subprocess.Popen(['sleep', '60']); "
        f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{k.pid}}'); time.sleep(60)"
    )
    if how == "run_tool":  # we start the child: parent-death signal
        body = f"""
            from bonefrac.proc import run_tool
            run_tool([sys.executable, "-c", "import os, time; {write_pids.replace('"', "'")}"], ".")
        """
    else:  # someone else starts us: we watch our parent (DVC: through `sh -c`, which outlives DVC)
        # As in a Prefect flow run: SIGTERM handled (here: swallowed) by someone else, and a log handler
        # that fails once the parent that held our stderr pipe is gone.
        hostile = (
            "import logging, signal; signal.signal(signal.SIGTERM, lambda *a: None); h = logging.Handler(); "
            "h.emit = lambda r: (_ for _ in ()).throw(SystemExit(1)); "  # rich's console on a broken pipe
            "logging.getLogger('bonefrac.proc').addHandler(h); "
        )
        child = [sys.executable, "-c", f"import os, time; {hostile}from bonefrac.proc import exit_with_parent; "
                 f"exit_with_parent(interval_s=0.1); {write_pids}"]  # fmt: skip
        if how == "through_a_shell":
            child = ["/bin/sh", "-c", shlex.join(child) + "; echo done"]  # `; echo`: sh cannot exec the child
        body = f"""
            import subprocess
            subprocess.run({child!r})
        """
    script = "import sys\n" + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    middle = subprocess.Popen([sys.executable, "-c", script], env=env)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            assert middle.poll() is None, "the middle process ended early"
            time.sleep(0.1)
        pids = [int(p) for p in pidfile.read_text().split()]
        middle.send_signal(signal.SIGKILL)
        middle.wait(10)
        grandchild, its_child = pids
        assert _wait_gone(grandchild, 10), f"the grandchild {grandchild} outlived its killed parent"
        if how != "run_tool":  # (a parent-death signal does not reach grandchildren; exit_with_parent does)
            assert _wait_gone(its_child, 10), f"the grandchild's own child {its_child} was left running"
    finally:
        if middle.poll() is None:
            middle.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

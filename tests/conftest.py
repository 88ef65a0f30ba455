"""Test-session setup shared by every folder.

Under pytest-xdist (``make test`` runs two workers: most tests use one core, and the
server-starting ones mostly wait), each worker gets its own Prefect and BentoML homes,
so two workers never share one SQLite database or model store. Set here, before any
test module imports prefect or bentoml, because both read their home once at import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker:
    _home = Path(tempfile.mkdtemp(prefix=f"bonefrac-{_worker}-"))
    os.environ["PREFECT_HOME"] = str(_home / "prefect")
    os.environ["BENTOML_HOME"] = str(_home / "bentoml")


def long_first(items: list) -> None:
    """Move the items of files marked ``long`` to the front, keeping collection order otherwise.

    ``make test`` hands files to its two workers in this order (``--no-loadscope-reorder``):
    the files that take minutes start first, and the short ones fill in around them.
    """
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_collection_modifyitems(config, items) -> None:
    long_first(items)

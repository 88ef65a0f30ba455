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

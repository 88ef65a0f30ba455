"""bonefrac: detect and classify bone fractures in radiographs and CT/MRI volumes."""

from __future__ import annotations

import os

# Analytics and telemetry off for every tool, whichever entry point imports us
# (CLI, flows, BentoML service, tests). setdefault: an operator may still override.
for _key, _value in {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"

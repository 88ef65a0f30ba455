"""Run the expectation suite on the manifest with an ephemeral GX context and build Data Docs.

An ephemeral context keeps GX's state out of the repository (no
``gx/`` folder to commit or go stale): the suite is rebuilt from params on every
run, which is what makes the params file the single source of truth. The Data
Docs site is written by GX's own ``SiteBuilder`` into a fresh folder, which the
caller then swaps into place atomically.
"""

from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before GX is imported: no network calls

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd

log = logging.getLogger(__name__)

SUITE_NAME = "bonefrac_manifest"


@dataclass
class Outcome:
    """The result of one expectation, reduced to what quarantine and the summary need."""

    check: str
    severity: str
    expectation_type: str
    column: str | None
    success: bool
    unexpected_rows: list[int]
    observed_value: Any
    details: Any
    error: str | None


def run_suite(table: pd.DataFrame, expectations: list[Any], docs_dir: Path | None) -> list[Outcome]:
    """Validate ``table`` (RangeIndex) against ``expectations``; build Data Docs in ``docs_dir`` if given."""
    context = gx.get_context(mode="ephemeral")
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="bonefrac",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    batch_def = (
        context.data_sources.add_pandas("bonefrac")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole_manifest")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for e in expectations:
        suite.add_expectation(e)
    vd = context.validation_definitions.add(
        gx.ValidationDefinition(name="validate_manifest", data=batch_def, suite=suite)
    )
    actions = (
        [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["bonefrac"])] if docs_dir else []
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="bonefrac_validate",
            validation_definitions=[vd],
            actions=actions,
            result_format={"result_format": "COMPLETE"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": table})
    outcomes: list[Outcome] = []
    for vr in result.run_results.values():
        for er in vr.results:
            cfg = er.expectation_config
            meta = cfg.meta or {}
            res = er.result or {}
            exc = er.exception_info or {}
            raised = exc.get("raised_exception") if isinstance(exc, dict) else False
            outcomes.append(
                Outcome(
                    check=str(meta.get("check", cfg.type)),
                    severity=str(meta.get("severity", "warn")),
                    expectation_type=cfg.type,
                    column=cfg.kwargs.get("column") or cfg.kwargs.get("column_A"),
                    success=bool(er.success),
                    unexpected_rows=[int(i) for i in (res.get("unexpected_index_list") or [])],
                    observed_value=res.get("observed_value"),
                    details=res.get("details"),
                    error=str(exc.get("exception_message")) if raised else None,
                )
            )
    if docs_dir is not None:
        index = docs_dir / "index.html"
        if not index.exists():  # the action builds it; build explicitly if a GX version does not
            context.build_data_docs(site_names=["bonefrac"])
    return outcomes

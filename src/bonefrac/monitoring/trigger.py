"""Should a drift alarm start a retrain? Only when there is something new to learn from.

Drift says the images changed; a retrain helps only if labelled data from the new
distribution has reached the training set. Retraining on the data the champion was
already trained on rebuilds the same model (the registry recognises the bundle and
judges nothing), so an alarm without new data is recorded as "cannot act", with what
a person has to do, instead of starting a run that does nothing.

"New labelled data" here means either:

- the pipeline's data inputs changed since it last ran (DVC reports changed data
  deps or ``data.*`` params of the ``generate``/``ingest`` stages: a ``dvc add`` of new
  labelled images, another data root, a wider body-part selection), or
- the preprocessed data version recorded in ``dvc.lock`` is one no registered model
  was trained on yet (the champion's included).

The decision is a pure function of explicit inputs (:func:`retrain_decision`);
:func:`pending_data_change` asks DVC for the first condition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

DATA_STAGES: tuple[str, ...] = ("generate", "ingest")
UNKNOWN = {"", "unknown"}


@dataclass(frozen=True)
class TriggerDecision:
    """``retrain``: start one; ``none``: nothing to do; ``cannot_act``: drift, but nothing new to learn from."""

    action: Literal["retrain", "none", "cannot_act"]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retrain_decision(
    *,
    dataset_drift: bool,
    trigger_enabled: bool,
    data_version: str,
    champion_data_version: str | None,
    judged_data_versions: Iterable[str] = (),
    pending_data_change: bool | None = False,
) -> TriggerDecision:
    """What a drift check does about its verdict (see the module docstring for "new data").

    ``data_version`` is the current preprocessed data version (``dvc.lock``);
    ``judged_data_versions`` those of every registered model; ``pending_data_change``
    whether DVC sees changed data inputs (``None``: could not be asked).
    """
    if not dataset_drift:
        return TriggerDecision("none", "no drift")
    if not trigger_enabled:
        return TriggerDecision("none", "drift detected; drift.trigger_retrain is off, so no retrain was started")
    if pending_data_change:
        return TriggerDecision(
            "retrain", "drift detected and the pipeline's data inputs changed since it last ran (new labelled data)"
        )
    if data_version in UNKNOWN:
        return TriggerDecision(
            "cannot_act", "drift detected, but the current data version is unknown (no dvc.lock): not retraining blind"
        )
    seen = {v for v in judged_data_versions if v not in UNKNOWN} | (
        {champion_data_version} if champion_data_version else set()
    )
    if data_version not in seen:
        return TriggerDecision(
            "retrain",
            f"drift detected and data version {data_version} is one no registered model was trained on "
            f"(champion: {champion_data_version or 'none'})",
        )
    return TriggerDecision(
        "cannot_act",
        f"drift detected, but there is no new labelled data: data version {data_version} was already "
        f"trained on (champion: {champion_data_version or 'none'}); label recent images, add them to the "
        "training data (dvc add) and the next drift check starts a retrain",
    )


def pending_data_change(root: str | Path, stages: Iterable[str] = DATA_STAGES) -> bool | None:
    """Whether DVC reports changed data inputs of ``stages`` (not code: ``.py`` deps are ignored).

    ``None`` when DVC cannot tell (no DVC project, a broken ``dvc.yaml``): the caller then
    decides on the recorded data versions alone.
    """
    try:
        from dvc.repo import Repo

        dvc_yaml = Path(root).resolve() / "dvc.yaml"  # `file:stage`: DVC resolves bare names from the cwd
        with Repo(str(root)) as repo:
            status = repo.status(targets=[f"{dvc_yaml}:{stage}" for stage in stages])
    except Exception as err:  # DVC's errors are many; any of them means "cannot tell"
        logger.warning("could not ask DVC for changed data inputs: %s", type(err).__name__)
        return None
    for entries in status.values():
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            if entry.get("changed params"):
                return True
            deps = entry.get("changed deps") or {}
            if any(not str(path).endswith(".py") for path in deps):
                return True
    return False

"""Server-side zombie detection: a flow run that stops sending heartbeats is marked Crashed.

Prefect 3 flow runs emit ``prefect.flow-run.heartbeat`` events every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (30 s at least); the recipe in
Prefect's guide "detect zombie flows" is an automation that crashes a run when
no heartbeat (nor a final state) follows the last one within a window. It heals
runs on any machine, where :mod:`bonefrac.ops.sweep` only sees its own machine;
the sweep is faster (at worker start, no waiting window).
"""

from __future__ import annotations

from datetime import timedelta

AUTOMATION_NAME = "bonefrac: crash flow runs without heartbeat"
HEARTBEAT_S = 30  # Prefect's minimum


def ensure_zombie_automation(within_s: int = 4 * HEARTBEAT_S) -> str:
    """Create the automation once (found by name afterwards); returns its id."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        return str(Automation.read(name=AUTOMATION_NAME).id)
    except ValueError:
        pass  # not there yet
    automation = Automation(
        name=AUTOMATION_NAME,
        description="Flow runs whose process died (node lost, kill -9) stop beating: mark them Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_s} s: the flow run's process is gone",
            )
        ],
    ).create()
    return str(automation.id)

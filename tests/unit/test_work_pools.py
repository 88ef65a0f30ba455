"""prefect.yaml's Docker and Kubernetes deployments: job variables valid for their pool, a GPU asked for,
and the data pulled from the shared DVC remote before the flow runs.

prefect-docker and prefect-kubernetes are not installable here, so the pool types'
default base job templates come from the copy Prefect's server ships (the one
`prefect work-pool get-default-base-job-template --type docker` returns offline);
the job variables are validated with Prefect's own validator (the same call the
server makes on `prefect deploy`, exercised for real in test_prefect_server.py)
and rendered with Prefect's templating, as a worker does before starting a job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import prefect
import pytest
import yaml
from prefect.utilities.schema_tools import validate
from prefect.utilities.templating import apply_values

ROOT = Path(__file__).resolve().parents[2]
POOLS = {"bonefrac-docker": ("prefect-docker", "docker"), "bonefrac-k8s": ("prefect-kubernetes", "kubernetes")}


def _default_template(collection: str, kind: str) -> dict[str, Any]:
    path = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    return json.loads(path.read_text())[collection][kind]["default_base_job_configuration"]


def _deployments() -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["work_pool"]["name"]: d for d in spec["deployments"] if d["work_pool"]["name"] in POOLS}


def _render(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """What the worker builds: the variables' defaults, overridden by the deployment's, put into the template."""
    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    return apply_values(template["job_configuration"], {**values, **job_variables})


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_job_variables_validate_against_the_pools_schema(pool: str) -> None:
    collection, kind = POOLS[pool]
    ours = json.loads((ROOT / f"deploy/work-pools/{kind}.json").read_text())
    default = _default_template(collection, kind)
    # ours extends the type's default template: every standard variable and job field is still there
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    assert set(default["job_configuration"]) <= set(ours["job_configuration"])
    variables = _deployments()[pool]["work_pool"]["job_variables"]
    assert validate(variables, ours["variables"], preprocess=True, ignore_required=True) == []
    # the checks bite: a GPU count that is not an integer, or a variable the pool does not know
    gpu_var = "gpus" if kind == "docker" else "gpu_limit"
    assert validate({**variables, gpu_var: "two"}, ours["variables"], preprocess=True, ignore_required=True)
    std = {k: v for k, v in variables.items() if k in default["variables"]["properties"]}
    assert validate(std, default["variables"], preprocess=True, ignore_required=True) == []


def test_docker_job_requests_a_gpu_and_shared_storage() -> None:
    template = json.loads((ROOT / "deploy/work-pools/docker.json").read_text())
    job = _render(template, _deployments()["bonefrac-docker"]["work_pool"]["job_variables"])
    # docker-py's containers.create(device_requests=...), i.e. `docker run --gpus 1`
    (request,) = job["container_create_kwargs"]["device_requests"]
    assert request["count"] == 1 and request["capabilities"] == [["gpu"]]
    assert job["container_create_kwargs"]["shm_size"] == "8g"
    assert any(v.endswith(":/opt/bonefrac/shared") for v in job["volumes"])
    assert job["env"]["BENTOML_HOME"].startswith("/opt/bonefrac/shared/")


def test_kubernetes_job_requests_a_gpu_and_mounts_the_shared_volume() -> None:
    template = json.loads((ROOT / "deploy/work-pools/kubernetes.json").read_text())
    job = _render(template, _deployments()["bonefrac-k8s"]["work_pool"]["job_variables"])
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["memory"] == "16Gi"
    assert {"name": "shared", "mountPath": "/opt/bonefrac/shared"} in container["volumeMounts"]
    claim = next(v for v in pod["volumes"] if v["name"] == "shared")["persistentVolumeClaim"]["claimName"]
    assert claim == "bonefrac-shared"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert job["namespace"] == "bonefrac"


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_container_runs_pull_the_data_first_and_start_switched_off(pool: str) -> None:
    dep = _deployments()[pool]
    assert dep["entrypoint"] == "flows/retrain.py:retrain_flow" and dep["concurrency_limit"] == 1
    steps = [next(iter(step.items())) for step in dep["pull"]]
    assert steps[0] == ("prefect.deployments.steps.set_working_directory", {"directory": "/opt/bonefrac"})
    name, args = steps[1]
    assert name == "prefect.deployments.steps.run_shell_script"
    assert args["script"].startswith("python -m dvc pull --remote shared")
    assert all(not s["active"] for s in dep["schedules"])  # no runs pile up before such a worker exists
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /opt/bonefrac" in dockerfile and "remote add --local -f shared" in dockerfile

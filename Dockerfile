# The image Prefect's Docker and Kubernetes work pools run the flows in (prefect.yaml:
# retrain-docker, retrain-k8s). The same locked environment as `make install`; the
# torch wheel in requirements.lock carries its CUDA libraries, so a GPU host needs only
# the NVIDIA driver and container toolkit (the job templates request the GPU).
#
#   docker build -t bonefrac-flows:latest .
#   docker run --rm --gpus 1 bonefrac-flows:latest python -c "import torch; print(torch.cuda.is_available())"
#
# Data and models are not in the image: each run starts with `dvc pull --remote shared`
# (the deployment's pull step) from the team's remote, and the model registry
# (BENTOML_HOME) lives on the shared volume mounted at /opt/bonefrac/shared.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 BENTOML_DO_NOT_TRACK=true GX_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 \
    PREFECT_HOME=/opt/bonefrac/.prefect TORCH_HOME=/opt/bonefrac/.torch \
    BENTOML_HOME=/opt/bonefrac/shared/bentoml \
    PYTHONPATH=/opt/bonefrac/src:/opt/bonefrac

RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/bonefrac
COPY requirements.lock pyproject.toml ./
RUN pip install --no-deps -r requirements.lock && pip check
COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
    # no .git in the image: DVC works without SCM; the shared remote is a path on the
    # shared volume by default (point it at s3://, gs://, ... with `dvc remote modify`)
    && python -m dvc config --local core.no_scm true \
    && python -m dvc remote add --local -f shared /opt/bonefrac/shared/dvc-remote

CMD ["python", "-m", "bonefrac.cli", "--help"]

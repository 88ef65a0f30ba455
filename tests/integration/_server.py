"""Start and stop a real ``bentoml serve`` on 127.0.0.1 for integration tests, and make tiny models.

The server always runs in its own process group and is always killed (SIGTERM,
then SIGKILL) when the context exits, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from benchmarks._servers import free_port, stop  # one start/stop helper for tests and benchmarks

from bonefrac.model.calibrate import CalibrationMap
from bonefrac.model.transforms import PreprocessSpec

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "bonefrac.serving.service:FractureService"
TYPE_NAMES = ["transverse", "oblique", "comminuted"]
TEST_SPEC = PreprocessSpec(image_size=64, volume_size=(16, 32, 32), lower_percentile=1.5, upper_percentile=98.5)
TEST_CALIBRATION = CalibrationMap(method="platt", slope=0.6, intercept=-0.3)


def make_tiny_bundle(
    path: Path,
    spatial_dims: int = 2,
    image_size: int = 64,
    seed: int = 0,
    type_names: list[str] | None = None,
) -> Path:
    """A small random-weight custom CNN bundle with made-up calibration and operating points."""
    from bonefrac.model.bundle import ModelBundle
    from bonefrac.model.networks import build_model

    # Non-default preprocessing and a Platt map with an intercept: a consumer that drops either is caught.
    spec = TEST_SPEC.model_copy(update={"spatial_dims": spatial_dims, "image_size": image_size})
    torch.manual_seed(seed)
    types = TYPE_NAMES if type_names is None else type_names
    model = build_model("custom_cnn", num_types=len(types), spatial_dims=spatial_dims)
    with torch.no_grad():
        # Random features barely move the logit: a larger head makes images differ, and
        # centring the bias on typical inputs keeps probabilities away from 0 and 1.
        head = model.head[-1]
        head.weight.mul_(5.0)
        if spatial_dims == 2:
            from tests._factories import make_array

            probe = torch.stack(
                [
                    spec.apply(make_array((48 + 8 * i, 64), seed=i).T if i % 2 else make_array((64, 64), seed=i))
                    for i in range(8)
                ]
            )
        else:
            probe = torch.rand((8, 1, 16, 32, 32), generator=torch.Generator().manual_seed(seed))
        head.bias.sub_(model.eval()(probe).mean(dim=0))
    bundle = ModelBundle(
        arch="custom_cnn",
        state_dict=model.state_dict(),
        preprocess_spec=spec,
        type_names=list(types),
        calibration=TEST_CALIBRATION,
        operating_points={"high_sensitivity": 0.35, "high_specificity": 0.65},
        metadata={"model_name": "bonefrac-test", "version": f"t{seed}", "metrics": {"auroc": 0.5}},
    )
    return bundle.save(path)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def server_env(model_path: Path | None, workdir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "BONEFRAC_MODEL_PATH": str(model_path),
            "BONEFRAC_PREDICTION_LOG_DIR": str(workdir / "predictions"),
            "BONEFRAC_ONNX_CACHE": str(workdir / "onnx"),
            "BENTOML_HOME": str(workdir / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            "DO_NOT_TRACK": "1",
            "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "BONEFRAC_PARAMS": str(workdir / "no-params.yaml"),  # defaults + env only: tests are explicit
            # No key unless a test sets one: say so explicitly (without either, the service refuses to start).
            "BONEFRAC_INSECURE_LOCAL": "1",
        }
    )
    env.pop("BONEFRAC_API_KEY", None)
    if model_path is None:  # no pinned file: the service loads the Bento's model or the registry's champion
        env.pop("BONEFRAC_MODEL_PATH")
    env.update(extra)
    return env


@contextlib.contextmanager
def running_server(
    model_path: Path | None, workdir: Path, timeout: float = 180.0, target: str = SERVICE, **extra_env: str
) -> Iterator[Server]:
    """``bentoml serve <target>`` on a free 127.0.0.1 port; yields once ``/readyz`` answers 200.

    ``target`` is the service import path or a built Bento's tag (``bonefrac:latest``).
    """
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"server-{port}.log"
    log = log_path.open("wb")
    cmd = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=server_env(model_path, workdir, **extra_env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield Server(url, proc, log_path)
    finally:
        stop(proc)
        log.close()

"""Start and stop the servers the benchmarks measure (BentoML service, naive FastAPI) on 127.0.0.1.

Each server runs in its own process group and is always killed (SIGTERM, then
SIGKILL) when its context exits, even when the benchmark fails.
"""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks._common import REPO_ROOT, child_env, python_exe
from bonefrac.ops.processes import free_port, stop_group

SERVICE = "bonefrac.serving.service:FractureService"
NAIVE_APP = "benchmarks.naive_fastapi:app"


class ServerError(RuntimeError):
    """A server exited or never became ready; the message ends with its log."""


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_s: float


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the server's group (BentoML drains in-flight requests), SIGKILL after ``grace``."""
    stop_group(proc, grace_s=grace, first=signal.SIGTERM)


@contextlib.contextmanager
def serve(
    argv: Sequence[str], work: Path, env_extra: Mapping[str, str], port: int, timeout: float = 300.0
) -> Iterator[Server]:
    """Run ``argv`` in ``work``, wait for ``GET /readyz`` = 200, yield, then stop it."""
    env = child_env(REPO_ROOT, {"BENTOML_HOME": str(work / "bentoml"), "BONEFRAC_INSECURE_LOCAL": "1", **env_extra})
    env.pop("BONEFRAC_API_KEY", None)
    log_path = work / f"server-{port}.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    raise ServerError(f"{argv[2:4]} exited with {proc.returncode}:\n{_tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.perf_counter() - t0 > timeout:
                    raise ServerError(f"not ready after {timeout:.0f} s:\n{_tail(log_path)}")
                time.sleep(0.5)
            yield Server(url, proc, log_path, time.perf_counter() - t0)
        finally:
            stop(proc)


def _tail(path: Path, n: int = 2500) -> str:
    return path.read_text(errors="replace")[-n:]


def bentoml_server(
    bundle: Path, work: Path, env_extra: Mapping[str, str] | None = None, timeout: float = 300.0
) -> contextlib.AbstractContextManager[Server]:
    """``bentoml serve`` of the project's service on a free port, serving ``bundle``."""
    port = free_port()
    env = {
        "BONEFRAC_MODEL_PATH": str(bundle),
        "BONEFRAC_PREDICTION_LOG_DIR": str(work / "predictions"),
        "BONEFRAC_ONNX_CACHE": str(work / "onnx"),
        "BONEFRAC_PARAMS": str(REPO_ROOT / "params.yaml"),
        **(env_extra or {}),
    }
    argv = [python_exe(), "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)]
    return serve(argv, work, env, port, timeout)


def naive_server(bundle: Path, work: Path, timeout: float = 120.0) -> contextlib.AbstractContextManager[Server]:
    """The naive baseline (FastAPI + eager PyTorch, one image per request) on a free port."""
    port = free_port()
    argv = [python_exe(), "-m", "uvicorn", NAIVE_APP, "--host", "127.0.0.1", "--port", str(port)]
    return serve(argv, work, {"BONEFRAC_MODEL_PATH": str(bundle)}, port, timeout)


def random_bundle(path: Path, arch: str | None = None, image_size: int | None = None) -> Path:
    """A bundle with random weights (speed and memory do not depend on the values).

    ``arch`` / ``image_size`` default to ``params.yaml``'s.
    """
    from bonefrac.config import load_params
    from bonefrac.model.bundle import ModelBundle
    from bonefrac.model.networks import build_model
    from bonefrac.model.transforms import PreprocessSpec

    p = load_params(REPO_ROOT / "params.yaml")
    arch = arch or p.model.arch
    types = ["transverse", "oblique", "comminuted"]
    model = build_model(arch, num_types=len(types), pretrained="none", spatial_dims=p.spatial_dims)
    spec = PreprocessSpec.from_params(p.preprocess, p.spatial_dims)
    if image_size:
        spec = spec.model_copy(update={"image_size": int(image_size)})
    bundle = ModelBundle(
        arch=arch,
        state_dict=model.state_dict(),
        preprocess_spec=spec,
        type_names=types,
        operating_points={"high_sensitivity": 0.3, "high_specificity": 0.7},
        metadata={"model_name": "bonefrac-bench", "version": "bench"},
    )
    return bundle.save(path)


def test_png(size: int = 512) -> bytes:
    """A synthetic radiograph-like 8-bit PNG (gradient plus a bright bar), made in memory."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    arr = (40 + 80 * x / size + 20 * np.sin(y / 17.0)).astype(np.float32)
    arr[size // 3 : size // 3 + size // 10, size // 5 : 4 * size // 5] += 110
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()

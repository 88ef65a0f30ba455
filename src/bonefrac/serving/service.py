"""The BentoML service: real-time fracture predictions, Grad-CAM, metadata and the viewer.

Two BentoML services, the canonical way to get adaptive batching behind
per-request work (decoding, preprocessing, safety checks):

* :class:`FractureModel` holds the network. Its ``infer`` API is batchable: BentoML
  groups concurrent requests' preprocessed tensors into one forward pass
  (``max_batch_size`` / ``max_latency_ms`` from ``params.yaml`` ``serving``, or
  ``BONEFRAC_MAX_BATCH_SIZE`` / ``BONEFRAC_MAX_LATENCY_MS``). It runs eager PyTorch on
  the GPU when there is one, else the faster of PyTorch and ONNX Runtime as
  measured at start-up (``BONEFRAC_BACKEND``=auto|torch|onnx).
* :class:`FractureService` is the public face: ``POST /predict``, ``POST /explain``,
  ``GET /metadata``, the viewer at ``/``, BentoML's ``/livez`` and ``/readyz``. It
  decodes and checks uploads (:mod:`bonefrac.serving.input_safety`), preprocesses
  and calibrates through the model contract (:meth:`ModelBundle.preprocess`,
  :meth:`ModelBundle.calibrate`, rebuilt from the model service's description),
  and logs PHI-free prediction records for drift monitoring.

Safety (issue 16): uploads are read by :class:`UploadFormMiddleware` (strict
multipart or a raw body, no URL fetching, canonical form for BentoML); every error
answer is ``{"error", "status"}`` JSON and never a 500 (:class:`ErrorShapeMiddleware`);
an API key is required unless ``serving.insecure_local``; ``/readyz`` answers 503
within a second while the model worker is down; on SIGTERM the model worker keeps
answering until the front end's in-flight requests are done.

Run: ``bentoml serve bonefrac.serving.service:FractureService`` (see README).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import torch
from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.staticfiles import StaticFiles

from bonefrac.config import load_settings, resolve
from bonefrac.errors import BonefracError
from bonefrac.explain import display as visual
from bonefrac.inference.backends import default_device
from bonefrac.inference.upload_policy import check_upload, stored_size, upload_decode_hints
from bonefrac.model.bundle import ModelBundle
from bonefrac.monitoring.ood import OODDetector
from bonefrac.monitoring.prediction_log import append_prediction, image_fields, prediction_record
from bonefrac.registry.resolve import MODEL_PATH_ENV, LoadedModel, champion_tag, load_embedded, resolve_model
from bonefrac.serving.auth import APIKeyMiddleware, require_api_key, send_json_error
from bonefrac.serving.decode_gate import TRIM_AFTER_BYTES, DecodeGate, release_memory
from bonefrac.serving.input_safety import InputRejected, SafetyLimits, UploadLimitMiddleware, decode_upload
from bonefrac.serving.model_slot import ModelSlot, serve, split_model_output
from bonefrac.serving.paths import PUBLIC_PATHS, STATIC_DIR, UnknownPathMiddleware, install_before_bentoml_middleware
from bonefrac.serving.upload_form import ErrorShapeMiddleware, UploadFormMiddleware
from bonefrac.serving.upload_ood import decoded_image_ood_features

logger = logging.getLogger("bonefrac.serving")

PARAMS = load_settings()
SETTINGS = PARAMS.serving
_HAS_GPU = torch.cuda.is_available()


# --------------------------------------------------------------------------- model
class _Siblings:
    """The other worker processes of this ``bentoml serve`` (the front ends), kept up to date.

    circus starts each worker in its own session, so they share only their parent,
    ``bentoml serve``; at SIGTERM that parent may already be gone (its orphans are
    re-parented). So a daemon thread notes the parent's other children every 2 s.
    """

    def __init__(self) -> None:
        self.seen: dict[int, Any] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="bonefrac-siblings", daemon=True).start()

    def _scan(self) -> None:
        try:
            import psutil  # a BentoML dependency

            found = [p for p in psutil.Process(os.getppid()).children() if p.pid != os.getpid()]
        except Exception:
            return
        with self._lock:
            for p in found:
                self.seen.setdefault(p.pid, p)

    def _watch(self) -> None:
        while True:
            self._scan()
            time.sleep(2.0)

    def current(self) -> list[Any]:
        self._scan()
        with self._lock:
            return list(self.seen.values())


def _alive(procs: list[Any]) -> bool:
    import psutil

    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            continue
    return False


def _drain_on_sigterm(last_call: Any, idle_s: float, max_s: float) -> None:
    """On SIGTERM, keep serving until the front ends have exited (at most ``max_s``), then shut down.

    Stopping ``bentoml serve`` (SIGTERM to it, ``docker stop``) makes circus send
    SIGTERM to every worker at once. The front end drains its in-flight
    requests (uvicorn finishes them), but they still need this process: were it to stop
    at once they would end as 503 "model busy". So this worker waits until its sibling
    workers (the front ends) are gone; where they cannot be seen, until no call came
    for ``idle_s``. Installed from ``__init__``, which runs in the main thread after
    uvicorn installed its own handler; that handler is called at the end.
    """
    if threading.current_thread() is not threading.main_thread() or max_s <= 0:
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return
    state = {"draining": False}
    watcher = _Siblings()

    def wait_then_exit(sig: int, frame: Any) -> None:
        t0 = time.monotonic()
        siblings = [p for p in watcher.current() if _alive([p])]
        logger.warning("SIGTERM: model worker draining (waiting for %d front-end process(es))", len(siblings))
        while time.monotonic() - t0 < max_s:
            idle = time.monotonic() - max(last_call(), t0) >= idle_s
            if (siblings and not _alive(siblings)) or (not siblings and idle):
                break
            time.sleep(0.1)
        logger.warning("model worker drained in %.1f s; shutting down", time.monotonic() - t0)
        previous(sig, frame)  # uvicorn's handler only sets a flag: safe from this thread

    def on_sigterm(sig: int, frame: Any) -> None:
        if state["draining"]:
            return
        state["draining"] = True
        threading.Thread(target=wait_then_exit, args=(sig, None), name="bonefrac-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def model_resources(gpu: str, has_gpu: bool) -> dict[str, Any]:
    """What the model worker declares (bento.yaml; BentoCloud/Kubernetes schedule on it).

    Two cores: ONNX Runtime / PyTorch intra-op threads (benchmarks.service). One GPU only when
    the Bento is built for one (``serving.gpu: on``, i.e. ``BONEFRAC_GPU=on bentoml build -f
    bentofile.gpu.yaml``) or, with ``auto``, when the building machine has one.
    """
    if gpu == "on" or (gpu == "auto" and has_gpu):
        return {"gpu": 1, "cpu": "2"}
    return {"cpu": "2"}


#: The model ``bentoml build`` packs into the Bento: the registry's champion at build time
#: (a BentoML model reference, so ``bentoml containerize`` copies it into the image).
_PACKED_MODEL = champion_tag(SETTINGS.model_name)


def _initial_model() -> tuple[LoadedModel, bool]:
    """The model to start with and whether to follow the registry afterwards.

    ``BONEFRAC_MODEL_PATH`` pins a bundle file (never followed); a built Bento starts on
    the model packed in it; otherwise the registry's champion.
    """
    if os.environ.get(MODEL_PATH_ENV):
        return resolve_model(model_name=SETTINGS.model_name), False
    bento = getattr(FractureModel, "bento", None)  # BentoML sets it when serving a built Bento
    if bento is not None:
        packed = [str(m.tag) for s in bento.info.services if s.name == "bonefrac_model" for m in s.models]
        if packed:
            return load_embedded(packed[0]), True
    return resolve_model(model_name=SETTINGS.model_name), True


@bentoml.service(
    name="bonefrac_model",
    workers=1,
    resources=model_resources(SETTINGS.gpu, _HAS_GPU),
    traffic={"timeout": 120},
    # The front end's client to this service (BentoML's proxy2) replaces its aiohttp session every
    # 100 calls or 300 s and closes the old one with calls still in flight on it: they fail
    # (ServerDisconnectedError, retried) or, about one in 5,000, never complete although this worker
    # answered in milliseconds (the 30-s stall of issue 16; benchmarks/results/service-*.log).
    # One session for the life of the process: a unix socket has nothing to refresh.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
class FractureModel:
    """The network behind a batchable API; not exposed on the public port.

    The model itself sits in a :class:`~bonefrac.serving.model_slot.ModelSlot`, which swaps
    it atomically when the registry's champion changes (promote, rollback).
    """

    if _PACKED_MODEL:
        packed_model = bentoml.models.BentoModel(_PACKED_MODEL)

    def __init__(self) -> None:
        loaded, follow = _initial_model()
        self.slot = ModelSlot(serve(loaded, SETTINGS, default_device()), SETTINGS, follow=follow)
        self.slot.watch(SETTINGS.registry_poll_s)
        self._last_call = time.monotonic()
        _drain_on_sigterm(lambda: self._last_call, SETTINGS.drain_idle_s, SETTINGS.drain_max_s)
        current = self.slot.current
        logger.info(
            "model %s ready on %s (%s); following the registry: %s",
            current.tag,
            current.device,
            current.choice.reason,
            follow,
        )

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def infer(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed batch ``(N, 1, ...)`` on [0, 1] → logits ``(N, 1 + T)`` + the model's ``load_id`` column."""
        self._last_call = time.monotonic()
        try:
            return self.slot.current.infer(x)
        finally:
            self._last_call = time.monotonic()

    @bentoml.api
    def cam(self, x: np.ndarray) -> np.ndarray:
        """The map shown for one preprocessed image ``(1, 1, ...)`` → ``(...)``: the network's own
        evidence map where it has one (dense archs), else Grad-CAM of the fracture logit."""
        self._last_call = time.monotonic()
        try:
            return self.slot.current.cam(x)
        finally:
            self._last_call = time.monotonic()

    @bentoml.api
    def info(self) -> dict[str, Any]:
        """Model facts (no paths or identifiers), its ``load_id`` and the backend choice."""
        return self.slot.current.info()

    @bentoml.api
    def reload(self) -> dict[str, Any]:
        """Load the registry's champion now if it is not the model served (the admin endpoint)."""
        return self.slot.check(force=True)


# --------------------------------------------------------------------------- public service
web = FastAPI(title="bonefrac", docs_url=None, redoc_url=None, openapi_url=None)
web.mount("/ui", StaticFiles(directory=STATIC_DIR, html=True), name="ui")


class ViewerAtRootMiddleware:
    """Serve the viewer at ``/``: BentoML's own index route would otherwise win over mounts."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope.get("type") == "http"
            and scope.get("path") in ("/", "/index.html")
            and scope.get("method") in ("GET", "HEAD")
        ):
            scope = {**scope, "path": "/ui/", "raw_path": b"/ui/"}
        await self.app(scope, receive, send)


def _transient(err: BaseException) -> bool:
    """A connection dropped under us (not a model error): worth one more try."""
    try:
        import aiohttp

        if isinstance(err, aiohttp.ClientConnectionError | aiohttp.ServerDisconnectedError):
            return True
    except ImportError:  # pragma: no cover - bentoml depends on aiohttp
        pass
    names = {"ServerDisconnectedError", "RemoteProtocolError"}
    return isinstance(err, ConnectionError) or type(err).__name__ in names


#: The model worker's readiness as this front-end process last probed it (None: not probed yet).
_MODEL_READY: dict[str, bool | None] = {"ready": None}


class FastReadyzMiddleware:
    """Answer ``GET /readyz`` from the last probe of the model worker, without waiting on it.

    Until the first probe (started by BentoML's own ``/readyz`` through
    ``FractureService.__is_ready__``) the request goes to BentoML.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        ready = _MODEL_READY["ready"]
        if scope.get("type") != "http" or scope.get("path") != "/readyz" or ready is None:
            await self.app(scope, receive, send)
            return
        if ready:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"\n"})
        else:
            await send_json_error(send, 503, "not ready: the model worker is not answering (starting or restarting)")


def _error(exc: InputRejected) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status, headers={"x-bonefrac-error": "1"})


def _unavailable(what: str, err: BaseException) -> InputRejected:
    """A failure of the service (not of the upload): 503, logged by type only (messages may quote input)."""
    logger.warning("%s failed: %s", what, type(err).__name__)
    return InputRejected(HTTPStatus.SERVICE_UNAVAILABLE, f"{what} failed, retry shortly ({type(err).__name__})")


@bentoml.asgi_app(web, path="/")
@bentoml.service(name="bonefrac", workers=SETTINGS.workers, traffic={"timeout": 120})
class FractureService:
    """Public API and viewer; the network runs in :class:`FractureModel`."""

    model = bentoml.depends(FractureModel)

    @bentoml.on_deployment
    def _refuse_to_serve_without_a_key() -> None:
        """Runs once in ``bentoml serve`` before any worker starts (not in ``bentoml build``)."""
        require_api_key(SETTINGS.api_key, SETTINGS.insecure_local)
        if not SETTINGS.api_key:
            logger.warning("serving WITHOUT authentication (serving.insecure_local): trusted machines only")

    def __init__(self) -> None:
        # Requests are decoded and preprocessed in parallel threads; intra-op threads on top
        # of that only oversubscribe the cores the model process needs (benchmarks.service).
        torch.set_num_threads(1)
        self.settings = SETTINGS
        self.limits = SafetyLimits.from_params(SETTINGS)
        self._info: dict[str, Any] | None = None
        self._contract: ModelBundle | None = None
        self._ood: OODDetector | None = None
        self._info_lock = asyncio.Lock()
        # Decode + preprocess at most one job per core at a time: more only interleaves
        # them (every request finishes later) and starves the model process. Requests wait
        # in FIFO order instead (benchmarks.service: higher peak req/s, lower p50). And the
        # decodes in flight together need at most max_decoded_mb (benchmarks.decode_bombs).
        slots = SETTINGS.decode_slots or (os.cpu_count() or 1)
        self._decode_gate = DecodeGate(slots, self.limits.max_decoded_bytes)
        self._probe_task: asyncio.Task[None] | None = None

    async def __is_ready__(self) -> bool:
        """Ready when the model worker answered its own /readyz within half a second, lately.

        BentoML's own dependency probe waits up to 5 s per try, and a worker being
        restarted accepts connections it answers only once the model is loaded (~25 s
        seen): an orchestrator must get its 503 at once instead. A background task
        probes the model worker every half second; this answers from its last result.
        """
        if getattr(self.model, "is_ready", None) is None:  # the model runs in this process
            return True
        if self._probe_task is None or self._probe_task.done():
            _MODEL_READY["ready"] = await self._probe_model()
            self._probe_task = asyncio.create_task(self._probe_loop())
        return bool(_MODEL_READY["ready"])

    async def _probe_model(self) -> bool:
        try:
            # Half a second: the answer must reach the prober within one even on a loaded machine.
            return bool(await asyncio.wait_for(self.model.is_ready(0.5), timeout=0.5))
        except Exception:  # timeout, refused, reset: not ready
            return False

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            _MODEL_READY["ready"] = await self._probe_model()

    async def _model_info(self, refresh: bool = False) -> dict[str, Any]:
        """The model worker's description, with the contract and OOD detector built from it.

        One snapshot per request: ``_contract`` and ``_ood`` travel inside the dict, so a
        request preprocesses and calibrates with the same model even while another request
        refreshes the snapshot after a reload (``refresh``).
        """
        if self._info is None or refresh:
            async with self._info_lock:
                stale = self._info
                if self._info is None or (refresh and self._info is stale):
                    info = await self.model.to_async.info()
                    contract = ModelBundle.from_description(info)
                    ood = OODDetector.from_dict(info["ood"]) if info.get("ood") else None
                    self._contract, self._ood = contract, ood
                    self._info = {**info, "_contract": contract, "_ood": ood}
        return self._info  # type: ignore[return-value]

    # ------------------------------------------------------------------ helpers
    async def _call_model(self, api: str, x: np.ndarray, attempts: int = 3) -> Any:
        """Call the model service, retrying a dropped pooled connection.

        The model server closes idle keep-alive connections; the client may reuse one
        just as it closes (aiohttp ``ServerDisconnectedError``). Inference is
        idempotent, so a retry is safe; measured: without it ~4% of requests failed
        under 8 concurrent clients.
        """
        # A healthy call waits at most max_latency_ms in the batch queue; one that takes far
        # longer was lost (seen once in ~5,000 requests at 16 clients: it hung until the
        # 120-s traffic timeout). Give up on it and retry instead of holding the client.
        budget_s = self.settings.max_latency_ms / 1000 + 20.0
        for attempt in range(attempts):
            try:
                return await asyncio.wait_for(getattr(self.model.to_async, api)(x), timeout=budget_s)
            except Exception as err:
                if attempt + 1 < attempts and (_transient(err) or isinstance(err, TimeoutError)):
                    logger.warning("model call %s failed (%s); retrying", api, type(err).__name__)
                    continue
                raise
        raise RuntimeError("unreachable")

    async def _prepare(
        self, file: Path, info: dict[str, Any], display_side: int = 0, keep_image: bool = False
    ) -> tuple[Any, np.ndarray, dict[str, float], dict[str, Any]]:
        """Upload → (decoded image or None, model input batch (1, 1, ...), timings, image facts).

        The model's input is decoded at the scale its preprocessing defines
        (``PreprocessSpec.decode_side_hint``: a large JPEG at the smallest DCT scale that
        keeps both sides >= the input side), exactly as in training and ``bonefrac predict``.
        A model of preprocessing version 1 decodes at full resolution unless
        ``serving.reduced_jpeg_decode`` (then also for ``display_side``, the picture
        /explain returns). Everything that needs the pixels (the facts for the answer, the
        log and the OOD check) is done while the decode gate holds its memory; the array is
        then dropped unless ``keep_image`` (/explain draws it, from a full-resolution decode
        when the model's own was reduced), so what waits for the model is small.
        """
        dims = int(info["spatial_dims"])
        contract: ModelBundle = info["_contract"]
        hint, display_hint = upload_decode_hints(contract.preprocess_spec, SETTINGS.reduced_jpeg_decode, display_side)
        try:
            data = await asyncio.to_thread(file.read_bytes)
        except OSError as err:
            raise InputRejected(HTTPStatus.BAD_REQUEST, "the upload could not be read") from err
        # Refused from the header before queueing (bombs, formats); else the decode's memory need
        # (the larger display decode's when /explain needs the picture too).
        need = check_upload(data, dims, self.limits, display_hint if keep_image else hint)
        t_wait = time.perf_counter()
        async with self._decode_gate.admit(need):
            t0 = time.perf_counter()
            try:
                img, x, facts, t1, t2 = await self._decode_and_measure(data, info, hint, keep_image)
                t3 = time.perf_counter()
                if keep_image and display_hint != hint and (img.meta or {}).get("full_size"):
                    img = await asyncio.to_thread(decode_upload, data, dims, self.limits, display_hint)
            finally:
                del data
                if need >= TRIM_AFTER_BYTES:  # hand the decode's freed arenas back to the OS
                    await asyncio.to_thread(release_memory)
            t4 = time.perf_counter()
        timings = {
            "queue": (t0 - t_wait) * 1000,
            "decode": (t1 - t0) * 1000,
            "preprocess": (t2 - t1) * 1000,
            "statistics": (t3 - t2) * 1000,
        }
        if keep_image:  # /explain: the picture's own decode (when the model's was reduced) and the memory trim
            timings["display_decode"] = (t4 - t3) * 1000
        return img, x.numpy()[None], timings, facts

    async def _decode_and_measure(
        self, data: bytes, info: dict[str, Any], hint: int | None, keep_image: bool
    ) -> tuple[Any, torch.Tensor, dict[str, Any], float, float]:
        """Decode, preprocess and take the image facts; (image or None, input, facts, t decoded, t preprocessed)."""
        img = await asyncio.to_thread(decode_upload, data, int(info["spatial_dims"]), self.limits, hint)
        t1 = time.perf_counter()
        try:  # this request's model snapshot (info), never a newer one swapped in meanwhile
            x = await asyncio.to_thread(info["_contract"].preprocess, img.array)
            t2 = time.perf_counter()
            facts = await asyncio.to_thread(self._image_facts, img, info.get("_ood"))
        except MemoryError:
            raise InputRejected(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "image too large to preprocess") from None
        except Exception as err:  # the contract refused this image: the input's fault, not ours
            logger.warning("preprocessing raised %s", type(err).__name__)
            raise InputRejected(
                HTTPStatus.UNPROCESSABLE_ENTITY, f"the image could not be preprocessed ({type(err).__name__})"
            ) from None
        # Dropped here, inside the gate, before its memory is handed back (unless /explain draws it).
        return (img if keep_image else None), x, facts, t1, t2

    def _image_facts(self, img: Any, detector: OODDetector | None) -> dict[str, Any]:
        """What the answer, the prediction log and the OOD check need from the decoded pixels."""
        h, w = stored_size(img)
        return {
            "image": {
                "width": w,
                "height": h,
                "depth": int(img.array.shape[0]) if img.array.ndim == 3 else 1,
                "format": img.format,
                "bit_depth": int(img.bit_depth),
            },
            "log": image_fields(img),
            "ood_features": self._ood_features(img, detector),
        }

    async def _predict_one(
        self, file: Path, display_side: int = 0, keep_image: bool = False
    ) -> tuple[dict[str, Any], Any, np.ndarray, dict[str, Any]]:
        t_start = time.perf_counter()
        for attempt in range(3):
            try:
                info = await self._model_info(refresh=attempt > 0)
            except Exception as err:
                raise _unavailable("reading the model description", err) from None
            img, x, timings, facts = await self._prepare(file, info, display_side, keep_image)
            t0 = time.perf_counter()
            try:
                out = await self._call_model("infer", x)
            except Exception as err:  # the batch queue sheds load with 503 when over its latency budget
                logger.warning("model call failed: %s", type(err).__name__)
                raise InputRejected(
                    HTTPStatus.SERVICE_UNAVAILABLE, f"model busy, retry shortly ({type(err).__name__})"
                ) from err
            logits, embedding, load_id = split_model_output(out)
            if load_id == info.get("load_id"):
                break
            # The model was swapped (promote/rollback) between our preprocessing and the forward
            # pass: redo the request with the new model's contract, never mix two models.
            logger.info("model changed during a request; redoing it with the new model")
        else:
            raise InputRejected(HTTPStatus.SERVICE_UNAVAILABLE, "the model is being replaced, retry shortly")
        timings["inference"] = (time.perf_counter() - t0) * 1000
        t_ood = time.perf_counter()
        ood = self._ood_score(info.get("_ood"), facts["ood_features"], embedding[0] if embedding.size else None)
        timings["ood"] = (time.perf_counter() - t_ood) * 1000
        row = info["_contract"].calibrate(np.asarray(logits)).row(0, info["type_names"])
        timings["total"] = (time.perf_counter() - t_start) * 1000
        result: dict[str, Any] = {
            "probability": row["probability"],
            "decisions": row["decisions"],
            "thresholds": info["operating_points"],
            "model": {"name": info["name"], "version": info["version"], "arch": info["arch"]},
            "image": facts["image"],
            "timing_ms": {k: round(v, 2) for k, v in timings.items()},
        }
        if "fracture_type_probabilities" in row:
            result["fracture_type_probabilities"] = row["fracture_type_probabilities"]
        if ood is not None:
            result["ood"] = ood
        self._log(result, facts["log"], row)
        return result, img, x, info

    def _ood_features(self, img: Any, detector: OODDetector | None = None) -> dict[str, float] | None:
        """The image statistics of the OOD check, taken while the decoded pixels are at hand.

        A warning for the reader, never a reason to fail the answer: any error here is logged
        and the prediction goes out without it.
        """
        detector = detector if detector is not None else self._ood
        if detector is None:
            return None
        try:
            return decoded_image_ood_features(img)
        except (ValueError, KeyError, TypeError, FloatingPointError) as err:
            logger.warning("OOD check skipped: %s", type(err).__name__)
            return None

    def _ood_score(
        self, detector: OODDetector | None, feats: dict[str, float] | None, embedding: np.ndarray | None
    ) -> dict[str, Any] | None:
        """Is this image like the training images? Image statistics and the model's embedding (from the
        same forward pass as the logits, projected on the reference's PCA) against the model's own
        reference; ``fired`` says which check warned. Never fails the answer."""
        if detector is None or feats is None:
            return None
        try:
            return detector.score(feats, embedding)
        except (BonefracError, ValueError, KeyError, TypeError, FloatingPointError) as err:
            logger.warning("OOD check skipped: %s", type(err).__name__)
            return None

    def _log(self, result: dict[str, Any], image_log: dict[str, Any], row: dict[str, Any]) -> None:
        try:
            append_prediction(
                resolve(PARAMS.paths.predictions_log),
                prediction_record(
                    image_log,
                    model_name=result["model"]["name"],
                    model_version=result["model"]["version"],
                    probability=row["probability"],
                    logit=row["logit"],
                    decisions=row["decisions"],
                    latency_ms=result["timing_ms"]["total"],
                ),
            )
        except OSError as err:  # logging must never fail a clinical answer
            logger.warning("prediction log not written: %s", err)

    # ------------------------------------------------------------------ endpoints
    @bentoml.api
    async def predict(self, file: Path) -> dict[str, Any]:
        """Upload an image (PNG, JPEG, DICOM; a volume if the model is 3D) → calibrated prediction."""
        try:
            result, *_ = await self._predict_one(file)
        except InputRejected as exc:
            return _error(exc)  # type: ignore[return-value]
        except Exception as err:  # never a 500: a failure here is the service's
            return _error(_unavailable("prediction", err))  # type: ignore[return-value]
        return result

    @bentoml.api
    async def explain(self, file: Path, opacity: float = 0.5, pixels: str = "full") -> dict[str, Any]:
        """The prediction plus its map (the model's own evidence map for a dense arch, else Grad-CAM):
        overlay, heatmap (RGBA) and image as base64 PNG, a 32-px copy of the map, and (2D) the
        full-resolution pixel values with window presets for the viewer's W/L.

        ``pixels=none`` (form field or query, ``/explain?pixels=none``) leaves the full-resolution
        copy out: ~3.9 MB of base64 for a 2304 × 2880 radiograph that an API client rarely needs."""
        try:
            result, img, x, info = await self._predict_one(file, display_side=visual.DISPLAY_MAX_SIDE, keep_image=True)
        except InputRejected as exc:
            return _error(exc)  # type: ignore[return-value]
        except Exception as err:
            return _error(_unavailable("prediction", err))  # type: ignore[return-value]
        t0 = time.perf_counter()
        try:
            cam = np.asarray(await self._call_model("cam", x))
        except Exception as err:
            return _error(_unavailable("the heatmap call to the model", err))  # type: ignore[return-value]
        size = int(info["preprocess"]["image_size"])
        try:
            pics = await asyncio.to_thread(
                visual.explain_pictures, img.array, x[0, 0], cam, size, float(min(max(opacity, 0.0), 1.0))
            )
            result["explanation"] = {
                "method": str(info.get("explanation_method") or "gradcam"),
                "overlay_png": await asyncio.to_thread(visual.b64_png, pics["overlay"]),
                "heatmap_png": await asyncio.to_thread(visual.b64_png, pics["heatmap"]),
                "image_png": await asyncio.to_thread(visual.b64_png, pics["image"]),
                "heatmap": visual.small_heatmap(pics["cam"]),
            }
            # The viewer's reading copy: full resolution, stored units, the DICOM's own window first.
            copy = None if pixels == "none" else await asyncio.to_thread(visual.display_pixels, img, file.read_bytes)
            if copy is not None:
                result["explanation"]["pixels"] = await asyncio.to_thread(copy.to_json)
        except Exception as err:
            return _error(_unavailable("rendering the explanation", err))  # type: ignore[return-value]
        result["timing_ms"]["explain"] = round((time.perf_counter() - t0) * 1000, 2)
        return result

    @web.post("/admin/reload")
    async def admin_reload(self) -> dict[str, Any]:
        """Load the registry's champion now (behind the API key); ``changed`` says whether the model changed."""
        try:
            result = await self.model.to_async.reload()
        except Exception as err:
            return _error(_unavailable("the reload", err))  # type: ignore[return-value]
        await self._model_info(refresh=True)
        return result

    @web.get("/metadata")
    async def metadata(self) -> dict[str, Any]:
        """Model name/version/arch/metrics, operating points and the input the service accepts.

        Always asked afresh from the model worker (one local call), so a promotion or a
        rollback shows here as soon as the worker has swapped models.
        """
        info = await self._model_info(refresh=True)
        sd = int(info["spatial_dims"])
        return {
            "model": {
                k: info[k]
                for k in (
                    "name",
                    "version",
                    "arch",
                    "spatial_dims",
                    "trained_at",
                    "data_version",
                    "git_commit",
                    "training_data",
                )
                if k in info
            },
            "metrics": info.get("metrics", {}),
            "operating_points": info["operating_points"],
            "calibration": info["calibration"],
            "fracture_types": info["type_names"],
            "input": {
                "formats": ["png", "jpeg", "dicom"] if sd == 2 else ["dicom", "nifti"],
                "spatial_dims": sd,
                "max_upload_mb": self.settings.max_upload_mb,
                "max_pixels": self.settings.max_pixels,
                "preprocess": info["preprocess"],
            },
            "runtime": {
                **info.get("runtime", {}),
                "max_batch_size": self.settings.max_batch_size,
                "max_latency_ms": self.settings.max_latency_ms,
            },
            "auth_required": bool(self.settings.api_key),
        }


# Before BentoML's own middleware (metrics, tracing, access log): every unknown path is one label, one 404.
install_before_bentoml_middleware(FractureService.name, UnknownPathMiddleware, known=PUBLIC_PATHS)
# Then, outermost first: error shape (JSON, never a 500), /readyz from the last probe, API key (401 before
# anything is read), the size limit (413), the strict upload parser (4xx; BentoML sees a canonical form),
# the viewer route.
_MAX_BODY = int(SETTINGS.max_upload_mb * 1024 * 1024) + 64 * 1024
FractureService.add_asgi_middleware(ErrorShapeMiddleware)
FractureService.add_asgi_middleware(FastReadyzMiddleware)
FractureService.add_asgi_middleware(APIKeyMiddleware, api_key=SETTINGS.api_key)
FractureService.add_asgi_middleware(UploadLimitMiddleware, max_bytes=_MAX_BODY)
FractureService.add_asgi_middleware(UploadFormMiddleware, max_bytes=_MAX_BODY)
FractureService.add_asgi_middleware(ViewerAtRootMiddleware)

if SETTINGS.debug:
    logger.setLevel(logging.DEBUG)

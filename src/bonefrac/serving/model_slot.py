"""The model a running service answers with, and how it changes without a restart.

A :class:`ModelSlot` holds one :class:`ServedModel` (the bundle, its runner, a
Grad-CAM copy and a random ``load_id``). Registry changes reach it two ways:

* **watch**: a daemon thread polls the registry's champion pointer
  (:func:`bonefrac.registry.store.champion_pointer_path`, one ``stat`` every
  ``serving.registry_poll_s``); when the file changes and names another model, that
  model is loaded;
* **admin**: ``POST /admin/reload`` on the public service (behind the API key) asks
  for the same check at once.

The swap is atomic: the new model is built and its backend chosen *outside* any
lock, then one attribute assignment replaces the old one. A batch already running
keeps the :class:`ServedModel` it read at its start and finishes on the old model;
a load that fails (missing file, corrupt bundle, ONNX export error...) is logged
with its reason and the old model keeps serving.

Every logit row leaves the model worker with the model's embedding (for the front
end's per-image out-of-distribution check) and the ``load_id`` of the model that
computed it appended (:meth:`ServedModel.infer`), so the front end, which
preprocesses and calibrates with its copy of the model's contract, notices a swap
between its two steps and redoes the request with the new contract: an answer
never mixes two models.

Only models from the registry are followed: a service pinned to a bundle file
(``BONEFRAC_MODEL_PATH``) never changes model, and one started from a Bento
starts on the model inside it, then follows the registry's *changes* when a
registry is present (same ``BENTOML_HOME``; in a container, a mounted one).
"""

from __future__ import annotations

import copy
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bonefrac.config import ServingParams
from bonefrac.explain import display as visual
from bonefrac.explain.heatmaps import map_methods
from bonefrac.inference.backends import BackendChoice, LogitRunner, select_backend
from bonefrac.registry import store
from bonefrac.registry.resolve import LoadedModel, load_tag

logger = logging.getLogger("bonefrac.serving")

#: ``load_id`` values are exact in float32 (the logits' dtype) below 2**24.
_LOAD_ID_RANGE = 1 << 24


@dataclass
class ServedModel:
    """One loaded model with everything the model worker needs to answer with it."""

    loaded: LoadedModel
    choice: BackendChoice
    cam_model: torch.nn.Module
    device: str
    load_id: int = field(default_factory=lambda: 1 + secrets.randbelow(_LOAD_ID_RANGE - 1))
    cam_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tag(self) -> str:
        return f"{self.loaded.name}:{self.loaded.version}"

    def infer(self, x: np.ndarray) -> np.ndarray:
        """``[logits (1 + T) | embedding (F) | F | load_id]`` per row, from one forward pass.

        One array, so BentoML's adaptive batching splits it per request as before; the width
        ``F`` travels in the row, so :func:`split_model_output` needs nothing else.
        """
        logits, emb = self.choice.runner.with_embedding(np.asarray(x, dtype=np.float32))
        logits = np.asarray(logits, dtype=np.float32)
        emb = np.asarray(emb, dtype=np.float32).reshape(len(logits), -1)
        n = len(logits)
        tail = np.tile(np.array([[emb.shape[1], self.load_id]], np.float32), (n, 1))
        return np.concatenate([logits, emb, tail], axis=1)

    def cam(self, x: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)
        with self.cam_lock:  # Grad-CAM hooks a module: one at a time on this copy
            return visual.compute_cam(self.cam_model, t)[0]

    def info(self) -> dict[str, Any]:
        return {
            **self.loaded.describe(),
            "load_id": self.load_id,
            "source": self.loaded.source.partition(":")[0],  # file | store | bento, never a path
            "runtime": {**self.choice.describe(), "device": self.device},
            # which map /explain returns: the network's own (evidence_map) or Grad-CAM
            "explanation_method": map_methods(self.cam_model)[0],
        }


def split_model_output(out: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The model worker's answer → ``(logits, embedding, load_id)`` (see :meth:`ServedModel.infer`)."""
    out = np.asarray(out)
    width = round(float(out[0, -2]))
    return out[:, : -2 - width], out[:, -2 - width : -2], round(float(out[0, -1]))


def serve(loaded: LoadedModel, settings: ServingParams, device: str) -> ServedModel:
    """Build the network, pick its backend (ONNX export and parity check where measured faster),
    and warm it at the largest batch before it answers anything (:func:`warm_up`)."""
    model = loaded.bundle.build_model()
    choice = select_backend(
        loaded.bundle,
        preference=settings.backend,
        device=device,
        model=model,  # type: ignore[arg-type]
        cache_dir=settings.onnx_cache_dir,
    )
    warm_up(choice.runner, loaded.bundle.preprocess_spec.input_shape, settings.max_batch_size)
    return ServedModel(loaded, choice, copy.deepcopy(model).to(device).eval(), device)


#: Forward passes :func:`warm_up` makes at the largest batch (measured: the first two are the slow ones).
WARM_UP_PASSES = 2


def warm_up(runner: LogitRunner, input_shape: tuple[int, ...], max_batch_size: int) -> None:
    """Forward passes (with the embedding, as :meth:`ServedModel.infer` runs them) at the largest batch.

    Why: the first calls at a batch size the runtime has not seen are slower while it sizes its
    memory. Measured with the 512-px two-view FracAtlas model (ONNX Runtime, 2 cores, quiet, after
    the backend choice's batch-8 timing): batch 16 took 1.78 s and 2.02 s on its first two calls,
    then 1.28 and 1.31 s (batch 12 in between: 1.18 s). Without this the first full batches after a
    start or a champion swap pay that, on radiologists' requests. The model worker is not ready
    (and a swapped-in champion not current) until this returns.
    """
    x = np.zeros((max(1, int(max_batch_size)), *input_shape), dtype=np.float32)
    for _ in range(WARM_UP_PASSES):
        runner.with_embedding(x)


class ModelSlot:
    """The current :class:`ServedModel`, swapped atomically when the registry's champion changes."""

    def __init__(
        self,
        initial: ServedModel,
        settings: ServingParams,
        *,
        follow: bool,
        loader: Callable[[str], LoadedModel] = load_tag,
    ) -> None:
        self.current = initial
        self.settings = settings
        self.follow = follow
        self._loader = loader
        self._check_lock = threading.Lock()  # one load at a time (watcher and admin call)
        self._pointer = store.champion_pointer_path(settings.model_name)
        self._seen = self._stamp()  # changes *after* start are followed, not the state at start
        self.last_error: str | None = None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._pointer)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self, force: bool = False) -> dict[str, Any]:
        """Load the champion the pointer names if it is not the model served; what happened, in a dict.

        ``force`` reads the pointer even if the file did not change (the admin endpoint).
        """
        if not self.follow:
            version = self.current.loaded.version
            return {"changed": False, "version": version, "reason": "pinned: not following the registry"}
        with self._check_lock:
            stamp = self._stamp()
            if not force and stamp == self._seen:
                return {"changed": False, "version": self.current.loaded.version, "reason": "pointer unchanged"}
            self._seen = stamp
            tag = store.read_champion_pointer(self.settings.model_name)
            if tag is None:
                return {"changed": False, "version": self.current.loaded.version, "reason": "no champion pointer"}
            if tag == self.current.tag:
                return {"changed": False, "version": self.current.loaded.version, "reason": f"{tag} already served"}
            return self._swap(tag)

    def _swap(self, tag: str) -> dict[str, Any]:
        old = self.current
        try:
            new = serve(self._loader(tag), self.settings, old.device)
        except Exception as err:  # any failure keeps the old model serving; the reason goes to the log
            self.last_error = f"{type(err).__name__}: {err}"
            logger.error("model reload to %s failed, still serving %s: %s", tag, old.tag, self.last_error)
            return {"changed": False, "version": old.loaded.version, "error": self.last_error}
        self.current = new  # one assignment: batches already running keep `old`
        self.last_error = None
        logger.warning("model reloaded: %s -> %s (%s)", old.tag, new.tag, new.choice.reason)
        return {"changed": True, "version": new.loaded.version, "previous": old.loaded.version}

    def watch(self, poll_s: float) -> threading.Thread | None:
        """Poll the pointer every ``poll_s`` seconds in a daemon thread (``None`` when off)."""
        if not self.follow or poll_s <= 0:
            return None

        def loop() -> None:
            event = threading.Event()
            while not event.wait(poll_s):
                try:
                    self.check()
                except Exception:  # the watcher must never die: log and keep polling
                    logger.exception("registry watch failed")

        thread = threading.Thread(target=loop, name="bonefrac-registry-watch", daemon=True)
        thread.start()
        return thread

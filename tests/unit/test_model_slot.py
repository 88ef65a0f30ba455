"""The served model follows the registry: atomic swap, in-flight work on the old model, failed loads keep it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.integration._server import make_tiny_bundle

from bonefrac.config import ServingParams
from bonefrac.registry import store
from bonefrac.registry.resolve import load_tag
from bonefrac.serving.model_slot import ModelSlot, serve, split_model_output

SETTINGS = ServingParams(backend="torch", registry_poll_s=0.05)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    torch.set_num_threads(1)
    a = store.register_model(make_tiny_bundle(tmp_path / "a.pt", seed=0), name="bonefrac")
    b = store.register_model(make_tiny_bundle(tmp_path / "b.pt", seed=1), name="bonefrac")
    store.promote(a)
    return a, b


def _bump_mtime(path: Path) -> None:
    st = path.stat()  # two writes within the file system's timestamp granularity must still differ
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_swap_follows_promote_and_rollback_and_old_work_finishes_on_the_old_model(registry) -> None:
    a, b = registry
    slot = ModelSlot(serve(load_tag(a), SETTINGS, "cpu"), SETTINGS, follow=True)
    x = np.random.default_rng(0).uniform(size=(2, 1, 64, 64)).astype(np.float32)
    in_flight = slot.current  # what a batch read at its start
    assert slot.check() == {"changed": False, "version": a.split(":")[1], "reason": "pointer unchanged"}

    store.promote(b)
    _bump_mtime(store.champion_pointer_path("bonefrac"))
    result = slot.check()
    assert result["changed"] and slot.current.tag == b and result["previous"] == a.split(":")[1]
    logits, emb, load_id = split_model_output(in_flight.infer(x))  # the old model still answers what it started
    assert load_id == in_flight.load_id != slot.current.load_id
    assert np.allclose(logits, in_flight.choice.runner(x))
    # the embedding for the OOD check rides along from the same pass (custom_cnn: 512 pooled features)
    assert emb.shape == (2, 512) and np.allclose(emb, in_flight.choice.runner.with_embedding(x)[1])
    assert not np.allclose(split_model_output(slot.current.infer(x))[0], logits)  # another model now

    store.rollback("bonefrac")
    deadline = time.monotonic() + 10
    slot.watch(SETTINGS.registry_poll_s)  # the watcher thread, not a direct call, picks this one up
    while slot.current.tag != a and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slot.current.tag == a


def test_a_failed_load_keeps_the_old_model_and_says_why(registry, caplog) -> None:
    a, b = registry

    def broken(tag: str):
        raise OSError(f"bundle of {tag} is unreadable")

    slot = ModelSlot(serve(load_tag(a), SETTINGS, "cpu"), SETTINGS, follow=True, loader=broken)
    before = slot.current
    store.promote(b)
    _bump_mtime(store.champion_pointer_path("bonefrac"))
    with caplog.at_level(logging.ERROR, logger="bonefrac.serving"):
        result = slot.check()
    assert not result["changed"] and "unreadable" in result["error"]
    assert slot.current is before and slot.last_error and "unreadable" in caplog.text
    # the admin endpoint's forced check retries (and a working loader then succeeds)
    slot._loader = load_tag
    assert slot.check(force=True)["changed"] and slot.current.tag == b


def test_a_pinned_model_never_follows(registry) -> None:
    a, b = registry
    slot = ModelSlot(serve(load_tag(a), SETTINGS, "cpu"), SETTINGS, follow=False)
    store.promote(b)
    assert slot.check(force=True)["reason"].startswith("pinned") and slot.current.tag == a
    assert slot.watch(1.0) is None


def test_serve_warms_the_runner_at_the_largest_batch_before_it_answers(registry, monkeypatch) -> None:
    """The first calls at a new batch size are slow (batch 16 at 512 px: 1.78 and 2.02 s, then ~1.3 s):
    :func:`serve` pays them at the configured largest batch, with the embedding output the model
    worker uses, before the model is served. Fails if the warm-up is dropped, runs another batch
    size, fewer passes, or skips the embedding path."""
    from bonefrac.serving import model_slot

    a, _ = registry
    seen: list[tuple[int, ...]] = []
    real = model_slot.select_backend

    def spying(*args, **kwargs):
        choice = real(*args, **kwargs)
        inner = choice.runner.with_embedding
        choice.runner.with_embedding = lambda x: (seen.append(tuple(x.shape)), inner(x))[1]
        return choice

    monkeypatch.setattr(model_slot, "select_backend", spying)
    served = serve(load_tag(a), SETTINGS.model_copy(update={"max_batch_size": 5}), "cpu")
    assert seen == [(5, *served.loaded.bundle.preprocess_spec.input_shape)] * 2

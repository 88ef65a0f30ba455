"""Parent flow ``retrain``: new data → pipeline → gate against the champion → promote or reject → Bento.

Why ``dvc repro`` for the pipeline part (validate → preprocess → train →
evaluate) rather than calling the stage flows one by one: dvc.yaml already
declares every stage's inputs and outputs, so DVC reruns exactly the stages
whose data, code or params changed and skips the rest, records the data version
(the hashes in ``dvc.lock``) and keeps ``dvc repro`` by hand and the scheduled
run identical. Each stage still runs as its own Prefect flow inside DVC.

DVC and BentoML run as ``<this interpreter> -m dvc|bentoml`` with this
interpreter's folder first on PATH (``bonefrac.proc``): a worker started from a
shell, a service manager or cron finds the project's tools, not whatever PATH
holds (or a ``FileNotFoundError: 'dvc'``).

Faults: the flow run has a timeout (:data:`RETRAIN_TIMEOUT_S`); it stops when its
worker dies (so no orphaned training keeps running), and the training it
started resumes from its last epoch on the next run (``flows/train.py``). A run
whose process died without a word is marked Crashed by ``bonefrac ops worker``
at start (``bonefrac.ops.sweep``) and by the heartbeat automation.

Prefect adds what DVC does not: retries for transient failures (a busy lock, a
flaky disk), result caching of the expensive steps after the pipeline (scoring
both models on the test split is keyed on the model tag and the data version,
so a re-run of a finished retrain skips it), and a markdown artifact that
explains the decision. Logic lives in ``bonefrac.registry`` and
``bonefrac.monitoring``; this file only orders the steps.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from bonefrac.config import load_params, project_root, resolve
from bonefrac.proc import exit_with_parent, run_tool, tool_cmd

# A retrain that has not finished in 8 h is stuck (the nightly window): Prefect fails it,
# which frees the deployment's concurrency slot for the next night's run.
RETRAIN_TIMEOUT_S = 8 * 3600


@task(retries=2, retry_delay_seconds=30, cache_policy=NO_CACHE)
def run_pipeline(root: str, timeout_s: int = 6 * 3600) -> str:
    """``dvc repro``: DVC's own cache skips unchanged stages (so no Prefect cache here)."""
    res = run_tool(tool_cmd("dvc", "repro"), cwd=root, timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError(
            f"dvc repro failed ({res.returncode}):\n{res.stderr[-4000:] or res.stdout[-4000:]}"
        )
    return res.stdout[-2000:]


@task(cache_policy=NO_CACHE)
def versions(root: str, processed_dir: str) -> dict[str, str]:
    from bonefrac.provenance import data_version, git_commit

    return {"data_version": data_version(root, processed_dir), "git_commit": git_commit(root)}


@task(retries=1, cache_policy=NO_CACHE)
def register(
    bundle_path: str, name: str, data_version: str, git_commit: str, params: dict[str, Any]
) -> str:
    """Register the evaluated bundle (idempotent: the same file gives the same tag)."""
    from bonefrac.model.bundle import ModelBundle
    from bonefrac.registry import store

    metrics = ModelBundle.load(bundle_path).metadata.get("metrics", {})
    return store.register_model(
        bundle_path,
        name=name,
        metrics=metrics,
        params=params,
        data_version=data_version,
        git_commit=git_commit,
    )


# Keyed on (model tag, data version, cache dir) and this function's code: a re-run
# with the same model on the same data reuses the scores instead of recomputing them.
@task(retries=1, cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def score(tag: str, cache_dir: str, data_version: str) -> tuple[Any, Any]:
    from bonefrac.registry import store
    from bonefrac.registry.scoring import score_split

    labels, probs, _ = score_split(store.load_bundle(tag), cache_dir)
    return labels, probs


@task(cache_policy=NO_CACHE)
def decide(
    tag: str, cache_dir: str, promotion: Any, seed: int, scores: tuple[Any, Any], champion_scores: Any
) -> Any:
    from bonefrac.registry.gate import judge

    return judge(tag, cache_dir, promotion, seed, challenger_scores=scores, champion_scores=champion_scores)


@task(cache_policy=NO_CACHE)
def act(decision: Any, tag: str) -> str:
    from bonefrac.registry.gate import apply

    return apply(decision, tag)


@task(retries=1, cache_policy=NO_CACHE)
def build_reference(tag: str, cache_dir: str, out_dir: str, embedding_dims: int, seed: int) -> str:
    """Drift reference for the new champion (its scores and embedding axes)."""
    from bonefrac.monitoring.reference import build_reference as build
    from bonefrac.registry import store

    bundle = store.load_bundle(tag)
    ref = build(
        cache_dir,
        out_dir,
        bundle=bundle,
        embedding_dims=embedding_dims,
        seed=seed,
        provenance={"model_tag": tag},
    )
    return f"{ref.meta['n_rows']} rows -> {out_dir}"


@task(retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def build_bento(root: str) -> str:
    """``bentoml build``; skipped (with the reason) where it cannot run on this machine."""
    log = get_run_logger()
    reason = None
    if importlib.util.find_spec("bentoml") is None:
        reason = "bentoml is not installed"
    elif not (Path(root) / "bentofile.yaml").exists():
        reason = "no bentofile.yaml in the project"
    elif shutil.which("uv") is None and not Path(sys.executable).with_name("uv").exists():
        reason = "`uv` is not installed (bentoml build needs it offline)"
    if reason:
        log.warning("Bento not built: %s", reason)
        return f"skipped: {reason}"
    res = run_tool(tool_cmd("bentoml", "build", "--output", "tag"), cwd=root, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"bentoml build failed:\n{res.stderr[-3000:]}")
    return f"built {bento_tag(res.stdout)}"


def bento_tag(stdout: str) -> str:
    """The tag in ``bentoml build --output tag``'s stdout, which prints it as ``__tag__:<name>:<version>``."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    tagged = [line.removeprefix("__tag__:") for line in lines if line.startswith("__tag__:")]
    return (tagged or lines or ["a bento (no tag printed)"])[-1]


def _markdown(tag: str, decision: Any, action: str, extra: dict[str, str], reason: str) -> str:
    s = decision.stats
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in s.items()]
    reasons = "\n".join(f"- {r}" for r in decision.reasons)
    more = "\n".join(f"- **{k}**: {v}" for k, v in extra.items())
    return (
        f"# Retrain decision: {'PROMOTED' if decision.promote else 'REJECTED'}\n\n"
        f"Challenger `{tag}` — {action}. Trigger: {reason}.\n\n## Why\n\n{reasons}\n\n"
        f"## Numbers (same test set for both models)\n\n| stat | value |\n|---|---|\n"
        + "\n".join(rows)
        + f"\n\n## Provenance and follow-up\n\n{more}\n"
    )


@flow(name="retrain", log_prints=True, timeout_seconds=RETRAIN_TIMEOUT_S)
def retrain_flow(
    params_path: str = "params.yaml",
    run_dvc: bool = True,
    bundle_path: str | None = None,
    build: bool = True,
    reason: str = "schedule",
) -> dict[str, Any]:
    """Run the pipeline, judge the new model against the champion, promote or reject it.

    ``run_dvc=False`` judges the bundle already at ``bundle_path`` (default
    ``models/model.pt``), e.g. one evaluated elsewhere.
    """
    log = get_run_logger()
    # The worker died (kill -9, OOM): stop, and take `dvc repro` and the training along. The
    # run's state is left to the sweep (next worker start) and the heartbeat automation.
    exit_with_parent()
    root = project_root()
    p = load_params(params_path)
    name = p.serving.model_name
    cache_dir = str(resolve(p.paths.processed, root))
    bundle = bundle_path or str(resolve(p.paths.models, root) / "model.pt")
    if run_dvc:
        run_pipeline(str(root))
    v = versions(str(root), cache_dir)
    tag = register(bundle, name, v["data_version"], v["git_commit"], p.model_dump(mode="json"))

    from bonefrac.registry import store

    rec = store.get_record(tag)
    if rec.stage != "challenger":  # this exact bundle was judged before: nothing new to decide
        msg = f"{tag} was already judged ({rec.stage}); no new model since the last run"
        log.info(msg)
        create_markdown_artifact(key="retrain-decision", markdown=f"# Retrain: no new model\n\n{msg}\n")
        return {"tag": tag, "action": "none", "stage": rec.stage}

    scores = score(tag, cache_dir, v["data_version"])
    champ = store.champion_record(name)
    champ_scores = score(champ.tag, cache_dir, v["data_version"])[1] if champ else None
    decision = decide(tag, cache_dir, p.promotion, p.seed, scores, champ_scores)
    action = act(decision, tag)
    log.info("%s: %s", action, " | ".join(decision.reasons))

    extra = {"data version": v["data_version"], "git commit": v["git_commit"]}
    if decision.promote:
        ref_state = build_reference(
            tag,
            cache_dir,
            str(resolve(p.paths.models, root) / "drift_reference"),
            p.drift.embedding_dims,
            p.seed,
            return_state=True,
        )
        extra["drift reference"] = (
            ref_state.result() if ref_state.is_completed() else f"failed: {ref_state.message}"
        )
        if build:
            bento_state = build_bento(str(root), return_state=True)
            extra["bento"] = (
                bento_state.result() if bento_state.is_completed() else f"failed: {bento_state.message}"
            )
    create_markdown_artifact(
        key="retrain-decision",
        markdown=_markdown(tag, decision, action, extra, reason),
        description="Why the challenger was promoted or rejected",
    )
    out = {"tag": tag, "action": action, **decision.to_dict(), **extra}
    print(json.dumps({"tag": tag, "action": action, "promote": decision.promote}))
    return out


if __name__ == "__main__":
    retrain_flow(*(sys.argv[1:2] or ["params.yaml"]))

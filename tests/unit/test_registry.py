"""Model registry on the BentoML store: register, labels, champion lookup, promote, rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bonefrac.model.bundle import ModelBundle
from bonefrac.model.calibrate import CalibrationMap
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.provenance import data_version, dvc_out_hash, git_commit
from bonefrac.registry import store


def _bundle(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    b = ModelBundle(
        arch="custom_cnn",
        state_dict={"w": torch.randn(3, 3, generator=g)},
        preprocess_spec=PreprocessSpec(),
        calibration=CalibrationMap.from_temperature(1.5),
        operating_points={"high_sensitivity": 0.2, "high_specificity": 0.8},
        metadata={"metrics": {"auroc": 0.8 + seed / 100}},
    )
    return b.save(path)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    return tmp_path


def test_register_keeps_provenance_and_calibration(home: Path) -> None:
    tag = store.register_model(
        _bundle(home / "a.pt", 1),
        name="bonefrac",
        metrics={"auroc": 0.81},
        params={"lr": 0.001},
        data_version="abc123",
        git_commit="deadbeefcafe0000",
        labels={"team": "msk"},
    )
    rec = store.get_record(tag)
    assert rec.stage == "challenger"
    assert rec.labels["team"] == "msk" and rec.labels["data_version"] == "abc123"
    assert rec.labels["git_commit"] == "deadbeefcafe"
    assert rec.metadata["metrics"] == {"auroc": 0.81}
    assert rec.metadata["params"] == {"lr": 0.001}
    assert rec.metadata["calibration"]["temperature"] == 1.5
    assert rec.metadata["calibration"]["operating_points"]["high_sensitivity"] == 0.2
    assert (home / "bentoml" / "models").is_dir()
    loaded = store.load_bundle(tag)
    assert torch.equal(loaded.state_dict["w"], ModelBundle.load(home / "a.pt").state_dict["w"])
    # the same file again is not stored twice
    assert store.register_model(home / "a.pt", name="bonefrac") == tag
    assert len(store.list_models("bonefrac")) == 1


def test_register_rejects_a_file_that_is_not_a_bundle(home: Path) -> None:
    bad = home / "bad.pt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(store.RegistryError, match="not a bonefrac model bundle"):
        store.register_model(bad, name="bonefrac")
    with pytest.raises(store.RegistryError, match="not found"):
        store.register_model(home / "missing.pt", name="bonefrac")


def test_promote_rollback_round_trip(home: Path) -> None:
    with pytest.raises(store.NoChampionError):
        store.get_champion("bonefrac")
    a = store.register_model(_bundle(home / "a.pt", 1), name="bonefrac")
    b = store.register_model(_bundle(home / "b.pt", 2), name="bonefrac")
    c = store.register_model(_bundle(home / "c.pt", 3), name="bonefrac")

    assert store.read_champion_pointer("bonefrac") is None
    assert store.promote(a) == ""
    assert store.read_champion_pointer("bonefrac") == a  # what a running service watches
    tag, bundle = store.get_champion("bonefrac")
    assert tag == a and bundle.metadata["metrics"]["auroc"] == pytest.approx(0.81)
    assert store.promote(b) == a
    assert store.read_champion_pointer("bonefrac") == b
    assert store.get_record(a).stage == "archived"
    assert store.get_champion("bonefrac")[0] == b
    store.reject(c, ["sensitivity too low"])
    assert store.get_record(c).stage == "rejected"
    assert store.get_record(c).metadata["decision_reasons"] == ["sensitivity too low"]
    assert [r.tag for r in store.list_models("bonefrac", stage="champion")] == [b]

    restored, retired = store.rollback("bonefrac")
    assert (restored, retired) == (a, b)
    assert store.read_champion_pointer("bonefrac") == a
    assert store.get_champion("bonefrac")[0] == a
    assert store.get_record(b).stage == "archived"
    # b was rolled back: it is never the target of a later rollback; a is the only promoted one left
    with pytest.raises(store.RegistryError, match="no previous champion"):
        store.rollback("bonefrac")
    stages = sorted(r.stage for r in store.list_models("bonefrac"))
    assert stages == ["archived", "champion", "rejected"]
    with pytest.raises(store.RegistryError, match="roll back instead"):
        store.reject(a, ["x"])


def test_unknown_tag_is_a_clear_error(home: Path) -> None:
    with pytest.raises(store.RegistryError, match="no model"):
        store.promote("bonefrac:doesnotexist")


def test_data_version_prefers_dvc_lock(tmp_path: Path) -> None:
    (tmp_path / "data" / "processed").mkdir(parents=True)
    (tmp_path / "data" / "processed" / "index.csv").write_text("a\n1\n")
    fallback = data_version(tmp_path)
    assert len(fallback) == 12
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  preprocess:\n    cmd: x\n    outs:\n"
        "    - path: data/processed\n      hash: md5\n      md5: 0123456789abcdef.dir\n"
    )
    assert dvc_out_hash(tmp_path / "dvc.lock") == "0123456789abcdef"
    assert data_version(tmp_path) == "0123456789abcdef"
    assert git_commit(tmp_path) == "unknown"

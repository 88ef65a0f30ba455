"""The model bundle: the contract round-trips, old bundles upgrade, mismatched ones are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bonefrac.model.bundle import BUNDLE_FORMAT, BundleError, ModelBundle
from bonefrac.model.calibrate import CalibrationMap
from bonefrac.model.networks import build_model
from bonefrac.model.transforms import PreprocessSpec

SPEC = PreprocessSpec(image_size=40, lower_percentile=1.0, upper_percentile=97.0)
CAL = CalibrationMap(method="platt", slope=0.8, intercept=-1.2)


def _bundle() -> ModelBundle:
    torch.manual_seed(0)
    net = build_model("custom_cnn", num_types=2, pretrained="none")
    return ModelBundle(
        arch="custom_cnn",
        state_dict=net.state_dict(),
        preprocess_spec=SPEC,
        type_names=["a", "b"],
        calibration=CAL,
        operating_points={"high_sensitivity": 0.2, "high_specificity": 0.7},
        metadata={"seed": 1},
    )


def test_round_trip_keeps_the_whole_contract(tmp_path: Path) -> None:
    path = _bundle().save(tmp_path / "m.pt")
    loaded = ModelBundle.load(path)
    assert loaded.preprocess_spec == SPEC and loaded.calibration == CAL
    assert loaded.operating_points == {"high_sensitivity": 0.2, "high_specificity": 0.7}
    assert loaded.type_names == ["a", "b"] and loaded.spatial_dims == 2
    a = np.random.default_rng(0).random((50, 30)).astype(np.float32)
    assert torch.equal(loaded.preprocess(a), SPEC.apply(a))
    logits = np.array([[1.0, 0.0, 2.0]])
    assert loaded.calibrate(logits).prob == pytest.approx(CAL.probability(np.array([1.0])))
    with torch.no_grad():
        x = torch.rand(2, 1, 40, 40)
        assert torch.allclose(loaded.build_model()(x), _bundle().build_model()(x))


def test_description_rebuilds_the_same_contract_without_weights() -> None:
    b = _bundle()
    light = ModelBundle.from_description(b.describe())
    assert light.preprocess_spec == b.preprocess_spec and light.calibration == b.calibration
    assert light.operating_points == b.operating_points and light.state_dict == {}


def test_format_1_bundles_upgrade(tmp_path: Path) -> None:
    """Bundles written before the contract (untyped preprocess dict, temperature) still load, exactly."""
    b = _bundle()
    old = {
        "format": "bonefrac-bundle/1",
        "arch": b.arch,
        "spatial_dims": 2,
        "state_dict": b.state_dict,
        "type_names": b.type_names,
        "preprocess": {"image_size": 40, "volume_size": [32, 64, 64], "lower_percentile": 1.0,
                       "upper_percentile": 97.0, "spatial_dims": 2},
        "dropout": 0.0,
        "temperature": 2.0,
        "operating_points": {"x": 0.5},
        "metadata": {},
    }  # fmt: skip
    torch.save(old, tmp_path / "old.pt")
    loaded = ModelBundle.load(tmp_path / "old.pt")
    # Written before preprocessing had versions: it keeps the definition it was trained with.
    assert loaded.preprocess_spec == SPEC.model_copy(update={"version": "1"})
    assert loaded.calibration.method == "temperature" and loaded.calibration.temperature == pytest.approx(2.0)
    assert loaded.to_dict()["format"] == BUNDLE_FORMAT


def test_other_preprocessing_version_is_refused(tmp_path: Path) -> None:
    d = _bundle().to_dict()
    d["preprocess"]["version"] = "0"
    torch.save(d, tmp_path / "v0.pt")
    with pytest.raises(Exception, match=r"preprocessing version '0'.*Retrain"):
        ModelBundle.load(tmp_path / "v0.pt")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"format": "something-else"}, "rebuild it with `dvc repro`"),
        (b"not a checkpoint", "not a readable model bundle"),
    ],
)
def test_foreign_files_are_clear_errors(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(path)
    with pytest.raises(BundleError, match="not found"):
        ModelBundle.load(tmp_path / "missing.pt")


def test_saving_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    """A DVC output: the same contents must be the same file, whatever the file is called."""
    a = _bundle().save(tmp_path / "a.pt").read_bytes()
    b = _bundle().save(tmp_path / "sub" / "other_name.pt").read_bytes()
    assert a == b

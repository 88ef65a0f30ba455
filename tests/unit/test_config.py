"""params.yaml → Params: the shipped file loads; bad keys and values fail early, by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from bonefrac.config import ConfigError, Params, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_load_and_match_defaults_where_unset() -> None:
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.data.source == "phantom"
    assert p.spatial_dims == 2
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert p.train.epochs == raw["train"]["epochs"]


def test_unknown_key_is_named(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_params(f)
    assert "train.epocs" in str(err.value)
    assert "unknown key" in str(err.value)


def test_bad_value_names_key_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        params_from_dict({"model": {"arch": "resnet9000"}})
    msg = str(err.value)
    assert "model.arch" in msg and "resnet9000" in msg
    assert "efficientnet_lite0" in msg  # what is allowed


def test_out_of_range_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        params_from_dict({"train": {"lr": -1}})


def test_cross_field_rule_split_fractions() -> None:
    with pytest.raises(ConfigError, match=r"split\.val_fraction"):
        params_from_dict({"split": {"val_fraction": 0.45, "test_fraction": 0.45}})


def test_overrides_merge_deeply(tmp_path: Path) -> None:
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  epochs: 3\n  lr: 0.01\n")
    p = load_params(f, overrides={"train": {"epochs": 5}})
    assert (p.train.epochs, p.train.lr) == (5, 0.01)


def test_3d_source_sets_spatial_dims() -> None:
    assert params_from_dict({"data": {"source": "volume"}}).spatial_dims == 3
    assert params_from_dict({"data": {"phantom": {"spatial_dims": 3}}}).spatial_dims == 3


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_serving_settings_from_params_then_environment(tmp_path) -> None:
    from bonefrac.config import ENV_OVERRIDES, load_settings

    params = tmp_path / "params.yaml"
    params.write_text("serving:\n  workers: 3\n  max_latency_ms: 500\n")
    assert load_settings(params, environ={}).serving.workers == 3
    s = load_settings(params, environ={"BONEFRAC_WORKERS": "2", "BONEFRAC_BACKEND": "ONNX"}).serving
    assert (s.workers, s.backend, s.max_latency_ms) == (2, "onnx", 500)
    assert load_settings(params, environ={"BONEFRAC_API_KEY": "k"}).serving.api_key == "k"
    assert load_settings(params, environ={"BONEFRAC_PREDICTION_LOG_DIR": "/x"}).paths.predictions_log == "/x"
    # no params file (a container): the defaults, with the environment on top
    assert load_settings(tmp_path / "absent.yaml", environ={"BONEFRAC_MAX_PIXELS": "7"}).serving.max_pixels == 7
    with pytest.raises(ConfigError, match=r"serving\.workers"):
        load_settings(params, environ={"BONEFRAC_WORKERS": "0"})
    # a broken params file is an error naming the key, never silently replaced by defaults
    params.write_text("serving:\n  workerz: 3\n")
    with pytest.raises(ConfigError, match="workerz"):
        load_settings(params, environ={})
    # every override names a real setting
    for section, key in ENV_OVERRIDES.values():
        assert key in type(getattr(load_settings(params.with_name("none.yaml"), {}), section)).model_fields


PRESETS = sorted((ROOT / "params").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_validates_and_survives_dvc_set_args(preset: Path, tmp_path: Path) -> None:
    """`bonefrac exp-run PRESET` = `dvc exp run -S k=v ...`: DVC applies each override to params.yaml
    with Hydra's grammar (its own `apply_overrides`, run here); the params the stages then read must
    be exactly the preset merged into params.yaml. Hydra refuses `k=v` for a key params.yaml does not
    spell out, so a preset setting a typed default (e.g. evaluate.calibration) must survive too."""
    from dvc.utils.hydra import apply_overrides

    from bonefrac.presets import load_preset, set_args

    args = set_args(preset, ROOT / "params.yaml")
    assert args and args[::2] == ["-S"] * (len(args) // 2)
    applied = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", applied)
    apply_overrides(applied, args[1::2])
    expected = load_params(ROOT / "params.yaml", overrides=load_preset(preset))
    assert load_params(applied) == expected
    assert expected != load_params(ROOT / "params.yaml")  # the preset changes something


def test_a_preset_with_a_bad_key_is_refused_by_name(tmp_path: Path) -> None:
    from bonefrac.presets import set_args

    bad = tmp_path / "typo.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        set_args(bad, ROOT / "params.yaml")

"""The FracAtlas presets validate against the typed config and say what the README says they do."""

from __future__ import annotations

import pytest

from bonefrac.config import load_params
from bonefrac.model.dense import DENSE_ARCHS
from bonefrac.presets import load_preset, set_args


@pytest.mark.parametrize(
    ("preset", "excluded", "arch", "size", "profile", "box_weight", "grow", "keep", "peak"),
    [
        ("params/fracatlas.yaml", None, "efficientnet_lite0_dense_tta", 640, "outline", 3.0, 0.0, "last", 1.0),
        (
            "params/fracatlas_legs_out.yaml", ["leg"], "efficientnet_lite0_dense", 384, "area", 1.0, 0.5,
            "best_val_auroc", 0.0,
        ),
    ],
)
def test_fracatlas_presets_validate(
    preset: str, excluded: list[str] | None, arch: str, size: int, profile: str, box_weight: float, grow: float,
    keep: str, peak: float,
) -> None:
    args = set_args(preset)  # what `bonefrac exp-run` passes to `dvc exp run` (validates the merged params)
    assert "-S" in args and f"model.arch={arch}" in args
    if box_weight != 1.0:  # what `dvc exp run` is told, not only what the merged params say
        assert f"train.dense.box_weight={box_weight}" in args and f"train.dense.box_grow_cells={grow}" in args
    if keep != "best_val_auroc":
        assert f"train.dense.keep_epoch={keep}" in args
    if profile != "area":
        assert f"train.dense.box_profile={profile}" in args
    if peak:
        assert f"train.dense.peak_weight={peak}" in args
    p = load_params("params.yaml", overrides=load_preset(preset))
    assert p.data.source == "fracatlas" and p.data.exclude_body_parts == excluded
    assert p.model.arch in DENSE_ARCHS and not p.model.multitask
    assert p.preprocess.image_size == size and p.preprocess.image_size % 32 == 0
    assert p.evaluate.calibration == "platt" and p.evaluate.operating_points.high_sensitivity_target == 0.90
    assert p.train.dense.flip == "exact" and p.train.dense.box_profile == profile
    assert p.train.dense.box_weight == box_weight and p.train.dense.box_grow_cells == grow
    assert p.train.dense.keep_epoch == keep and p.train.dense.peak_weight == peak


def test_every_dense_arch_is_a_valid_model_arch() -> None:
    for arch in DENSE_ARCHS:
        assert load_params("params.yaml", overrides={"model": {"arch": arch}}).model.arch == arch

"""benchmarks.map_variants: the finer shift-and-stitch grid and the image-by-image comparison."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchmarks.map_variants import compare, stitch_grid, stitch_offsets

from bonefrac.model.dense import shift_image, stitch_maps, stitch_shifts


def _cell_mean(x: torch.Tensor) -> torch.Tensor:
    """A translation-equivariant stride-16 'map': the mean of each 16-px cell."""
    return F.avg_pool2d(x, 16)


def test_a_two_to_a_cell_grid_is_the_models_own_stitch():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 96, 96)
    assert stitch_offsets(16, 2) == (4, -4)
    ours = stitch_grid(_cell_mean, x, 16, 2)
    model = stitch_maps([_cell_mean(shift_image(x, dy, dx)) for dy, dx in stitch_shifts(16)])
    assert torch.equal(ours, model)


def test_a_four_to_a_cell_grid_samples_windows_centred_every_4_px():
    """Fine cell m is centred at 4m + 2: a swapped offset or interleave moves values by 4 px and fails."""
    torch.manual_seed(1)
    x = torch.rand(1, 1, 64, 64)
    fine = stitch_grid(_cell_mean, x, 16, 4)
    ref = F.avg_pool2d(F.pad(x, (6, 6, 6, 6), mode="replicate"), 16, stride=4)[..., :16, :16]
    assert fine.shape == (1, 1, 16, 16)
    assert torch.allclose(fine, ref, atol=1e-6)
    with pytest.raises(ValueError):
        stitch_offsets(16, 3)


def test_compare_counts_wins_and_losses_against_the_preset():
    hits = {"stitch8": [True, True, False, False, True], "other": [True, False, True, True, True]}
    out = compare(hits)
    assert out["stitch8"] == {"hits": 3, "n": 5, "rate": 0.6, "wins": 0, "losses": 0, "sign_test_p": 1.0}
    o = out["other"]
    assert (o["hits"], o["wins"], o["losses"]) == (4, 2, 1)
    assert o["sign_test_p"] == pytest.approx(1.0)  # 2 against 1 is no evidence
    many = compare({"stitch8": [False] * 12, "v": [True] * 12})["v"]
    assert many["wins"] == 12 and many["sign_test_p"] < 0.001


def test_variant_maps_use_the_displayed_rule_and_the_preset_map_is_the_users():
    """`stitch8` is exactly what the viewer shows (compute_cam); `cells16` is the same network's map with the
    stitch switched off, through the same sigmoid and upsampling (a changed rule would shift argmax ties)."""
    import numpy as np
    from benchmarks.map_variants import variant_maps

    from bonefrac.explain.display import compute_cam
    from bonefrac.model.networks import build_model

    torch.manual_seed(0)
    net = build_model("efficientnet_lite0_dense_tta_stitch", 0, "none").eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        maps = variant_maps(net, x)
        shown = compute_cam(net, x)[0]
        net.stitch = False
        plain = compute_cam(net, x)[0]
    assert np.array_equal(maps["stitch8"], shown)
    assert np.array_equal(maps["cells16"], plain)
    assert not np.allclose(maps["stitch4"], shown)
    assert all(m.shape == (64, 64) for m in maps.values())


def test_boxed_fractures_yields_the_splits_boxed_fractures_from_their_cache_rows(tmp_path):
    """The map benchmarks' reader: only fractured images of the split that have boxes, each from its own
    cache row, boxes mapped onto the input square (a 200 x 100 image's box scaled by 64 / 200, padded 16 px)."""
    import numpy as np
    import pandas as pd
    from benchmarks._runs import boxed_fractures

    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    images = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 1, 64, 64), dtype=np.float32)
    np.save(processed / "images.npy", images)
    box = "[[100.0, 50.0, 20.0, 10.0]]"
    pd.DataFrame({
        "split": ["val", "val", "test", "val"], "label": [1, 1, 1, 0], "boxes": [box, "[]", box, box],
        "height": [100] * 4, "width": [200] * 4, "cache_row": [3, 0, 1, 2],
    }).to_csv(processed / "index.csv", index=False)  # fmt: skip
    got = list(boxed_fractures(tmp_path, "val", 64))
    assert len(got) == 1
    x, boxes = got[0]
    assert x.shape == (1, 1, 64, 64) and float(x.mean()) == 3.0  # cache row 3, not the index position
    assert boxes == [[32.0, 50.0 * 0.32 + 16, 6.4, 3.2]]

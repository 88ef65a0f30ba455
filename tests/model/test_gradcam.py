"""Grad-CAM looks where the answer is, on a synthetic task where the answer is known.

A tiny CNN learns "fractured" = a bright blob at a random place. Its Grad-CAM
maximum must fall in the blob's box far more often than pointing at the image
centre does. Plus: box mapping through the shared preprocessing, 3D maps, and
MONAI's hooks not leaking into the caller's model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bonefrac.explain.gradcam import CamError, compute_cams
from bonefrac.explain.localisation import (
    energy_in_boxes,
    localisation_summary,
    map_boxes_to_cache,
    pointing_game,
)
from bonefrac.explain.overlay import draw_boxes, draw_outlines, overlay
from bonefrac.model.transforms import PreprocessSpec

S = 32


class BlobNet(nn.Module):
    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.AdaptiveMaxPool2d(1) if spatial_dims == 2 else nn.AdaptiveMaxPool3d(1)
        self.body = nn.Sequential(
            conv(1, 8, 5, padding=2), nn.ReLU(inplace=True), conv(8, 8, 3, padding=1), nn.ReLU(inplace=True)
        )
        self.pool = pool
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        self.gradcam_layer = "body.3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)))


def _blob_data(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray, list[list[list[float]]]]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:S, 0:S]
    x = rng.normal(0.3, 0.08, size=(n, 1, S, S))
    y = np.arange(n) % 2
    boxes: list[list[list[float]]] = []
    for i in range(n):
        if y[i]:
            # Away from the centre, so pointing at the centre is a weak baseline.
            while True:
                cy, cx = rng.integers(4, S - 4, size=2)
                if max(abs(cy - S / 2), abs(cx - S / 2)) > 6:
                    break
            x[i, 0] += 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2))
            boxes.append([[cx - 3.0, cy - 3.0, 7.0, 7.0]])
        else:
            boxes.append([])
    return torch.as_tensor(np.clip(x, 0, 1), dtype=torch.float32), y, boxes


@pytest.fixture(scope="module")
def trained() -> BlobNet:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y, _ = _blob_data(128, seed=0)
    net = BlobNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    target = torch.as_tensor(y, dtype=torch.float32)
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], target)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = ((net(x)[:, 0] > 0).numpy() == y).mean()
    assert acc > 0.9, f"the blob task should be learnt in a few steps (train accuracy {acc:.2f})"
    return net


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cam_points_at_the_blob(trained: BlobNet, method: str) -> None:
    x, y, boxes = _blob_data(40, seed=1)
    pos = np.flatnonzero(y == 1)
    cams = compute_cams(trained, x[pos], method=method)
    assert cams.shape == (pos.size, S, S)
    assert cams.min() >= 0 and cams.max() <= 1
    summary = localisation_summary(list(cams), [boxes[i] for i in pos])
    assert summary["n"] == pos.size
    assert summary["pointing_hit_rate"] >= 0.8
    assert summary["pointing_hit_rate"] > summary["baseline_centre_hit_rate"] + 0.5
    assert summary["energy_in_box"] > 2 * summary["baseline_box_area_share"]


def test_untrained_network_does_not_point_reliably(trained: BlobNet) -> None:
    torch.manual_seed(3)
    x, y, boxes = _blob_data(40, seed=1)
    pos = np.flatnonzero(y == 1)
    trained_rate = localisation_summary(list(compute_cams(trained, x[pos])), [boxes[i] for i in pos])
    # Same architecture, weights shuffled: the map no longer follows the evidence as well.
    scrambled = BlobNet()
    rand_rate = localisation_summary(list(compute_cams(scrambled, x[pos])), [boxes[i] for i in pos])
    assert trained_rate["energy_in_box"] > rand_rate["energy_in_box"]


def test_hooks_do_not_leak_into_the_callers_model(trained: BlobNet) -> None:
    x, _, _ = _blob_data(4, seed=2)
    with torch.no_grad():
        before = trained(x)
    compute_cams(trained, x)
    assert all(not m._forward_hooks and not m._backward_hooks for m in trained.modules())
    assert trained.body[1].inplace is True
    with torch.inference_mode():  # also callable from inside inference mode (the Predictor's)
        compute_cams(trained, x)
    with torch.no_grad():
        assert torch.allclose(trained(x), before)


def test_3d_cams_and_registry_models() -> None:
    torch.manual_seed(0)
    net3d = BlobNet(spatial_dims=3).eval()
    cams = compute_cams(net3d, torch.rand(2, 1, 8, 12, 12), method="gradcam++")
    assert cams.shape == (2, 8, 12, 12)
    rgb = overlay(np.random.rand(8, 12, 12), cams[0])
    assert rgb.shape == (12, 12, 3) and rgb.dtype == np.uint8

    from bonefrac.model.networks import build_model

    for dims, shape in ((2, (1, 1, 32, 32)), (3, (1, 1, 16, 16, 16))):
        model = build_model("custom_cnn", num_types=2, spatial_dims=dims)
        assert compute_cams(model, torch.rand(*shape)).shape == (1, *shape[2:])


def test_bad_layer_or_method_is_a_clear_error(trained: BlobNet) -> None:
    x = torch.rand(1, 1, S, S)
    with pytest.raises(CamError, match="not a module"):
        compute_cams(trained, x, layer="nope")
    with pytest.raises(CamError, match="method"):
        compute_cams(trained, x, method="scorecam")  # type: ignore[arg-type]


def test_pointing_and_energy_on_hand_made_maps() -> None:
    cam = np.zeros((10, 10))
    cam[2, 7] = 1.0
    cam[8, 1] = 0.5
    assert pointing_game(cam, [[6, 1, 3, 3]])
    assert not pointing_game(cam, [[0, 7, 3, 3]])
    assert pointing_game(cam, [[4, 1, 1, 1]], tolerance=3)
    assert energy_in_boxes(cam, [[6, 1, 3, 3]]) == pytest.approx(1 / 1.5)
    assert energy_in_boxes(cam, [[6, 1, 3, 3], [0, 7, 3, 3]]) == pytest.approx(1.0)


@pytest.mark.parametrize("orig_hw", [(60, 100), (100, 60), (64, 64)])
def test_boxes_follow_the_shared_preprocessing(orig_hw: tuple[int, int]) -> None:
    h, w = orig_hw
    img = np.zeros((h, w), dtype=np.float32)
    box = [w * 0.2, h * 0.3, w * 0.4, h * 0.3]
    x0, y0, bw, bh = (round(v) for v in box)
    img[y0 : y0 + bh, x0 : x0 + bw] = 1000.0
    img[0, 0] = -1.0  # make the percentile window keep the background at 0
    out = PreprocessSpec(image_size=S, lower_percentile=0.0, upper_percentile=100.0).apply(img)[0].numpy()
    ((mx, my, mw, mh),) = map_boxes_to_cache([[x0, y0, bw, bh]], orig_hw, S)
    ys, xs = np.nonzero(out > 0.5)
    assert xs.min() >= np.floor(mx) - 1 and xs.max() <= np.ceil(mx + mw) + 1
    assert ys.min() >= np.floor(my) - 1 and ys.max() <= np.ceil(my + mh) + 1
    assert abs(xs.min() - mx) <= 1.5 and abs(ys.min() - my) <= 1.5


def test_overlay_and_boxes_render() -> None:
    img = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    cam = np.zeros((16, 16))
    cam[4, 4] = 1.0
    rgb = overlay(img, cam)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert rgb[4, 4].tolist() != rgb[12, 12].tolist()
    boxed = draw_boxes(rgb, [[2, 2, 5, 5]])
    assert boxed[2, 3].tolist() == [0, 255, 0] and rgb[2, 3].tolist() != [0, 255, 0]
    with pytest.raises(ValueError, match="shape"):
        overlay(img, np.zeros((8, 8)))


GOLD = [255, 215, 0]


def test_outlines_trace_the_polygon_not_its_box() -> None:
    """A right triangle traced in a 16 × 16 image: its three edges are gold, its inside and the box's
    empty corner are not (a polygon drawn as its bounding box, or filled, fails)."""
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    out = draw_outlines(rgb, [[2.0, 2.0, 12.0, 2.0, 2.0, 12.0]])  # corners at (1.5, 1.5), (11.5, 1.5), (1.5, 11.5)
    gold = np.all(out == GOLD, axis=-1)
    assert gold[1, 6] and gold[6, 1] and gold[6, 6]  # top edge, left edge, hypotenuse
    assert not gold[3, 3] and not gold[10, 10] and not gold[14, 14]  # inside, the box's empty corner, outside
    assert not np.any(rgb)  # the input is left as it was


def test_gallery_tile_draws_each_boxs_outline_inside_it() -> None:
    """`tile` scales the expert's outlines with the image, in every panel, inside their boxes; no outline, no gold."""
    from bonefrac.explain.gallery import tile

    img = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    cam = np.zeros((64, 64))
    box = [16.0, 16.0, 32.0, 32.0]
    triangle = [16.0, 16.0, 48.0, 16.0, 16.0, 48.0]
    plain = tile(img, cam, None, [box], panel_px=128)
    traced = tile(img, cam, None, [box], panel_px=128, outlines=[[triangle]])
    assert not np.any(np.all(plain == GOLD, axis=-1))
    gold = np.all(traced == GOLD, axis=-1)
    panel = 128
    for left in (0, panel + 4):  # the image panel and the map panel
        ys, xs = np.nonzero(gold[:, left : left + panel])
        assert ys.size > 0
        assert xs.min() >= 30 and xs.max() <= 98 and ys.min() >= 30 and ys.max() <= 98  # inside the 2x box
        assert not gold[90, left + 90]  # the box's empty corner (outline is its upper-left half)


def test_gallery_tile_survives_a_hostile_outline_from_the_manifest() -> None:
    """A manifest outline with finite but absurd coordinates (1e300, far outside the image) reaches the
    gallery through `row_outlines` unchanged; the tile must still be drawn at its size (no overflow from
    the drawing library), with the image's pixels where the line cannot reach."""
    from bonefrac.explain.gallery import tile
    from bonefrac.model.boxes import row_outlines

    row = {"boxes": "[[10, 10, 20, 20, [[1e300, 1, 2e300, 3, 4, -1e300]]]]", "height": 100, "width": 100}
    outlines = row_outlines(row, 64)
    assert outlines and outlines[0] and abs(outlines[0][0][0]) > 1e299  # it does reach the tile
    img = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    plain = tile(img, np.zeros((64, 64)), None, [[6.4, 6.4, 12.8, 12.8]], panel_px=128)
    traced = tile(img, np.zeros((64, 64)), None, [[6.4, 6.4, 12.8, 12.8]], panel_px=128, outlines=outlines)
    assert traced.shape == plain.shape and traced.dtype == np.uint8
    assert np.array_equal(traced[100:, 100:128], plain[100:, 100:128])  # far from the line's one visible edge

"""The dense fracture head: box targets, pooling, and a map that learns to light up a planted box."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonefrac.model.dense import DenseFractureHead, box_target_map, dense_loss, peak_loss, pool_logit_map

GRID, SIZE = 12, 192  # a 192 px input at stride 16


def test_box_target_map_peaks_in_box_and_flips():
    t = box_target_map([[100.0, 20.0, 12.0, 12.0]], SIZE, GRID)
    assert t.shape == (GRID, GRID) and float(t.max()) == 1.0
    y, x = np.unravel_index(int(t.argmax()), t.shape)
    assert (x + 0.5) * 16 + 8 >= 100 and (x * 16) <= 112 and y * 16 <= 32
    tf = box_target_map([[100.0, 20.0, 12.0, 12.0]], SIZE, GRID, flip=True)
    assert torch.allclose(tf, t.flip(-1))
    assert float(box_target_map([], SIZE, GRID).sum()) == 0.0


def test_pooling_orders_between_mean_and_max():
    z = torch.randn(3, 1, GRID, GRID)
    mean, mx = pool_logit_map(z, "mean"), pool_logit_map(z, "max")
    for mode in ("lse", "topk"):
        p = pool_logit_map(z, mode)
        assert torch.all(p <= mx + 1e-5) and torch.all(p >= mean - 1e-5)
    with pytest.raises(ValueError):
        pool_logit_map(z, "median")  # type: ignore[arg-type]


def test_peak_loss_scores_which_cell_is_highest_not_how_high():
    """Chance is 1 at any grid; a shift of every logit changes nothing; the target's cell on top
    beats another cell on top by the same margin; an all-zero target (a normal image) costs 0."""
    t = torch.zeros(2, GRID, GRID)
    t[:, 3, 4] = 1.0
    t[1, 3, 5] = 0.5  # a target spread over two cells, weighted by their share
    flat = torch.zeros(2, GRID, GRID)
    assert torch.allclose(peak_loss(flat, t), torch.ones(2))
    t40 = torch.zeros(1, 40, 40)
    t40[0, 20, 20] = 1.0  # a 640 px map: chance is 1 there too
    assert torch.allclose(peak_loss(torch.zeros(1, 40, 40), t40), torch.ones(1))
    z = torch.randn(2, GRID, GRID)
    assert torch.allclose(peak_loss(z + 7.0, t), peak_loss(z, t), atol=1e-5)
    right, wrong = flat.clone(), flat.clone()
    right[:, 3, 4] = 4.0
    wrong[:, 9, 1] = 4.0
    assert torch.all(peak_loss(right, t) < 1.0) and torch.all(peak_loss(wrong, t) > 1.0)
    assert float(peak_loss(z[:1], torch.zeros(1, GRID, GRID))) == 0.0


def test_dense_loss_adds_the_weighted_peak_loss_on_fractured_maps_only():
    """``peak_weight`` adds w × peak loss averaged over the images with a map target, normals
    (all-zero targets) counting 0 — and 0 leaves the per-cell BCE as it was."""
    z = torch.randn(3, 1, GRID, GRID)
    t = torch.zeros(3, GRID, GRID)
    t[0, 2:4, 2:4] = 1.0  # a fractured image; image 1 is a normal; image 2 has no map target
    has_map = torch.tensor([True, True, False])
    base = dense_loss(z, t, has_map)
    with_peak = dense_loss(z, t, has_map, peak_weight=0.7)
    expected = base + 0.7 * peak_loss(z[:1, 0], t[:1]).sum() / 2
    assert torch.allclose(with_peak, expected, atol=1e-6)
    assert torch.allclose(dense_loss(z, t, torch.tensor([False, True, False]), peak_weight=5.0),
                          dense_loss(z, t, torch.tensor([False, True, False])))


def test_peak_loss_moves_the_peak_where_per_cell_bce_barely_does():
    """A fracture cell at p = 0.6 under a distractor at p = 0.7: the peak loss's gradient lifts the
    fracture cell and lowers the distractor more than the per-cell BCE's does (in ratio to its push
    on the fracture cell) — the comparison the pointing game makes."""
    z = torch.full((1, 1, GRID, GRID), -4.0)
    z[0, 0, 3, 4], z[0, 0, 9, 1] = float(np.log(0.6 / 0.4)), float(np.log(0.7 / 0.3))
    t = torch.zeros(1, GRID, GRID)
    t[0, 3, 4] = 1.0
    has_map = torch.ones(1, dtype=torch.bool)
    grads = []
    for w in (0.0, 1.0):
        zz = z.clone().requires_grad_(True)
        dense_loss(zz, t, has_map, peak_weight=w).backward()
        grads.append(zz.grad[0, 0])
    bce, both = grads
    peak = both - bce
    assert peak[3, 4] < 0 < peak[9, 1]  # descent raises the fracture cell, lowers the distractor
    assert float(peak[9, 1] / -peak[3, 4]) > 10 * float(bce[9, 1] / -bce[3, 4])


def _synthetic(n: int, rng: np.random.Generator):
    """Noise features; positives carry a weak pattern in 8 channels inside a random 1-2 cell box."""
    s16 = torch.from_numpy(rng.normal(size=(n, 16, GRID, GRID)).astype(np.float32))
    s32 = torch.from_numpy(rng.normal(size=(n, 8, GRID // 2, GRID // 2)).astype(np.float32))
    labels = torch.from_numpy((rng.random(n) < 0.5).astype(np.float32))
    targets = torch.zeros(n, GRID, GRID)
    boxes = []
    for i in range(n):
        if labels[i] == 0:
            boxes.append([])
            continue
        gx, gy = rng.integers(0, GRID - 1, size=2)
        box = [gx * 16 + 2.0, gy * 16 + 2.0, 20.0, 12.0]
        s16[i, :8, gy, gx] += 2.0
        s16[i, :8, gy, gx + 1] += 1.0
        boxes.append([box])
        targets[i] = box_target_map([box], SIZE, GRID)
    return s16, s32, labels, targets, boxes


def test_dense_head_lights_up_planted_box():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    s16, s32, y, t, _ = _synthetic(160, rng)
    head = DenseFractureHead(None, s16_channels=16, s32_channels=8, width=16, pool="lse", dropout=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    has_map = torch.ones(len(y), dtype=torch.bool)
    for _ in range(60):
        head.train()
        z, m = head(s16, s32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], y) + dense_loss(m, t, has_map)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    s16v, s32v, yv, _, boxes = _synthetic(60, np.random.default_rng(1))
    with torch.no_grad():
        z, m = head(s16v, s32v)
    pos = torch.nonzero(yv).flatten().tolist()
    hits = 0
    for i in pos:
        gy, gx = np.unravel_index(int(m[i, 0].argmax()), (GRID, GRID))
        cx, cy = gx * 16 + 8, gy * 16 + 8
        bx, by, bw, bh = boxes[i][0]
        hits += (bx - 8 <= cx <= bx + bw + 8) and (by - 8 <= cy <= by + bh + 8)
    assert hits / len(pos) >= 0.8
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(yv.numpy(), z[:, 0].numpy()) > 0.9


def test_full_network_runs_from_pixels():
    """Trunk (frozen through blocks.6) + dense head: the FractureNet contract, end to end from pixels."""
    from bonefrac.model.dense import DenseFractureNet, FrozenTrunk, build_head

    net = DenseFractureNet(FrozenTrunk(pretrained="none", last_block=6), build_head("dense", pretrained="none"))
    net.eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        z, m = net(x), net.evidence(x)
    assert z.shape == (2, 1) and m.shape == (2, 1, 6, 6)
    assert not any(p.requires_grad for p in net.trunk.parameters())
    net.train()
    assert not net.trunk.training  # the frozen trunk keeps BatchNorm running statistics


def test_dense_archs_have_an_embedding_for_drift_and_ood():
    """A dense arch has no linear layer; its embedding (pooled late features) comes from the same pass as
    the logit, so the drift reference and the OOD check work for the FracAtlas model too."""
    import numpy as np

    from bonefrac.model.bundle import ModelBundle
    from bonefrac.model.dense import DenseFractureNet, FrozenTrunk, build_head
    from bonefrac.model.networks import forward_with_embedding
    from bonefrac.model.transforms import PreprocessSpec
    from bonefrac.monitoring.features import model_outputs

    torch.manual_seed(0)
    net = DenseFractureNet(FrozenTrunk(pretrained="none", last_block=6), build_head("dense", pretrained="none")).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits, emb = forward_with_embedding(net, x)
        # the head's input, pooled: here the trunk's stride-32 map (the head holds no late block)
        assert torch.allclose(logits, net(x)) and torch.allclose(emb, net.trunk(x)[1].mean(dim=(2, 3)))
    assert emb.shape == (2, 320)
    bundle = ModelBundle("efficientnet_lite0_dense", net.state_dict(), PreprocessSpec(image_size=64))
    scores, feats = model_outputs(bundle, x.numpy(), model=net)
    assert scores.shape == (2,) and np.allclose(feats, emb.numpy(), atol=1e-5)


def test_flip_tta_arch_averages_the_image_and_its_mirror():
    """`efficientnet_lite0_dense_tta`: the same weights as the plain dense arch, scored as the mean of the
    image and its left-right mirror (maps mirrored back): so its logit is mirror-invariant, and a map that
    is not mirrored back, or a TTA that scores only one view, fails here."""
    from bonefrac.model.networks import build_model

    torch.manual_seed(0)
    tta = build_model("efficientnet_lite0_dense_tta", 0, "efficientnet_lite_offline").eval()
    plain = build_model("efficientnet_lite0_dense", 0, "none").eval()
    plain.load_state_dict(tta.state_dict())  # one module layout: a bundle's weights load into either
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        z, m = tta(x), tta.evidence_map(x)
        z1, z2 = plain(x), plain(x.flip(-1))
        m1, m2 = plain.evidence_map(x), plain.evidence_map(x.flip(-1))
        assert torch.allclose(z, (z1 + z2) / 2, atol=1e-5) and not torch.allclose(z1, z2, atol=1e-4)
        assert torch.allclose(m, (m1 + m2.flip(-1)) / 2, atol=1e-5)
        assert torch.allclose(tta(x.flip(-1)), z, atol=1e-5)
        assert torch.allclose(tta.features(x), plain.features(x), atol=1e-5)  # the embedding: the image's own


@pytest.mark.parametrize("arch", ["efficientnet_lite0_dense_tta", "efficientnet_lite0_dense_s8_tta",
                                  "efficientnet_lite0_dense"])
def test_outputs_from_the_trunks_maps_equal_the_pass_from_pixels(arch):
    """The evaluate stage scores its training sample from the train stage's cached trunk maps
    (`outputs_from_trunk`): logits, map and embedding must be the pixel pass's. A TTA that drops the
    mirror view, a mirror map not flipped back, or a stride-8 tap left out fails here."""
    from bonefrac.model.networks import build_model

    torch.manual_seed(0)
    net = build_model(arch, 0, "efficientnet_lite_offline").eval()
    with torch.no_grad():  # a head that is not at its initialisation (the logit layer starts flat)
        for p in net.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        z, m, emb = net._outputs(x)
        feats, mirror = net.trunk(x), net.trunk(x.flip(-1))
        z2, m2, emb2 = net.outputs_from_trunk(feats, mirror if net.flip_tta else None)
        assert torch.allclose(z, z2, atol=1e-5) and torch.allclose(m, m2, atol=1e-5)
        assert torch.allclose(emb, emb2, atol=1e-5)
        if net.flip_tta:
            assert not torch.allclose(net.outputs_from_trunk(feats, feats)[0], z, atol=1e-4)
            with pytest.raises(ValueError, match="mirrored"):
                net.outputs_from_trunk(feats)


def test_stride8_level_refines_the_map_from_the_blocks2_tap():
    """A head with ``s8_channels`` maps per stride-8 cell, needs the stride-8 input (and a head
    without the level refuses one); the trunk with ``tap8`` returns blocks.2's output as that input."""
    from bonefrac.model.dense import FrozenTrunk

    trunk = FrozenTrunk(pretrained="none", last_block=6, tap8=True)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        s16, s32, s8 = trunk(x)
        h = trunk.bn1(trunk.conv_stem(trunk.input_adapter(x)))
        for i in range(3):
            h = trunk.blocks[i](h)
    assert torch.equal(s8, h) and s8.shape == (2, 40, 8, 8) and s16.shape[-1] == 4
    assert len(FrozenTrunk(pretrained="none", last_block=6)(x)) == 2
    head = DenseFractureHead(s16_channels=112, s32_channels=320, s8_channels=40).eval()
    z, m = head(s16, s32, s8)
    assert m.shape == (2, 1, 8, 8) and z.shape == (2, 1)
    # The fine tap moves the map: the same stride-16/32 inputs with another s8 give another map.
    assert not torch.allclose(head(s16, s32, torch.randn_like(s8))[1], m)
    with pytest.raises(ValueError, match="stride-8"):
        head(s16, s32)
    with pytest.raises(ValueError, match="stride-8"):
        DenseFractureHead(s16_channels=112, s32_channels=320)(s16, s32, s8)


def test_centre_profile_peaks_inside_the_box_where_the_area_profile_is_a_plateau():
    """A 33 × 30 px box at 512 px (a median FracAtlas fracture): the flat (area) target is 1 on four
    cells and up to 0.8 on cells whose centres lie outside the box; the centre profile is 1 on the one
    cell holding the box centre and small on every cell whose centre is outside the box."""
    box = [[100.0, 100.0, 33.0, 30.0]]
    area = box_target_map(box, 512, 32)
    centre = box_target_map(box, 512, 32, profile="centre")
    centres = (torch.arange(32) + 0.5) * 16
    inside = ((centres >= 100) & (centres <= 130))[:, None] & ((centres >= 100) & (centres <= 133))[None, :]
    assert int((area == 1).sum()) == 4 and float(area[~inside].max()) > 0.5
    assert int((centre == 1).sum()) == 1 and bool(inside[centre == 1].all())
    assert int(centre.argmax()) == 7 * 32 + 7  # the cell of the box centre (116.5, 115)
    assert float(centre[~inside].max()) < 0.2
    assert torch.allclose(box_target_map(box, 512, 32, flip=True, profile="centre"), centre.flip(-1))
    with pytest.raises(ValueError, match="profile"):
        box_target_map(box, 512, 32, profile="gauss")  # type: ignore[arg-type]


def test_outline_profile_covers_the_traced_fracture_not_the_boxs_corners():
    """A triangle traced inside a 64 × 64 px box at 512 px: the outline target is each cell's share of
    the triangle (zero on the box's empty corner cells, where the area target is 1); a box without an
    outline keeps the area target; mirrored, it is the unmirrored target's mirror."""
    box = [96.0, 96.0, 64.0, 64.0]  # exactly cells 6..9 in x and y
    triangle = [96.0, 96.0, 160.0, 96.0, 96.0, 160.0]  # the box's upper-left half
    area = box_target_map([box], 512, 32, grow=0.0)
    traced = box_target_map([box], 512, 32, grow=0.0, profile="outline", outlines=[[triangle]])
    assert float(area[6:10, 6:10].min()) == 1.0
    assert float(traced[6, 6]) == 1.0 and float(traced[9, 9]) == 0.0  # a covered corner, an empty one
    assert float(traced[6, 9]) == pytest.approx(0.5, abs=0.1)  # the diagonal halves a cell
    assert float(traced.sum()) == pytest.approx(8.0, abs=0.5)  # half of the 16 cells
    assert float(traced[area == 0].sum()) == 0.0
    mirrored = box_target_map([box], 512, 32, grow=0.0, flip=True, profile="outline", outlines=[[triangle]])
    assert torch.allclose(mirrored, traced.flip(-1))
    # A second box without an outline: its area target, beside the first box's outline.
    other = [304.0, 304.0, 32.0, 32.0]  # cells 19..20
    both = box_target_map([box, other], 512, 32, grow=0.0, profile="outline", outlines=[[triangle], []])
    assert torch.equal(both[:15], traced[:15]) and float(both[19:21, 19:21].min()) == 1.0
    assert torch.equal(box_target_map([box], 512, 32, grow=0.0, profile="outline"), area)  # no outlines given
    # An outline thinner than a pixel (a traced line) covers no pixel centre: that box alone falls back to
    # its area target, while the other box keeps its outline (a per-image fallback would drop both).
    sliver = [304.0, 304.2, 336.0, 304.2, 320.0, 304.4]
    fallback = box_target_map([box, other], 512, 32, grow=0.0, profile="outline", outlines=[[triangle], [sliver]])
    assert torch.equal(fallback, both)
    with pytest.raises(ValueError, match="outlines"):
        box_target_map([box, other], 512, 32, profile="outline", outlines=[[triangle]])
    # Two boxes whose outlines overlap: the target is their union's coverage (each pixel counted once), as
    # if both were one outline; a sum would count the triangle twice and leave the other half at 0.5
    square = [96.0, 96.0, 160.0, 96.0, 160.0, 160.0, 96.0, 160.0]
    union = box_target_map([box, box], 512, 32, grow=0.0, profile="outline", outlines=[[triangle], [square]])
    assert torch.equal(union, box_target_map([box], 512, 32, grow=0.0, profile="outline", outlines=[[square]]))
    assert float(union[6:10, 6:10].min()) == 1.0


def test_shift_image_moves_the_content_and_keeps_the_size():
    from bonefrac.model.dense import shift_image

    x = torch.arange(2 * 10 * 12, dtype=torch.float32).view(2, 1, 10, 12)
    s = shift_image(x, 2, -3)  # two rows down, three columns left
    assert s.shape == x.shape
    assert torch.equal(s[..., 2:, :-3], x[..., :-2, 3:])
    assert torch.equal(s[..., :2, :-3], x[..., :1, 3:].expand(-1, -1, 2, -1))  # the gap repeats the edge row


def test_stitch_maps_sample_the_same_map_on_a_grid_twice_as_fine():
    """A translation-equivariant map (the mean of each 16-px cell) stitched from the four shifted inputs
    equals the mean over 16-px windows centred on a stride-8 grid's cell centres: a swapped shift
    direction or interleave order moves each value by 8 px and fails here."""
    import torch.nn.functional as F

    from bonefrac.model.dense import shift_image, stitch_maps, stitch_shifts

    torch.manual_seed(0)
    x = torch.rand(2, 1, 128, 128)
    fine = stitch_maps([F.avg_pool2d(shift_image(x, dy, dx), 16) for dy, dx in stitch_shifts(16)])
    ref = F.avg_pool2d(F.pad(x, (4, 4, 4, 4), mode="replicate"), 16, stride=8)  # windows centred at 8k + 4
    assert fine.shape == (2, 1, 16, 16)
    assert torch.allclose(fine, ref, atol=1e-6)
    with pytest.raises(ValueError):
        stitch_shifts(6)


def test_stitch_arch_keeps_the_logit_and_refines_only_the_map():
    """`efficientnet_lite0_dense_tta_stitch`: the TTA arch's weights and image logit; its evidence map is
    the TTA map of the four shifted inputs interleaved on a grid twice as fine."""
    from bonefrac.model.dense import shift_image, stitch_shifts
    from bonefrac.model.networks import build_model

    torch.manual_seed(0)
    st = build_model("efficientnet_lite0_dense_tta_stitch", 0, "efficientnet_lite_offline").eval()
    tta = build_model("efficientnet_lite0_dense_tta", 0, "none").eval()
    tta.load_state_dict(st.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(st(x), tta(x), atol=1e-6)
        fine, coarse = st.evidence_map(x), tta.evidence_map(x)
        assert coarse.shape == (2, 1, 4, 4) and fine.shape == (2, 1, 8, 8)
        for (dy, dx) in stitch_shifts(16):
            sub = fine[..., (0 if dy > 0 else 1) :: 2, (0 if dx > 0 else 1) :: 2]
            assert torch.allclose(sub, tta.evidence_map(shift_image(x, dy, dx)), atol=1e-5)
        assert not torch.allclose(fine[..., 1::2, 1::2], coarse, atol=1e-4)  # the shifts do move the map

"""benchmarks.pointing_misses sorts a map's peak by its distance to the nearest box."""

from __future__ import annotations

import numpy as np
import pytest
from benchmarks.pointing_misses import peak_distance

from bonefrac.explain.localisation import pointing_game


def test_peak_distance_is_zero_inside_a_box_and_euclidean_outside():
    cam = np.zeros((64, 64))
    cam[10, 20] = 1.0  # peak pixel centre (20.5, 10.5)
    assert peak_distance(cam, [[15.0, 5.0, 10.0, 10.0]]) == 0.0 and pointing_game(cam, [[15.0, 5.0, 10.0, 10.0]])
    # box to the right: 3.5 px in x only; below-right: (3.5, 4.5) -> hypot
    assert peak_distance(cam, [[24.0, 0.0, 5.0, 20.0]]) == pytest.approx(3.5)
    assert peak_distance(cam, [[24.0, 15.0, 5.0, 5.0]]) == pytest.approx(np.hypot(3.5, 4.5))
    # the nearest of several boxes counts
    assert peak_distance(cam, [[50.0, 50.0, 5.0, 5.0], [24.0, 0.0, 5.0, 20.0]]) == pytest.approx(3.5)
    assert not pointing_game(cam, [[24.0, 0.0, 5.0, 20.0]])

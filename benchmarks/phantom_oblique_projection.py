"""Monte-Carlo of the angle an oblique phantom fracture's line makes in each view (issue 14).

Why: a phantom's type label must be visible in the image it labels. The fracture plane's
obliquity θ (30–55° for oblique, 0–12° for transverse) is seen in a view at beam azimuth β
as a line at ``atan(|tan θ · cos(β − φ)|)`` to the bone's cross-section, φ being the plane's
azimuth (``bonefrac.data.phantom._fragments``: ``tilt = tan(obliquity) · cos(beta − azimuth)``).
With the default φ ∈ ±0.6 rad around the frontal plane the lateral view (β = 90°) sees the
plane nearly edge-on, so a share of lateral "oblique" images show a transverse-looking line.
This draws fractures from the generator's own ``sample_fracture`` and reports, per azimuth
range, the share of frontal / lateral views whose line is under 12° (the transverse range)
and the angle's percentiles. Angulation of the distal fragment (4–15°) and the bone's own
tilt are left out: they move the line by a few degrees either way.

    python benchmarks/phantom_oblique_projection.py --n 20000 [--ranges 25,65 20,70]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from bonefrac.data.phantom import VIEWS, sample_fracture

TRANSVERSE_MAX_DEG = 12.0


def projected_angles(
    kind: str, n: int, azimuth_deg: tuple[float, float] | None, seed: int = 0,
) -> dict[str, np.ndarray]:
    """Projected line angle (degrees) in the frontal and lateral view of ``n`` drawn fractures."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {"frontal": [], "lateral": []}
    for child in rng.spawn(n):
        fr = sample_fracture(child, kind, azimuth_deg)
        for view in out:
            beta = math.radians(VIEWS[view])
            out[view].append(math.degrees(math.atan(abs(math.tan(fr.obliquity) * math.cos(beta - fr.azimuth)))))
    return {k: np.asarray(v) for k, v in out.items()}


def summary(angles: dict[str, np.ndarray]) -> dict[str, object]:
    res: dict[str, object] = {}
    for view, a in angles.items():
        res[view] = {
            "under_12deg": round(float((a < TRANSVERSE_MAX_DEG).mean()), 4),
            "p5_p50_p95": [round(float(x), 1) for x in np.percentile(a, [5, 50, 95])],
            "min": round(float(a.min()), 1),
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--ranges", nargs="*", default=["25,65"], help="azimuth ranges lo,hi (degrees) to compare")
    a = ap.parse_args()
    rows: dict[str, object] = {
        "transverse (default)": summary(projected_angles("transverse", a.n, None)),
        "oblique, default ±34.4°": summary(projected_angles("oblique", a.n, None)),
    }
    for r in a.ranges:
        lo, hi = (float(x) for x in r.split(","))
        rows[f"oblique, azimuth [{lo:g}, {hi:g}]°"] = summary(projected_angles("oblique", a.n, (lo, hi)))
    for name, row in rows.items():
        print(json.dumps({"fractures": name, **row}))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

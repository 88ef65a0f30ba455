"""Who has what in the phantom datasets: the study plan shared by the 2D and 3D generators.

Kept apart from :mod:`bonefrac.data.phantom` (radiographs) and
:mod:`bonefrac.data.phantom3d` (volumes) so that neither generator imports the
other: both import this module.
"""

from __future__ import annotations

import numpy as np

from bonefrac.config import PhantomParams
from bonefrac.data.schema import FRACTURE_TYPES_PHANTOM

REGIONS: tuple[str, ...] = ("forearm", "tibia", "femur", "hand")
"""Body regions the phantom draws (values of the manifest's ``body_part``)."""


def study_plan(params: PhantomParams) -> list[dict[str, object]]:
    """Who has what: one row per study (patient, region, fracture type or None, bit depth).

    Fracture types are dealt round-robin from a shuffled list, so every type
    appears once there are at least six fractured studies.
    """
    rng = np.random.default_rng([params.seed, 1])
    n_studies = params.n_patients * params.studies_per_patient
    n_fx = round(params.fracture_fraction * n_studies)
    n_fx = min(max(n_fx, 1), n_studies - 1)
    types = list(FRACTURE_TYPES_PHANTOM)
    rng.shuffle(types)
    kinds: list[str | None] = [types[i % len(types)] for i in range(n_fx)] + [None] * (n_studies - n_fx)
    kinds = [kinds[i] for i in rng.permutation(n_studies)]
    regions = [REGIONS[i % len(REGIONS)] for i in rng.permutation(params.n_patients)]
    plan = []
    for p in range(params.n_patients):
        for s in range(params.studies_per_patient):
            j = p * params.studies_per_patient + s
            plan.append({
                "patient_id": f"PHP{p:05d}", "study_id": f"PHS{p:05d}{s:02d}",
                "region": regions[p], "fracture_type": kinds[j],
                "bit_depth": int(rng.choice(params.bit_depths)),
            })
    return plan

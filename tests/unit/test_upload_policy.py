"""Which scale an upload is decoded at: the model's preprocessing decides, the opt-in only for version 1."""

from __future__ import annotations

import pytest

from bonefrac.inference.upload_policy import DRAFT_MARGIN, upload_decode_hints
from bonefrac.model.transforms import PreprocessSpec

V2 = PreprocessSpec(image_size=384, version="2")
V1 = PreprocessSpec(image_size=384, version="1")


@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("display_side", [0, 1024])
def test_version_2_decodes_at_its_own_scale_whatever_the_setting(reduced: bool, display_side: int) -> None:
    """The served pixels are the training pixels: the setting cannot change a version-2 model's input,
    and the /explain picture gets its own (full-resolution) decode."""
    assert upload_decode_hints(V2, reduced, display_side) == (384, None)


def test_version_1_full_resolution_unless_opted_in() -> None:
    assert upload_decode_hints(V1, False, 1024) == (None, None)
    assert upload_decode_hints(V1, True, 0) == (DRAFT_MARGIN * 384, DRAFT_MARGIN * 384)
    # One reduced decode serves the model and the picture: it keeps the larger of the two needs.
    assert upload_decode_hints(V1, True, 1024) == (1024, 1024)


def test_volumes_are_never_decoded_at_reduced_scale() -> None:
    spec = PreprocessSpec(image_size=96, spatial_dims=3, version="2")
    assert upload_decode_hints(spec, True, 1024) == (None, None)

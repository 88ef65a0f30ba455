"""Radiograph-like phantoms of long bones: the embedded default dataset.

Why a phantom: the pipeline must run end to end on a fresh machine with no
data download, and its tests need images whose ground truth (label, fracture
type, box) is known exactly. So the generator is a small physical model, not a
drawing: each limb is a soft-tissue cylinder holding one or more bones (tubes
of cortical bone around marrow, flared and capped at the joints, with a
trabecular texture near the ends). A view projects that anatomy along a beam
direction (AP, lateral or oblique), giving per-pixel line integrals of the
attenuation coefficient; Beer–Lambert turns them into detector counts, to which
focal-spot blur, quantum noise, a heel effect, collimation and a lead marker
are added, and the detector's log transform plus a display window and tone
curve give the stored image (bone bright, soft tissue grey, air dark).

A fracture splits the bone into fragments (two, three or four depending on the
type) separated by a gap whose size scales with the bone's width, each fragment
moved rigidly (shift, angulation). Boxes are computed from that geometry after
the fragments move and after the view's rotation, in pixels of the stored image.

Everything is drawn from one ``numpy.random.Generator`` through independent
child streams (anatomy, fracture, acquisition, noise), so the same seed gives
byte-identical files and an image rendered with and without its fracture
differs only around the fracture.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from bonefrac.atomic import atomic_write_bytes, atomic_write_csv
from bonefrac.config import PhantomParams
from bonefrac.data.phantom_plan import REGIONS, study_plan
from bonefrac.data.schema import FRACTURE_TYPES_PHANTOM, RECORD_COLUMNS
from bonefrac.errors import BonefracError

Box = list[int]  # [x, y, w, h] in pixels of the stored image

VIEWS: dict[str, float] = {"frontal": 0.0, "lateral": 90.0, "oblique": 45.0}
"""Beam azimuth (degrees) of each view around the limb axis."""

# Linear attenuation coefficients (1/mm) at a typical ~60 kVp effective energy;
# only their ratios matter for the look, their size sets the contrast.
MU_SOFT = 0.014
MU_FAT_LAYER = 0.004  # extra attenuation of muscle over subcutaneous fat
MU_CORTEX = 0.085
MU_MARROW = 0.016
MU_TRABECULAR = 0.030


class PhantomError(BonefracError, ValueError):
    """Invalid phantom request (unknown fracture type, view, bit depth...)."""


# ----------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class BoneSpec:
    """One bone in limb coordinates (mm). The limb axis is U; the cross-section is (x_ml, y_ap).

    ``t_lo``/``t_hi`` bound the shaft along the bone's own axis (0 at the study's
    site); ``cap_lo``/``cap_hi`` say whether that end is a rounded joint end
    inside the field (else the shaft runs out of the image).
    """

    cx: float
    cy: float
    rx: float
    ry: float
    psi: float  # axis angle to the limb axis (rad), seen in the frontal view
    u0: float  # where the bone's axis crosses V=cx (mm along the limb axis)
    t_lo: float
    t_hi: float
    cap_lo: bool
    cap_hi: bool
    cortex: float  # cortical thickness as a fraction of the radius
    flare: float  # widening at the ends (fraction of the radius)
    trabecular: float  # trabecular density scale


@dataclass(frozen=True)
class Anatomy:
    region: str
    limb_rx: float
    limb_ry: float
    taper: float  # relative change of limb width per 100 mm
    bones: tuple[BoneSpec, ...]
    fracture_bone: int
    fov_mm: float


@dataclass(frozen=True)
class FractureSpec:
    """A fracture of ``Anatomy.bones[fracture_bone]`` at its t=0 site (3D parameters)."""

    kind: str
    gap: float  # fraction of the bone radius
    obliquity: float  # rad, angle of the fracture plane to the cross-section
    azimuth: float  # rad, direction of that obliquity in the cross-section
    disp_ml: float  # lateral shift (fraction of radius), medio-lateral component
    disp_ap: float
    ang_ml: float  # angulation (rad) seen in the frontal view
    ang_ap: float
    spiral_len: float  # spiral: axial extent of the S-curve (fraction of radius)
    wedge_apex: float  # comminuted: apex position across the bone (-1..1)
    wedge_len: float  # comminuted: wedge half-length (fraction of radius)
    wedge_side: float  # +1 / -1
    wedge_shift: float  # fraction of radius, outward
    wedge_rot: float
    crack_stop: float  # greenstick: where the crack stops across the bone (-1..1)
    segment_len: float  # segmental: length of the middle segment (fraction of radius)
    tilt2: float  # second line of a segmental fracture
    jag_amp: float  # roughness of the fracture line (fraction of radius)
    jag_phase: tuple[float, float, float]


@dataclass(frozen=True)
class Acquisition:
    """How one view was exposed, detected and displayed."""

    px_per_mm: float
    rotation: float  # rad, limb axis to the image vertical
    flip: bool
    site_x: float
    site_y: float
    height: int
    width: int
    counts: float  # mean detector counts for an unattenuated pixel
    heel: tuple[float, float]  # linear exposure gradient
    blur: float  # px
    window_hi: float  # display window top, as a multiple of the estimated max attenuation
    window_lo: float
    gamma: float
    unsharp_amount: float
    unsharp_sigma: float
    collimation: tuple[float, float, float, float]  # fraction covered: left, right, top, bottom
    marker: str  # "", "L" or "R"
    marker_corner: int
    stored_max: int  # 255, 4095 or 65535
    soft_seed: int


@dataclass
class PhantomRender:
    """One rendered view before quantisation, with the geometry a test can check."""

    image: np.ndarray  # float32 on [0, 1]
    boxes: list[Box]
    sites: list[tuple[float, float]] = field(default_factory=list)  # fracture centres (x, y) px


_REGION_TEMPLATES: dict[str, dict[str, object]] = {
    # limb semi-axes (mm), field of view (mm), bones: (cx, cy, rx, ry, psi_deg, length_mm)
    "forearm": {"limb": (34, 28), "fov": (130, 190), "length": 250,
                "bones": [(10, 0, 7.0, 6.0, 2, 250), (-10, 3, 6.0, 6.0, -2, 270)]},
    "tibia": {"limb": (52, 48), "fov": (190, 280), "length": 370,
              "bones": [(6, -6, 13.0, 11.0, 0, 370), (-24, 6, 5.0, 5.0, 2, 360)]},
    "femur": {"limb": (75, 72), "fov": (230, 320), "length": 440,
              "bones": [(0, 0, 14.0, 14.0, 0, 440)]},
    "hand": {"limb": (46, 15), "fov": (100, 140), "length": 65,
             "bones": [(-24, 0, 4.6, 4.0, -9, 62), (-8, 1, 5.0, 4.3, -3, 68),
                       (8, 1, 4.8, 4.1, 3, 64), (23, 0, 4.3, 3.8, 8, 56)]},
}


def sample_anatomy(rng: np.random.Generator, region: str) -> Anatomy:
    """Draw one limb of ``region``: sizes, bone positions, which ends are joints inside the field."""
    if region not in _REGION_TEMPLATES:
        raise PhantomError(f"unknown body region {region!r}; allowed: {', '.join(REGIONS)}")
    tpl = _REGION_TEMPLATES[region]
    scale = rng.uniform(0.85, 1.15)
    lx, ly = tpl["limb"]  # type: ignore[misc]
    limb_rx = lx * scale * rng.uniform(0.9, 1.1)
    limb_ry = ly * scale * rng.uniform(0.9, 1.1)
    fov = rng.uniform(*tpl["fov"]) * scale  # type: ignore[misc]
    raw_bones = tpl["bones"]  # type: ignore[assignment]
    if region == "forearm":
        frac_bone = int(rng.random() < 0.4)
    elif region == "tibia":
        frac_bone = int(rng.random() < 0.2)
    elif region == "hand":
        frac_bone = int(rng.integers(0, 4))
    else:
        frac_bone = 0
    # Where the site sits along the fractured bone (fraction of its length from t_lo).
    site_frac = rng.uniform(0.3, 0.7)
    end_lo = rng.random() < 0.5  # which joint end tends to be in the field
    bones: list[BoneSpec] = []
    for i, (cx, cy, rx, ry, psi_deg, length) in enumerate(raw_bones):  # type: ignore[misc]
        s = scale * rng.uniform(0.92, 1.08)
        L = length * scale * rng.uniform(0.9, 1.1)
        f = site_frac if i == frac_bone else np.clip(site_frac + rng.normal(0, 0.05), 0.2, 0.8)
        u0 = 0.0 if i == frac_bone else rng.normal(0, 0.02 * L)
        t_lo, t_hi = -f * L, (1 - f) * L
        if region == "hand":
            cap_lo = cap_hi = True
        else:
            # A long bone shows one joint end when the field is long enough.
            near = -t_lo if end_lo else t_hi
            cap_lo = end_lo and near < 0.75 * fov
            cap_hi = (not end_lo) and near < 0.75 * fov
        bones.append(BoneSpec(
            cx=cx * scale + rng.normal(0, 1.0), cy=cy * scale + rng.normal(0, 1.0),
            rx=rx * s, ry=ry * s, psi=math.radians(psi_deg + rng.normal(0, 1.0)), u0=float(u0),
            t_lo=float(t_lo), t_hi=float(t_hi), cap_lo=bool(cap_lo), cap_hi=bool(cap_hi),
            cortex=rng.uniform(0.22, 0.36),
            flare=rng.uniform(0.15, 0.35) if region == "hand" else rng.uniform(0.3, 0.6),
            trabecular=rng.uniform(0.7, 1.1),
        ))
    # Joint partners: the bone across each visible joint (phalanx, carpal row, condyles).
    partners: list[BoneSpec] = []
    for b in bones:
        for lo_end in (True, False):
            if not (b.cap_lo if lo_end else b.cap_hi):
                continue
            gap = rng.uniform(0.35, 0.6) * b.rx
            plen = rng.uniform(0.55, 0.75) if region == "hand" else rng.uniform(0.25, 0.5)
            plen *= b.t_hi - b.t_lo
            k = rng.uniform(0.75, 0.95) if region == "hand" else rng.uniform(1.0, 1.3)
            if lo_end:
                p_lo, p_hi, c_lo, c_hi = b.t_lo - gap - plen, b.t_lo - gap, region == "hand", True
            else:
                p_lo, p_hi, c_lo, c_hi = b.t_hi + gap, b.t_hi + gap + plen, True, region == "hand"
            pflare = rng.uniform(0.15, 0.35) if region == "hand" else rng.uniform(0.35, 0.7)
            partners.append(replace(b, rx=b.rx * k, ry=b.ry * k, t_lo=p_lo, t_hi=p_hi,
                                    cap_lo=c_lo, cap_hi=c_hi, flare=pflare,
                                    cortex=rng.uniform(0.2, 0.3)))
    return Anatomy(region=region, limb_rx=float(limb_rx), limb_ry=float(limb_ry),
                   taper=float(rng.uniform(-0.12, 0.12)), bones=tuple(bones + partners),
                   fracture_bone=frac_bone, fov_mm=float(fov))


def sample_fracture(
    rng: np.random.Generator, kind: str, oblique_azimuth_deg: tuple[float, float] | None = None,
) -> FractureSpec:
    """Draw the 3D parameters of a fracture of type ``kind``.

    Sizes are fractions of the bone's radius, so a fracture of a finger bone is
    as visible relative to its bone as one of a femur. The gap has a floor in
    pixels applied at render time so it survives the pipeline's 2x downsampling.

    ``oblique_azimuth_deg`` (an oblique fracture only) maps the azimuth draw linearly onto
    that range instead of ±0.6 rad; ``rng`` is consumed exactly as without it, so every other
    parameter, and every other type, is drawn identically (``None`` gives today's data set).
    """
    if kind not in FRACTURE_TYPES_PHANTOM:
        raise PhantomError(f"unknown fracture type {kind!r}; allowed: {', '.join(FRACTURE_TYPES_PHANTOM)}")
    sign = lambda: float(rng.choice([-1.0, 1.0]))  # noqa: E731
    obl = {"transverse": rng.uniform(0, 12), "oblique": rng.uniform(30, 55), "spiral": rng.uniform(0, 10),
           "comminuted": rng.uniform(0, 35), "greenstick": rng.uniform(0, 10),
           "segmental": rng.uniform(0, 25)}[kind]
    disp = rng.uniform(0.5, 1.1)
    disp_dir = rng.uniform(0, 2 * math.pi)
    ang = math.radians(rng.uniform(4, 15))
    ang_dir = rng.uniform(0, 2 * math.pi)

    def azimuth(draw: float) -> float:  # drawn in place below: the stream's order is the data set
        if oblique_azimuth_deg is None or kind != "oblique":
            return draw
        lo, hi = (math.radians(a) for a in oblique_azimuth_deg)
        return lo + (draw + 0.6) / 1.2 * (hi - lo)

    return FractureSpec(
        kind=kind,
        gap=rng.uniform(0.45, 0.8) if kind != "greenstick" else rng.uniform(0.6, 0.9),
        obliquity=math.radians(obl) * sign(), azimuth=azimuth(rng.uniform(-0.6, 0.6)),
        disp_ml=disp * math.cos(disp_dir), disp_ap=disp * math.sin(disp_dir),
        ang_ml=ang * math.cos(ang_dir), ang_ap=ang * math.sin(ang_dir),
        spiral_len=rng.uniform(2.2, 3.6) * sign(),
        wedge_apex=rng.uniform(-0.35, 0.1), wedge_len=rng.uniform(1.0, 1.8), wedge_side=sign(),
        wedge_shift=rng.uniform(0.3, 0.7), wedge_rot=math.radians(rng.uniform(-20, 20)),
        crack_stop=rng.uniform(-0.6, -0.2), segment_len=rng.uniform(3.0, 6.0),
        tilt2=math.radians(rng.uniform(-25, 25)),
        jag_amp=rng.uniform(0.05, 0.12), jag_phase=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, 3)),
    )


def sample_acquisition(
    rng: np.random.Generator,
    size: int,
    anatomy: Anatomy,
    bit_depth: int,
    site_range: tuple[float, float] = (0.35, 0.65),
) -> Acquisition:
    """Draw exposure, geometry and display settings of one view.

    ``site_range`` bounds where the fracture site lands, as a fraction of the
    image side. The default keeps it central, as radiographers centre on the
    injury; a wider range makes "point at the centre" a weak localisation
    baseline (the Grad-CAM tests use that).
    """
    if bit_depth not in (8, 16):
        raise PhantomError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    height = size
    width = size if rng.random() < 0.75 else round(size * 0.8)
    rot = rng.uniform(-0.45, 0.45) + (math.pi / 2 if rng.random() < 0.15 else 0.0)
    collim = tuple(float(rng.uniform(0.02, 0.09)) if rng.random() < 0.15 else 0.0 for _ in range(4))
    return Acquisition(
        px_per_mm=size / anatomy.fov_mm,
        rotation=float(rot), flip=bool(rng.random() < 0.5),
        site_x=float(rng.uniform(*site_range) * width), site_y=float(rng.uniform(*site_range) * height),
        height=height, width=width,
        counts=float(math.exp(rng.uniform(math.log(5000), math.log(40000)))),
        heel=(float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.15, 0.15))),
        blur=float(rng.uniform(0.4, 1.1) * size / 256),
        window_hi=float(rng.uniform(0.9, 1.12)), window_lo=float(rng.uniform(-0.15, 0.0)),
        gamma=float(rng.uniform(1.15, 1.8)),
        unsharp_amount=float(rng.uniform(0.0, 0.8)), unsharp_sigma=float(rng.uniform(1.5, 3.0) * size / 256),
        collimation=collim,  # type: ignore[arg-type]
        marker=str(rng.choice(["", "L", "R"])), marker_corner=int(rng.integers(0, 4)),
        stored_max=255 if bit_depth == 8 else int(rng.choice([4095, 65535], p=[0.6, 0.4])),
        soft_seed=int(rng.integers(0, 2**31)),
    )


# ------------------------------------------------------------- projection
def _proj(rx: float, ry: float, cx: float, cy: float, beta: float) -> tuple[float, float, float]:
    """Visible centre, visible half-width and max half-chord of an ellipse seen along azimuth beta."""
    c, s = math.cos(beta), math.sin(beta)
    w = math.hypot(rx * c, ry * s)
    return cx * c + cy * s, w, rx * ry / w


def _chord(half_depth: np.ndarray | float, half_width: np.ndarray | float, d: np.ndarray) -> np.ndarray:
    """Path length through an ellipse at offset ``d`` from its centre (0 outside)."""
    hw = np.maximum(half_width, 1e-6)
    q = 1.0 - (d / hw) ** 2
    return 2.0 * half_depth * np.sqrt(np.clip(q, 0.0, None))


@dataclass(frozen=True)
class _Fragment:
    """A rigid piece of the fractured bone: region in intact coords + forward transform."""

    region: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (t, s) -> bool, intact bone coords
    angle: float = 0.0  # rad, rotation about pivot in the (t, d) plane
    pivot: tuple[float, float] = (0.0, 0.0)
    shift: tuple[float, float] = (0.0, 0.0)  # (dt, dd) mm

    def inverse(self, t: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.angle == 0.0 and self.shift == (0.0, 0.0):
            return t, d
        c, s = math.cos(self.angle), math.sin(self.angle)
        x = t - self.pivot[0] - self.shift[0]
        y = d - self.pivot[1] - self.shift[1]
        return c * x + s * y + self.pivot[0], -s * x + c * y + self.pivot[1]

    def forward(self, t: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        x, y = t - self.pivot[0], d - self.pivot[1]
        return (c * x - s * y + self.pivot[0] + self.shift[0], s * x + c * y + self.pivot[1] + self.shift[1])


_Outline = tuple[np.ndarray, list[int]]


def _jag(fr: FractureSpec, s: np.ndarray, w: float) -> np.ndarray:
    p = fr.jag_phase
    wave = np.sin(5.1 * s + p[0]) + 0.6 * np.sin(11.3 * s + p[1]) + 0.35 * np.sin(23.7 * s + p[2])
    return fr.jag_amp * w * wave


def _fragments(
    fr: FractureSpec, w: float, beta: float, gap_mm: float, displace: bool,
) -> tuple[list[_Fragment], list[_Outline]]:
    """Fragments of the fractured bone in one view, and the fracture outline of each site.

    ``w`` is the visible half-width (mm). Each outline is an (N, 2) array of
    (t, d) points in intact coordinates plus the indices of the fragments that
    touch it, so the box follows the pieces after they move.
    """
    cb = math.cos(beta - fr.azimuth)
    tilt = math.tan(fr.obliquity) * cb
    disp = (fr.disp_ml * math.cos(beta) + fr.disp_ap * math.sin(beta)) * w if displace else 0.0
    ang = (fr.ang_ml * math.cos(beta) + fr.ang_ap * math.sin(beta)) if displace else 0.0
    half = gap_mm / 2
    s_line = np.linspace(-1.0, 1.0, 25)
    outlines: list[_Outline] = []

    def line(tilt_: float, offset: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
        return lambda s: offset + tilt_ * w * s + _jag(fr, s, w)

    def pts(g: Callable[[np.ndarray], np.ndarray], s: np.ndarray, frags: Sequence[int]) -> _Outline:
        t = g(s)
        return np.concatenate([np.stack([t - half, s * w], 1), np.stack([t + half, s * w], 1)]), list(frags)

    kind = fr.kind
    if kind in ("transverse", "oblique", "spiral"):
        if kind == "spiral":
            L = fr.spiral_len * w * (0.75 + 0.25 * abs(cb))
            g = lambda s: L * (2 / math.pi) * np.arcsin(np.clip(s, -1, 1)) + _jag(fr, s, w) * 0.5  # noqa: E731
        else:
            g = line(tilt)
        frags = [
            _Fragment(lambda t, s, g=g: t < g(s) - half),
            _Fragment(lambda t, s, g=g: t > g(s) + half, angle=ang, shift=(0.0, disp)),
        ]
        outlines.append(pts(g, s_line, [0, 1]))
    elif kind == "greenstick":
        g = line(tilt * 0.5)
        side = 1.0 if fr.wedge_side > 0 else -1.0
        stop = fr.crack_stop

        def crack(t: np.ndarray, s: np.ndarray) -> np.ndarray:
            frac = np.clip((side * s - stop) / (1 - stop), 0.0, 1.0)
            return np.abs(t - g(s)) < half * frac

        # The distal part bends about the intact cortex, opening the crack on the other side.
        hinge = (0.0, -side * w)
        bend = -side * max(abs(ang), math.radians(5.0)) if displace else 0.0
        frags = [
            _Fragment(lambda t, s: (t <= g(s)) & ~crack(t, s)),
            _Fragment(lambda t, s: (t > g(s)) & ~crack(t, s), angle=bend, pivot=hinge),
        ]
        s_c = np.linspace(stop, 1.0, 15) * side
        outlines.append(pts(g, np.concatenate([s_c, [-side]]), [0, 1]))
    elif kind == "comminuted":
        g = line(tilt)
        side, apex, hl = fr.wedge_side, fr.wedge_apex, fr.wedge_len * w
        ta = float(g(np.array([apex * side]))[0])

        def wedge(t: np.ndarray, s: np.ndarray, pad: float) -> np.ndarray:
            sig = side * s
            return (sig > apex + pad / w) & (np.abs(t - ta) < hl * (sig - apex) / (1 - apex) - pad)

        out_shift = side * fr.wedge_shift * w if displace else 0.0
        rot = fr.wedge_rot if displace else 0.0
        piv = (ta, side * w)
        frags = [
            _Fragment(lambda t, s: (t < g(s) - half) & ~wedge(t, s, -half)),
            _Fragment(lambda t, s: (t > g(s) + half) & ~wedge(t, s, -half), angle=ang, shift=(0.0, disp)),
            _Fragment(lambda t, s: wedge(t, s, half) & (t < g(s) - half), angle=rot, pivot=piv,
                      shift=(-0.15 * hl if displace else 0.0, out_shift)),
            _Fragment(lambda t, s: wedge(t, s, half) & (t > g(s) + half), angle=-rot * 0.7, pivot=piv,
                      shift=(0.15 * hl if displace else 0.0, out_shift * 0.8)),
        ]
        outlines.append(pts(g, s_line, [0, 1, 2, 3]))
        outlines.append((np.array([[ta, apex * side * w], [ta - hl, side * w], [ta + hl, side * w]]), [2, 3]))
    elif kind == "segmental":
        seg = fr.segment_len * w
        g1 = line(tilt, -seg / 2)
        g2 = line(math.tan(fr.tilt2) * cb, seg / 2)
        frags = [
            _Fragment(lambda t, s: t < g1(s) - half),
            _Fragment(lambda t, s: (t > g1(s) + half) & (t < g2(s) - half), angle=ang * 0.6,
                      pivot=(0.0, 0.0), shift=(0.0, disp)),
            _Fragment(lambda t, s: t > g2(s) + half, angle=-ang * 0.3, shift=(0.0, 0.35 * disp)),
        ]
        outlines.append(pts(g1, s_line, [0, 1]))
        outlines.append(pts(g2, s_line, [1, 2]))
    else:  # pragma: no cover - guarded by sample_fracture
        raise PhantomError(f"unknown fracture type {kind!r}")
    return frags, outlines


# ---------------------------------------------------------------- rendering
def _bone_line_integral(
    b: BoneSpec,
    beta: float,
    t: np.ndarray,
    d: np.ndarray,
    texture: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Attenuation line integral of one intact bone at bone-local coords (t along, d across, mm)."""
    _, w0, h0 = _proj(b.rx, b.ry, 0.0, 0.0, beta)
    L = b.t_hi - b.t_lo
    fl = max(2.5 * w0, 0.12 * L)
    # Distance into the shaft from each end (negative beyond the end).
    e_lo, e_hi = t - b.t_lo, b.t_hi - t
    near = np.minimum(np.where(b.cap_lo, e_lo, np.inf), np.where(b.cap_hi, e_hi, np.inf))
    end_w = np.clip(1.0 - near / fl, 0.0, 1.0) ** 2  # 1 at a joint end, 0 in the shaft
    m = 1.0 + b.flare * end_w
    cap = 1.0 + b.flare
    beyond = np.where(near < 0, np.sqrt(np.clip(1.0 - (near / (cap * w0 * 0.9)) ** 2, 0.0, None)), 1.0)
    m = m * beyond
    w, h = w0 * m, h0 * m
    ct = b.cortex * w0 * (1.0 - 0.75 * end_w)
    wi, hi = np.maximum(w - ct, 0.0), np.maximum(h - ct * h0 / w0, 0.0)
    outer = _chord(h, w, d)
    inner = _chord(hi, wi, d)
    trab = np.clip(0.15 + 0.85 * end_w, 0.0, 1.0) * b.trabecular
    mu_in = MU_MARROW + (MU_TRABECULAR - MU_MARROW) * trab * texture(t, d / w0)
    # Bone displaces soft tissue, so it adds only its excess attenuation over it.
    return (MU_CORTEX - MU_SOFT) * (outer - inner) + (mu_in - MU_SOFT) * inner


def _make_texture(
    rng: np.random.Generator, t_range: float, res: float,
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Trabecular texture in (t mm, s normalised) coordinates: struts along the bone axis."""
    nt = int(2 * t_range / res) + 8
    ns = 48
    noise = rng.standard_normal((nt, ns))
    tex = ndimage.gaussian_filter(noise, (2.2, 1.0), mode="wrap")
    tex = tex / (tex.std() + 1e-6)
    tex = 1.0 + 0.55 * np.tanh(1.5 * tex)

    def sample(t: np.ndarray, s: np.ndarray) -> np.ndarray:
        it = (t + t_range) / res + 4
        js = (np.clip(s, -1.2, 1.2) + 1.2) / 2.4 * (ns - 1)
        out = ndimage.map_coordinates(tex, [it.ravel(), js.ravel()], order=1, mode="nearest")
        return out.reshape(t.shape)

    return sample


@dataclass(frozen=True)
class _Streams:
    anatomy: np.random.Generator
    fracture: np.random.Generator
    acquisition: np.random.Generator
    noise: np.random.Generator


def render_view(
    anatomy: Anatomy,
    fracture: FractureSpec | None,
    acq: Acquisition,
    view: str,
    noise_rng: np.random.Generator,
    displace: bool = True,
) -> PhantomRender:
    """Project one view of ``anatomy`` (with ``fracture`` if given) to a display image on [0, 1].

    The noise field, texture and all acquisition settings come from
    ``noise_rng`` / ``acq`` and do not depend on the fracture, so rendering
    the same arguments with ``fracture=None`` gives the intact twin image.
    ``displace=False`` keeps the fracture gaps but leaves the fragments in
    place (used by tests to check that boxes cover every changed pixel).
    """
    if view not in VIEWS:
        raise PhantomError(f"unknown view {view!r}; allowed: {', '.join(VIEWS)}")
    beta = math.radians(VIEWS[view])
    H, W, k = acq.height, acq.width, acq.px_per_mm
    tex_rng, z_rng = noise_rng.spawn(2)
    # float64 throughout, float32 only at the end: numpy's float32 exp/log/sin/tanh/power take
    # CPU-specific SIMD paths (AVX2 vs AVX-512 give results a few ULP apart, enough to change
    # stored pixels); in float64 such differences stay far below the quantisation step.
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    dx, dy = xs - acq.site_x, ys - acq.site_y
    cr, sr = math.cos(acq.rotation), math.sin(acq.rotation)
    fl = -1.0 if acq.flip else 1.0
    # Limb frame (mm): U along the limb (image "down" at rotation 0), V across.
    U = (dx * -sr + dy * cr) / k
    V = fl * (dx * cr + dy * sr) / k

    # Soft tissue: an elliptic cylinder with a fat layer, slowly tapering and bulging.
    _, ws, hs = _proj(anatomy.limb_rx, anatomy.limb_ry, 0.0, 0.0, beta)
    srng = np.random.default_rng(acq.soft_seed)
    coarse = ndimage.zoom(srng.standard_normal((6, 6)), (H / 6, W / 6), order=3)[:H, :W]
    bulge = 1.0 + anatomy.taper * U / 100.0 + 0.04 * np.sin(U / (0.35 * anatomy.fov_mm) + acq.soft_seed % 7)
    limb_c = 0.03 * ws * np.sin(U / (0.5 * anatomy.fov_mm) + acq.soft_seed % 5)
    soft = _chord(hs * bulge, ws * bulge, V - limb_c)
    muscle = _chord(0.86 * hs * bulge, 0.86 * ws * bulge, V - limb_c)
    P = (MU_SOFT * soft + MU_FAT_LAYER * muscle) * (1.0 + 0.04 * coarse)
    p_max = MU_SOFT * 2 * hs + MU_FAT_LAYER * 2 * 0.86 * hs

    texture = _make_texture(tex_rng, 0.9 * anatomy.fov_mm + 200.0, 0.6 / max(k, 0.3))
    sites: list[tuple[float, float]] = []
    boxes: list[Box] = []
    bone_peak = 0.0
    for i, b in enumerate(anatomy.bones):
        vc, w0, h0 = _proj(b.rx, b.ry, b.cx, b.cy, beta)
        psi = b.psi * math.cos(beta)
        # Bone-local coordinates: t along the bone axis, d across (mm).
        cp, sp = math.cos(psi), math.sin(psi)
        du, dv = U - b.u0, V - vc
        t = du * cp + dv * sp
        d = -du * sp + dv * cp
        reach = 2.2 * w0 * (1.0 + b.flare)
        bone_peak = max(bone_peak, (MU_CORTEX - MU_SOFT) * 2 * h0 * 0.72)
        fx = fracture if i == anatomy.fracture_bone else None
        if fx is not None:
            # The gap scales with the bone; its floor (in pixels) stays visible (≥ 2.5 px)
            # after the pipeline's 2x downsampling.
            gap_mm = max(fx.gap * w0, 5.0 / k * (H / 256))
            frags, outlines = _fragments(fx, w0, beta, gap_mm, displace)
            reach += (abs(fx.disp_ml) + abs(fx.disp_ap) + fx.wedge_shift) * w0
        else:
            frags, outlines = [_Fragment(lambda t, s: np.ones(t.shape, bool))], []
        sel = np.abs(d) < reach
        sel &= (t > b.t_lo - 3 * w0) & (t < b.t_hi + 3 * w0)
        if not sel.any():
            continue
        ts, ds = t[sel], d[sel]
        acc = np.zeros(ts.shape, np.float64)
        for fg in frags:
            ti, di = fg.inverse(ts, ds)
            m = fg.region(ti, di / w0)
            if m.any():
                acc[m] += _bone_line_integral(b, beta, ti[m], di[m], texture)
        P[sel] += acc
        if fx is not None:
            def to_img(tt: np.ndarray, dd: np.ndarray, cp: float = cp, sp: float = sp, vc: float = vc,
                       u0: float = b.u0) -> np.ndarray:
                uu = tt * cp - dd * sp + u0
                vv = (tt * sp + dd * cp + vc) * fl
                x = (-uu * sr + vv * cr) * k + acq.site_x
                return np.stack([x, (uu * cr + vv * sr) * k + acq.site_y], 1)

            groups: list[np.ndarray] = []
            for arr, idx in outlines:
                moved = [to_img(*frags[j].forward(arr[:, 0], arr[:, 1])) for j in idx]
                groups.append(np.concatenate(moved))
                sites.append(tuple(float(v) for v in moved[0].mean(0)))  # type: ignore[arg-type]
            if fx.kind == "comminuted":
                groups = [np.concatenate(groups)]
                sites = sites[:1]
            margin = 0.3 * w0 * k + 2.0 + 2.5 * acq.blur
            boxes = [bx for g in groups if (bx := _box_from_points(g, margin, W, H)) is not None]
    p_max += bone_peak

    # Collimator blades (unexposed: bright) and a lead marker, before blur.
    cl, cr_, ct, cb_ = acq.collimation
    coll = np.zeros((H, W), bool)
    coll[:, : int(cl * W)] = True
    coll[:, W - int(cr_ * W):] = True
    coll[: int(ct * H), :] = True
    coll[H - int(cb_ * H):, :] = True
    P = np.where(coll, P + 0.75 * p_max, P)
    if acq.marker:
        P += _marker_mask(acq.marker, acq.marker_corner, H, W) * (0.9 * p_max)

    # Detector: Beer–Lambert, heel effect, focal-spot blur, quantum noise, log.
    yy, xx = ys / H - 0.5, xs / W - 0.5
    flat = acq.counts * (1.0 + acq.heel[0] * xx + acq.heel[1] * yy)
    counts = flat * np.exp(-P)
    counts = ndimage.gaussian_filter(counts, acq.blur)
    z = z_rng.standard_normal((H, W))
    # Gaussian approximation of Poisson noise (variance = mean): with a shared
    # noise field the intact twin of a fractured image differs only near the fracture.
    noisy = np.maximum(counts + np.sqrt(counts + 4.0) * z, 0.5)
    D = -np.log(noisy / flat)
    lo, hi = acq.window_lo * p_max, acq.window_hi * p_max
    img = np.clip((D - lo) / (hi - lo), 0.0, 1.0) ** acq.gamma
    if acq.unsharp_amount > 0:
        img = img + acq.unsharp_amount * (img - ndimage.gaussian_filter(img, acq.unsharp_sigma))
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    return PhantomRender(image=img, boxes=boxes, sites=sites)


def _box_from_points(pts: np.ndarray, margin: float, W: int, H: int) -> Box | None:
    x0 = max(0.0, float(pts[:, 0].min()) - margin)
    y0 = max(0.0, float(pts[:, 1].min()) - margin)
    x1 = min(float(W), float(pts[:, 0].max()) + margin)
    y1 = min(float(H), float(pts[:, 1].max()) + margin)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    xi, yi = math.floor(x0), math.floor(y0)
    return [xi, yi, math.ceil(x1) - xi, math.ceil(y1) - yi]


def _marker_mask(letter: str, corner: int, H: int, W: int) -> np.ndarray:
    """A lead letter marker in one corner (label-independent, as on real films)."""
    side = max(12, H // 12)
    tile = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(tile)
    try:
        font = ImageFont.load_default(size=int(side * 0.9))
    except TypeError:  # Pillow without FreeType: bitmap font
        font = ImageFont.load_default()
    draw.text((side * 0.15, 0), letter, fill=255, font=font)
    mask = np.zeros((H, W), np.float64)
    pad = max(4, H // 25)
    y0 = pad if corner in (0, 1) else H - side - pad
    x0 = pad if corner in (0, 2) else W - side - pad
    mask[y0:y0 + side, x0:x0 + side] = np.asarray(tile, np.float64) / 255.0
    return mask


def quantize(image: np.ndarray, stored_max: int) -> np.ndarray:
    """[0, 1] float → uint8 (``stored_max`` 255) or uint16 (12-bit or full-range detectors)."""
    dtype = np.uint8 if stored_max <= 255 else np.uint16
    return np.round(np.clip(image, 0.0, 1.0) * stored_max).astype(dtype)


def _streams(rng: np.random.Generator) -> _Streams:
    a, f, q, n = rng.spawn(4)
    return _Streams(a, f, q, n)


def render_phantom(
    rng: np.random.Generator,
    size: int,
    fracture_type: str | None,
    view: str,
    bit_depth: int,
    *,
    region: str | None = None,
    displace: bool = True,
    site_range: tuple[float, float] = (0.35, 0.65),
) -> tuple[np.ndarray, list[Box]]:
    """Render one radiograph-like image; returns (uint8/uint16 array (H, W), boxes [x, y, w, h]).

    ``rng`` is consumed the same way whatever ``fracture_type`` is, so two
    generators with the same state give the intact and the fractured version
    of the same image (see :func:`render_phantom_detail`).
    """
    det = render_phantom_detail(
        rng, size, fracture_type, view, bit_depth, region=region, displace=displace, site_range=site_range
    )
    return det[0], det[1].boxes


def render_phantom_detail(
    rng: np.random.Generator,
    size: int,
    fracture_type: str | None,
    view: str,
    bit_depth: int,
    *,
    region: str | None = None,
    displace: bool = True,
    site_range: tuple[float, float] = (0.35, 0.65),
) -> tuple[np.ndarray, PhantomRender]:
    """Like :func:`render_phantom` but also returns the float image and fracture sites."""
    if fracture_type is not None and fracture_type not in FRACTURE_TYPES_PHANTOM:
        allowed = ", ".join(FRACTURE_TYPES_PHANTOM)
        raise PhantomError(f"unknown fracture type {fracture_type!r}; allowed: {allowed}")
    st = _streams(rng)
    reg = region if region is not None else REGIONS[int(st.anatomy.integers(0, len(REGIONS)))]
    anatomy = sample_anatomy(st.anatomy, reg)
    fracture = sample_fracture(st.fracture, fracture_type) if fracture_type else None
    acq = sample_acquisition(st.acquisition, size, anatomy, bit_depth, site_range)
    rend = render_view(anatomy, fracture, acq, view, st.noise, displace=displace)
    return quantize(rend.image, acq.stored_max), rend


# ----------------------------------------------------------------- dataset
def _atomic_write_png(arr: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    atomic_write_bytes(path, buf.getvalue())


def _views(n: int) -> list[str]:
    base = ["frontal", "lateral", "oblique"]
    return [base[i % 3] for i in range(n)]


def generate_phantom_dataset(out_dir: Path, params: PhantomParams) -> pd.DataFrame:
    """Write the phantom dataset to ``out_dir`` (``images/`` + ``manifest.csv``) and return the manifest.

    Byte-identical for identical ``params``. The manifest is removed first and
    written last (atomically), so an interrupted run never looks complete;
    stale images of an earlier, different run are removed at the end.
    ``params.spatial_dims == 3`` writes NIfTI volumes instead
    (:func:`bonefrac.data.phantom3d.generate_volume_dataset`).
    """
    out_dir = Path(out_dir)
    if params.spatial_dims == 3:
        # One-way and lazy (nibabel only for volumes); phantom3d does not import this module.
        from bonefrac.data.phantom3d import generate_volume_dataset

        return generate_volume_dataset(out_dir, params)
    manifest = out_dir / "manifest.csv"
    manifest.unlink(missing_ok=True)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for st in study_plan(params):
        # One generator per study, seeded from (seed, study): studies are independent of each other.
        srng = np.random.default_rng([params.seed, 2, int(str(st["study_id"])[3:])])
        s_anat, s_frac, s_views = srng.spawn(3)
        anatomy = sample_anatomy(s_anat, str(st["region"]))
        kind = st["fracture_type"]
        fracture = sample_fracture(s_frac, str(kind), params.oblique_azimuth_deg) if kind else None
        views = _views(params.views_per_study)
        for view, vrng in zip(views, s_views.spawn(len(views)), strict=True):
            a_rng, n_rng = vrng.spawn(2)
            acq = sample_acquisition(a_rng, params.size, anatomy, int(st["bit_depth"]))
            rend = render_view(anatomy, fracture, acq, view, n_rng)
            arr = quantize(rend.image, acq.stored_max)
            image_id = f"{st['study_id']}-{view[:3]}"
            rel = f"images/{image_id}.png"
            _atomic_write_png(arr, out_dir / rel)
            rows.append({
                "image_id": image_id, "path": rel, "label": int(kind is not None),
                "fracture_type": kind or "", "body_part": st["region"], "view": view,
                "patient_id": st["patient_id"], "study_id": st["study_id"],
                "boxes": json.dumps(rend.boxes), "hardware": 0,
            })
    df = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    keep = {Path(r).name for r in df["path"]}
    for f in img_dir.glob("*.png"):
        if f.name not in keep:
            f.unlink()
    atomic_write_csv(df, manifest)
    return df

"""CT-like phantom volumes of a long bone with a fracture plane: the 3D default dataset.

Why: the CT/MRI path (NIfTI reading, 3D preprocessing, MONAI 3D networks)
needs volumes with known labels and boxes, made offline in seconds. A volume
holds a limb (soft tissue with a fat layer, skin, air around) and one or two
long bones (cortical shell in HU ~1000–1700 around fatty marrow, flared and
trabecular towards a joint end) whose axis runs roughly along the slices.
A fracture cuts the bone by a surface (plane, helicoid, two planes, a wedge)
with a gap scaled to the bone's radius, and moves the distal piece(s) rigidly.

Array order is (D, H, W) = (z, y, x) in memory; files follow the NIfTI
convention (data indexed x, y, z) with an affine giving the voxel spacing in
mm, so :func:`load_volume` transposes back. Boxes are ``[x, y, z, w, h, d]``
in voxels (x indexes W, y indexes H, z indexes D).
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from bonefrac.atomic import atomic_write_bytes, atomic_write_csv
from bonefrac.config import PhantomParams
from bonefrac.data.phantom_plan import study_plan
from bonefrac.data.schema import FRACTURE_TYPES_PHANTOM, RECORD_COLUMNS
from bonefrac.errors import BonefracError

Box3D = list[int]  # [x, y, z, w, h, d] in voxels

REGIONS_3D: tuple[str, ...] = ("forearm", "tibia", "femur")

# limb radius (mm), bones: (offset_x, offset_y, radius) in mm
_TEMPLATES: dict[str, tuple[float, list[tuple[float, float, float]]]] = {
    "forearm": (34.0, [(10.0, 0.0, 7.5), (-10.0, 3.0, 6.5)]),
    "tibia": (50.0, [(6.0, -6.0, 13.0), (-24.0, 6.0, 5.5)]),
    "femur": (72.0, [(0.0, 0.0, 15.0)]),
}


class Phantom3DError(BonefracError, ValueError):
    """Invalid 3D phantom request."""


@dataclass
class PhantomVolume:
    """One generated volume: HU array (D, H, W), affine (NIfTI, x/y/z order) and fracture boxes."""

    array: np.ndarray  # int16, (D, H, W)
    affine: np.ndarray  # 4x4
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    boxes: list[Box3D]
    body_part: str


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _rot2(angle: float) -> np.ndarray:
    """Rotation in the local frame (t, r1, r2) about an axis across the bone (angulation)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


Local = tuple[np.ndarray, np.ndarray, np.ndarray]  # (t, r1, r2): along the bone, across (two directions)


@dataclass(frozen=True)
class _Piece:
    """A rigid fragment in the bone's local frame: which intact points it holds and how it moved."""

    name: str  # "all", "prox", "dist", "mid", "wedge"
    rot: np.ndarray  # 3x3 in local (t, r1, r2) coordinates
    pivot: tuple[float, float, float]
    shift: tuple[float, float, float]

    def inverse(self, q: Local) -> Local:
        """Shown local coordinates -> intact local coordinates (each a (D, H, W) field)."""
        if not any(self.shift) and np.array_equal(self.rot, np.eye(3)):
            return q
        d = [q[i] - np.float32(self.pivot[i] + self.shift[i]) for i in range(3)]
        # intact = R^T d + pivot
        return tuple(  # type: ignore[return-value]
            sum(np.float32(self.rot[j, i]) * d[j] for j in range(3)) + np.float32(self.pivot[i])
            for i in range(3))


class _Fracture:
    """Fracture geometry of one bone in its local frame (site at t = 0)."""

    def __init__(self, rng: np.random.Generator, kind: str, R: float, displace: bool) -> None:
        self.kind, self.R = kind, R
        self.phi = rng.uniform(0, 2 * math.pi)  # the direction across the bone the fracture leans/opens to
        obl = {"transverse": rng.uniform(0, 12), "oblique": rng.uniform(30, 50)}.get(kind, rng.uniform(0, 20))
        self.obl = math.radians(obl)
        self.gap = R * rng.uniform(0.45, 0.75)
        # Always draw every number (displace only zeroes them) so both variants share the geometry.
        disp = rng.uniform(0.4, 1.0) * R * displace
        dphi = rng.uniform(0, 2 * math.pi)
        shift = (0.0, disp * math.cos(dphi), disp * math.sin(dphi))
        ang = math.radians(rng.uniform(3, 12)) * displace
        self.spiral_len = rng.uniform(2.0, 3.0) * R
        self.seg_len = rng.uniform(3.0, 5.0) * R
        self.wedge_len = rng.uniform(1.0, 1.6) * R
        self.crack_stop = rng.uniform(-0.5, -0.1)
        wedge_out = rng.uniform(0.4, 0.8) * R * displace
        wedge_rot = math.radians(rng.uniform(-20, 20)) * displace
        cp, sp = math.cos(self.phi), math.sin(self.phi)
        eye, o = np.eye(3), (0.0, 0.0, 0.0)
        # Angulation about the axis across the bone perpendicular to phi: rotate in the (t, side) plane.
        def bend(a: float) -> np.ndarray:
            S = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])  # local -> (t, side, other)
            return S @ _rot2(a) @ S.T
        if kind == "segmental":
            self.pieces = [_Piece("prox", eye, o, o), _Piece("mid", bend(ang), o, shift),
                           _Piece("dist", bend(-0.3 * ang), o, tuple(0.3 * v for v in shift))]
        elif kind == "greenstick":
            hinge = (0.0, -R * cp, -R * sp)
            self.pieces = [_Piece("prox", eye, o, o),
                           _Piece("dist", bend(max(ang, math.radians(5)) if displace else 0.0), hinge, o)]
        elif kind == "comminuted":
            self.pieces = [_Piece("prox", eye, o, o), _Piece("dist", bend(ang), o, shift),
                           _Piece("wedge", _rot2(0.0) if not displace else np.array(
                               [[1, 0, 0], [0, math.cos(wedge_rot), -math.sin(wedge_rot)],
                                [0, math.sin(wedge_rot), math.cos(wedge_rot)]]), o,
                               (0.0, wedge_out * cp, wedge_out * sp))]
        else:
            self.pieces = [_Piece("prox", eye, o, o), _Piece("dist", bend(ang), o, shift)]

    def across(self, q: Local) -> np.ndarray:
        """Position across the bone towards phi, in radii (-1..1 inside the bone)."""
        c, s = np.float32(math.cos(self.phi)), np.float32(math.sin(self.phi))
        return (q[1] * c + q[2] * s) / np.float32(self.R)

    def plane(self, q: Local, offset: float = 0.0) -> np.ndarray:
        """Signed distance (mm) to the fracture plane through the axis point ``offset`` past the site."""
        return (q[0] - np.float32(offset)) * np.float32(math.cos(self.obl)) + self.across(q) * np.float32(
            self.R * math.sin(self.obl))

    def main(self, q: Local) -> np.ndarray:
        if self.kind == "spiral":
            return q[0] - np.float32(self.spiral_len / math.pi) * np.arctan2(q[2], q[1])
        if self.kind == "segmental":
            return self.plane(q, -self.seg_len / 2)
        return self.plane(q)

    def wedge(self, q: Local, pad: float) -> np.ndarray:
        a = self.across(q)
        return (a > -0.2 + pad / self.R) & (np.abs(q[0]) < self.wedge_len * (a + 0.2) / 1.2 - pad)

    def in_gap(self, q: Local) -> np.ndarray:
        h = self.gap / 2
        if self.kind == "segmental":
            half_seg = self.seg_len / 2
            return (np.abs(self.plane(q, -half_seg)) < h) | (np.abs(self.plane(q, half_seg)) < h)
        f = np.abs(self.main(q))
        if self.kind == "greenstick":
            return f < h * np.clip((self.across(q) - self.crack_stop) / (1 - self.crack_stop), 0, 1)
        g = f < h
        if self.kind == "comminuted":
            g |= self.wedge(q, -h) & ~self.wedge(q, h)
        return g

    def member(self, name: str, q: Local) -> np.ndarray:
        """Intact points that belong to piece ``name`` (the gap belongs to none)."""
        gap = self.in_gap(q)
        if self.kind == "segmental":
            p1, p2 = self.plane(q, -self.seg_len / 2), self.plane(q, self.seg_len / 2)
            side = {"prox": p1 < 0, "mid": (p1 >= 0) & (p2 < 0), "dist": p2 >= 0}[name]
            return side & ~gap
        f = self.main(q)
        if self.kind == "comminuted":
            if name == "wedge":
                return self.wedge(q, self.gap / 2)
            return ((f < 0) if name == "prox" else (f >= 0)) & ~gap & ~self.wedge(q, -self.gap / 2)
        return ((f < 0) if name == "prox" else (f >= 0)) & ~gap

    def zones(self, q: Local, rho: np.ndarray) -> list[np.ndarray]:
        """Intact points of each broken zone (one per fracture site), to be boxed where they are shown."""
        within = rho < 1.1 * self.R
        h = self.gap / 2
        if self.kind == "segmental":
            offsets = (-self.seg_len / 2, self.seg_len / 2)
            return [within & (np.abs(self.plane(q, o)) < h + 0.5 * self.R) for o in offsets]
        z = within & (self.in_gap(q) | (np.abs(self.main(q)) < h + 0.3 * self.R))
        if self.kind == "comminuted":
            z |= within & self.wedge(q, -h)
        return [z]


def generate_volume(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (48, 96, 96),
    fracture_type: str | None = None,
    *,
    region: str | None = None,
    displace: bool = True,
) -> PhantomVolume:
    """Generate one CT-like volume (int16 HU, (D, H, W)); fractured when ``fracture_type`` is given.

    The random stream is split into anatomy / fracture / noise children, so the
    same generator state gives the same limb with or without the fracture.
    ``displace=False`` keeps the gap but leaves the pieces in place.
    """
    if fracture_type is not None and fracture_type not in FRACTURE_TYPES_PHANTOM:
        allowed = ", ".join(FRACTURE_TYPES_PHANTOM)
        raise Phantom3DError(f"unknown fracture type {fracture_type!r}; allowed: {allowed}")
    if len(shape) != 3 or min(shape) < 8:
        raise Phantom3DError(f"volume shape must be three sizes >= 8, got {shape!r}")
    ra, rf, rn = rng.spawn(3)
    reg = region if region is not None else REGIONS_3D[int(ra.integers(0, len(REGIONS_3D)))]
    if reg not in _TEMPLATES:
        raise Phantom3DError(f"unknown 3D body region {reg!r}; allowed: {', '.join(REGIONS_3D)}")
    D, H, W = (int(v) for v in shape)
    limb_r, bone_tpl = _TEMPLATES[reg]
    scale = ra.uniform(0.85, 1.15)
    limb_r *= scale
    sxy = 2.5 * limb_r / min(H, W) * ra.uniform(0.95, 1.1)
    sz = sxy * ra.uniform(1.2, 2.0)
    # Voxel centres in mm (origin at the volume centre), as broadcastable 1D axes:
    # every field below is a (D, H, W) float32 array built from them.
    Z = ((np.arange(D) - (D - 1) / 2) * sz).astype(np.float32)[:, None, None]
    Y = ((np.arange(H) - (H - 1) / 2) * sxy).astype(np.float32)[None, :, None]
    X = ((np.arange(W) - (W - 1) / 2) * sxy).astype(np.float32)[None, None, :]

    # Limb axis: along z, tilted a little; the limb and its bones share it.
    tilt = math.radians(ra.uniform(0, 12))
    tdir = ra.uniform(0, 2 * math.pi)
    axis = _unit(np.array([math.sin(tilt) * math.cos(tdir), math.sin(tilt) * math.sin(tdir), math.cos(tilt)]))
    e1 = _unit(np.cross(axis, [0.0, 1.0, 0.0]))
    e2 = np.cross(axis, e1)
    spin = ra.uniform(0, 2 * math.pi)
    e1, e2 = math.cos(spin) * e1 + math.sin(spin) * e2, -math.sin(spin) * e1 + math.cos(spin) * e2
    centre = np.array([ra.normal(0, 0.05), ra.normal(0, 0.05), 0.0]) * limb_r

    def local(c: np.ndarray, ys: slice = slice(None), xs: slice = slice(None)) -> Local:
        dx, dy, dz = X[..., xs] - np.float32(c[0]), Y[:, ys] - np.float32(c[1]), Z - np.float32(c[2])
        return tuple(dx * np.float32(v[0]) + dy * np.float32(v[1]) + dz * np.float32(v[2])  # type: ignore[return-value]
                     for v in (axis, e1, e2))

    tl, r1, r2 = local(centre)
    rho_l = np.sqrt(r1 * r1 + r2 * r2) / (1 + 0.06 * np.sin(tl / 40 + spin))
    soft_hu, fat_hu = ra.uniform(35, 60), ra.uniform(-110, -80)
    fat_frac = ra.uniform(0.82, 0.9)
    hu = np.full((D, H, W), -1000.0, np.float32)
    hu[rho_l < limb_r] = fat_hu
    hu[rho_l < fat_frac * limb_r] = soft_hu
    hu[(rho_l < limb_r) & (rho_l > limb_r - 1.2 * sxy)] = soft_hu + 20  # skin

    frac_bone = 0 if reg == "femur" else int(ra.random() < (0.3 if reg == "forearm" else 0.15))
    z_half = D * sz / 2
    site_t = ra.uniform(-0.3, 0.3) * z_half
    boxes: list[Box3D] = []
    bone_mask = np.zeros((D, H, W), bool)
    for bi, (ox, oy, r0) in enumerate(bone_tpl):
        R = r0 * scale * ra.uniform(0.9, 1.1)
        # The bone's local origin is its fracture site (t = 0 there).
        bc = centre + (ox * e1 + oy * e2) * scale + site_t * axis
        cort = ra.uniform(0.25, 0.4) * R
        cort_hu, marrow_hu = ra.uniform(1100, 1700), ra.uniform(-40, 60)
        # A joint end inside (or near) the field in half the volumes: flared, thin cortex, trabecular.
        end_t = None
        if ra.random() < 0.5:
            end_t = (1 if ra.random() < 0.5 else -1) * ra.uniform(0.7, 1.4) * z_half - site_t
        fr = None
        if fracture_type is not None and bi == frac_bone:
            fr = _Fracture(rf, fracture_type, R, displace)
        pieces = fr.pieces if fr else [_Piece("all", np.eye(3), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))]
        # Work on the columns the bone (and its moved pieces) can reach: a fraction of the volume.
        reach = 3.2 * R
        ends = [bc + axis * ((zz - bc[2]) / axis[2]) for zz in (-z_half, z_half)]
        ys, xs = (slice(max(int((min(e[i] for e in ends) - reach) / sxy + (n - 1) / 2), 0),
                        min(int((max(e[i] for e in ends) + reach) / sxy + (n - 1) / 2) + 2, n))
                  for i, n in ((1, H), (0, W)))
        q_shown = local(bc, ys, xs)
        sub = (slice(None), ys, xs)
        val = np.full(q_shown[0].shape, np.nan, np.float32)
        for pc in pieces:
            q = pc.inverse(q_shown)
            t = q[0]
            rho = np.sqrt(q[1] * q[1] + q[2] * q[2])
            if end_t is not None:
                dist_end = (np.float32(end_t) - t) * np.float32(np.sign(end_t))
                w_end = np.clip(1 - dist_end / np.float32(2.5 * R), 0, 1) ** 2
                cap = np.sqrt(np.clip(1 - (dist_end / np.float32(1.3 * R)) ** 2, 0, None))
                beyond = np.where(dist_end < 0, cap, np.float32(1.0))
            else:
                w_end, beyond = np.float32(0.0), np.float32(1.0)
            Rt = np.float32(R) * (1 + 0.4 * w_end) * beyond
            inside = rho < Rt
            if fr is not None:
                inside &= fr.member(pc.name, q)
            inner = np.maximum(Rt - np.float32(cort) * (1 - 0.75 * w_end), 0)
            v = np.where(rho < inner, marrow_hu + 250 * w_end, cort_hu * (1 - 0.4 * w_end))
            take = inside & np.isnan(val)
            val[take] = v[take] if np.ndim(v) else v
        hit = ~np.isnan(val)
        hu[sub][hit] = val[hit]
        bone_mask[sub] |= hit
        if fr is not None:
            # Box each broken zone where it is shown: its material seen through every piece's motion.
            shown_zones: list[np.ndarray] | None = None
            for pc in pieces:
                q = pc.inverse(q_shown)
                zs = fr.zones(q, np.sqrt(q[1] * q[1] + q[2] * q[2]))
                shown_zones = zs if shown_zones is None else [a | b for a, b in zip(shown_zones, zs, strict=True)]
            for zmask in shown_zones or []:
                full = np.zeros((D, H, W), bool)
                full[sub] = zmask
                boxes.extend(_zone_box(full))
    # Trabecular/marrow texture and soft-tissue mottle, then scanner blur and noise.
    # (One blur serves both: it smooths the white texture into grain and softens the edges.)
    tex = rn.standard_normal((D, H, W), dtype=np.float32)
    hu += np.where(bone_mask, np.float32(260.0), np.float32(35.0)) * tex
    hu = ndimage.gaussian_filter(hu, (0.7, 0.9, 0.9))
    hu += rn.standard_normal((D, H, W), dtype=np.float32) * np.float32(rn.uniform(8, 25))
    arr = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    affine = np.diag([sxy, sxy, sz, 1.0])
    affine[:3, 3] = [-(W - 1) / 2 * sxy, -(H - 1) / 2 * sxy, -(D - 1) / 2 * sz]
    return PhantomVolume(array=arr, affine=affine, spacing=(float(sz), float(sxy), float(sxy)), boxes=boxes,
                         body_part=reg)


def _zone_box(m: np.ndarray, margin: int = 2) -> list[Box3D]:
    """Bounding box [x, y, z, w, h, d] (voxels) of a (D, H, W) mask, grown by ``margin`` voxels."""
    D, H, W = m.shape
    if not m.any():
        return []
    zz, yy, xx = (np.nonzero(m.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
    x0, y0, z0 = max(int(xx[0]) - margin, 0), max(int(yy[0]) - margin, 0), max(int(zz[0]) - margin, 0)
    x1 = min(int(xx[-1]) + margin + 1, W)
    y1 = min(int(yy[-1]) + margin + 1, H)
    z1 = min(int(zz[-1]) + margin + 1, D)
    return [[x0, y0, z0, x1 - x0, y1 - y0, z1 - z0]]


def save_volume(vol: PhantomVolume, path: Path) -> None:
    """Write ``vol`` as NIfTI (int16, x/y/z order, mm units) atomically."""
    img = nib.Nifti1Image(np.ascontiguousarray(vol.array.transpose(2, 1, 0)), vol.affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(vol.affine, code=1)
    img.set_sform(vol.affine, code=1)
    # In memory and gzipped without a name or time stamp: gzip's header would otherwise
    # hold the temp file's name and the clock, and the same volume would differ in bytes.
    atomic_write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a phantom NIfTI back as ((D, H, W) array, affine)."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj).transpose(2, 1, 0), img.affine


def generate_volume_dataset(out_dir: Path, params: PhantomParams) -> pd.DataFrame:
    """Write one NIfTI volume per study under ``out_dir/images`` and ``manifest.csv`` (written last)."""
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    manifest.unlink(missing_ok=True)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for st in study_plan(params):
        srng = np.random.default_rng([params.seed, 3, int(str(st["study_id"])[3:])])
        region = str(st["region"]) if st["region"] in REGIONS_3D else "forearm"
        kind = st["fracture_type"]
        vol = generate_volume(srng, tuple(params.volume_shape), str(kind) if kind else None, region=region)
        image_id = f"{st['study_id']}-ct"
        rel = f"images/{image_id}.nii.gz"
        save_volume(vol, out_dir / rel)
        rows.append({
            "image_id": image_id, "path": rel, "label": int(kind is not None), "fracture_type": kind or "",
            "body_part": region, "view": "", "patient_id": st["patient_id"], "study_id": st["study_id"],
            "boxes": json.dumps(vol.boxes), "hardware": 0,
        })
    df = pd.DataFrame(rows, columns=RECORD_COLUMNS)
    keep = {Path(r).name for r in df["path"]}
    for f in img_dir.glob("*.nii.gz"):
        if f.name not in keep:
            f.unlink()
    atomic_write_csv(df, manifest)
    return df

"""Frozen-feature cache: run the frozen early stages once per image, store float16 memmaps.

Full fine-tuning of EfficientNet-Lite0 costs 77 ms/img at 192 px and 474 ms/img at
448 px on this project's CPU, so resolution is unaffordable if every epoch pays for
the high-resolution early stages. Those stages are generic (ImageNet edges and
textures): freeze them, run them once at high resolution, and train only the late
stages and a head on the stored maps (:mod:`bonefrac.model.dense`).

Layout of a cache folder::

    meta.json        image size, grid shapes, channels, trunk name, preprocess spec
    records.csv      one row per image: image_id, orig_h, orig_w, phash, decode_ms
    s16.f16          float16 memmap (2, N, 112, S/16, S/16): [0] the image, [1] its mirror
    s32.f16          float16 memmap (2, N, 192, S/32, S/32)
    done.npy         bool (2, N): which (view, image) pairs are filled (the build resumes)

The mirror view is the preprocessed square flipped left-right *before* the trunk, so
flip augmentation (and flip test-time augmentation) stays exact. What the cache gives up:
every augmentation that changes pixels before the trunk (rotation, scale/crop, intensity
and noise): only the two stored views exist.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bonefrac.data.imageio import ImageDecodeError, read_image
from bonefrac.data.metadata import perceptual_hash
from bonefrac.model.dense import S8_CHANNELS, S16_CHANNELS, S32_CHANNELS, FrozenTrunk
from bonefrac.model.transforms import PreprocessSpec
from bonefrac.npy_rows import NpyRows, read_rows

log = logging.getLogger(__name__)

VIEWS = ("orig", "flip")
#: decode_error prefix of images that could not be decoded at all (stored as zeros; exclude them).
UNDECODABLE = "undecodable"


@dataclass
class FeatureCache:
    """An opened cache: memmaps (read-only) and the per-image table."""

    root: Path
    meta: dict
    records: pd.DataFrame
    s16: np.memmap
    s32: np.memmap
    done: np.ndarray

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def batch(self, idx: Sequence[int], view: Sequence[int] | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 tensors (s16, s32) for images ``idx`` in views ``view`` (0 = orig, 1 = flip)."""
        idx = np.asarray(idx)
        v = np.broadcast_to(np.asarray(view), idx.shape)
        s16 = torch.from_numpy(np.stack([self.s16[a, b] for a, b in zip(v, idx, strict=True)]).astype(np.float32))
        s32 = torch.from_numpy(np.stack([self.s32[a, b] for a, b in zip(v, idx, strict=True)]).astype(np.float32))
        return s16, s32


def _shapes(n: int, image_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    g16, g32 = image_size // 16, image_size // 32
    return (2, n, S16_CHANNELS, g16, g16), (2, n, S32_CHANNELS, g32, g32)


def open_feature_cache(root: Path | str, mode: str = "r") -> FeatureCache:
    root = Path(root)
    meta = json.loads((root / "meta.json").read_text())
    records = pd.read_csv(
        root / "records.csv", dtype={"image_id": str, "phash": str, "decode_error": str}, keep_default_na=False
    )
    sh16, sh32 = _shapes(int(meta["n"]), int(meta["image_size"]))
    s16 = np.memmap(root / "s16.f16", dtype=np.float16, mode=mode, shape=sh16)
    s32 = np.memmap(root / "s32.f16", dtype=np.float16, mode=mode, shape=sh32)
    return FeatureCache(root, meta, records, s16, s32, np.load(root / "done.npy"))


def decode_for_cache(path: str, spec: PreprocessSpec) -> tuple[torch.Tensor, dict]:
    """One file → the preprocessed input tensor and what the cache records about it.

    A file refused only by a content check (e.g. "not a radiograph") is still decoded and its
    reason noted; an undecodable one gives zeros and ``decode_error`` starting with
    ``UNDECODABLE`` (the pipeline's validation drops those). Public so that a benchmark that
    caches another trunk tap decodes exactly as the cache did.
    """
    t0 = time.perf_counter()
    err = ""
    try:
        img = read_image(path, expected_dims=2, max_side_hint=spec.decode_side_hint)
    except ImageDecodeError as e:  # e.g. a content check: keep the image, note why
        err = str(e)[:200]
        try:
            img = read_image(path, expected_dims=2, content_limits=None, max_side_hint=spec.decode_side_hint)
        except ImageDecodeError as e2:  # truncated / corrupt: the pipeline's validation drops these
            info = {"decode_error": f"{UNDECODABLE}: {e2}"[:200], "orig_h": 0, "orig_w": 0, "phash": ""}
            info["decode_ms"] = (time.perf_counter() - t0) * 1000
            return torch.zeros(1, spec.image_size, spec.image_size), info
    # Reduced-scale JPEG decode (DCT domain, both sides still >= image_size): 3-5× faster; the stored
    # size is the header's, so boxes map exactly. The phash of the reduced image (phash looks at
    # a 32×32 DCT of a ~128 px copy anyway) stands in for the ingest stage's full-size phash.
    full = img.meta.get("full_size") or img.array.shape
    info = {
        "decode_error": err,
        "orig_h": int(full[0]),
        "orig_w": int(full[1]),
        "phash": perceptual_hash(img),
    }
    x = spec.apply(img.array)
    info["decode_ms"] = (time.perf_counter() - t0) * 1000
    return x, info


def build_feature_cache(
    paths: Sequence[str],
    image_ids: Sequence[str],
    root: Path | str,
    image_size: int = 384,
    order: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 16,
    pretrained: str = "efficientnet_lite_offline",
    progress: Callable[[str], None] = print,
    time_budget_s: float | None = None,
) -> FeatureCache:
    """Fill (or resume filling) the cache at ``root`` for ``paths``.

    ``order``: the (view, index) pairs to fill, in that order (default: every image's
    original view, then every mirror). Pairs already done are skipped, so an interrupted
    build resumes; ``time_budget_s`` stops cleanly after that long (the rest stays undone).
    Image sizes and perceptual hashes (the split's near-duplicate groups) are recorded
    when an image's original view is computed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = len(paths)
    spec = PreprocessSpec(image_size=image_size)
    meta = {
        "n": n,
        "image_size": image_size,
        "trunk": "efficientnet_lite0[stem..blocks.5] frozen, ImageNet (efficientnet_lite_offline)",
        "taps": {"s16": "blocks.4", "s32": "blocks.5"},
        "pretrained": pretrained,
        "views": list(VIEWS),
        "preprocess": spec.model_dump(),
    }
    sh16, sh32 = _shapes(n, image_size)
    fresh = not (root / "meta.json").exists()
    if not fresh:
        old = json.loads((root / "meta.json").read_text())
        if old["n"] != n or old["image_size"] != image_size:
            raise ValueError(f"{root} holds a cache for n={old['n']}, size={old['image_size']}; use another folder")
    else:
        for name, sh in (("s16.f16", sh16), ("s32.f16", sh32)):
            np.memmap(root / name, dtype=np.float16, mode="w+", shape=sh).flush()
        np.save(root / "done.npy", np.zeros((2, n), dtype=bool))
        pd.DataFrame(
            {
                "image_id": list(image_ids),
                "path": list(paths),
                "orig_h": 0,
                "orig_w": 0,
                "phash": "",
                "decode_ms": 0.0,
                "decode_error": "",
            }
        ).to_csv(root / "records.csv", index=False)
        (root / "meta.json").write_text(json.dumps(meta, indent=2))
    cache = open_feature_cache(root, mode="r+")
    done = cache.done
    records = cache.records
    if order is None:
        order = [(0, i) for i in range(n)] + [(1, i) for i in range(n)]
    todo = [(v, i) for v, i in order if not done[v, i]]
    progress(f"feature cache {root}: {int(done.sum())} done, {len(todo)} to do at {image_size} px")
    trunk = FrozenTrunk(pretrained).to(memory_format=torch.channels_last)
    t_start = time.perf_counter()
    net_s = 0.0
    for b0 in range(0, len(todo), batch_size):
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            progress(f"time budget reached; {len(todo) - b0} left undone (rerun to resume)")
            break
        chunk = todo[b0 : b0 + batch_size]
        xs = []
        for v, i in chunk:
            x, info = decode_for_cache(paths[i], spec)
            if v == 0:
                for k, val in info.items():
                    records.at[i, k] = val
            xs.append(torch.flip(x, dims=[-1]) if v == 1 else x)
        t0 = time.perf_counter()
        with torch.inference_mode():
            s16, s32 = trunk(torch.stack(xs).contiguous(memory_format=torch.channels_last))
        net_s += time.perf_counter() - t0
        for k, (v, i) in enumerate(chunk):
            cache.s16[v, i] = s16[k].numpy().astype(np.float16)
            cache.s32[v, i] = s32[k].numpy().astype(np.float16)
            done[v, i] = True
        cache.s16.flush()
        cache.s32.flush()
        np.save(root / "done.npy", done)
        if any(v == 0 for v, _ in chunk):
            records.to_csv(root / "records.csv", index=False)
        el = time.perf_counter() - t_start
        nd = b0 + len(chunk)
        if (b0 // batch_size) % 10 == 0 or nd == len(todo):
            progress(
                f"  {nd}/{len(todo)}  {el / 60:.1f} min  {el / nd * 1000:.0f} ms/img "
                f"(trunk {net_s / nd * 1000:.0f})  eta {(len(todo) - nd) * el / nd / 60:.1f} min"
            )
    records.to_csv(root / "records.csv", index=False)
    timing = json.loads((root / "meta.json").read_text())
    timing.setdefault("build_s", 0.0)
    timing["build_s"] += time.perf_counter() - t_start
    timing["bytes"] = sum((root / f).stat().st_size for f in ("s16.f16", "s32.f16"))
    (root / "meta.json").write_text(json.dumps(timing, indent=2))
    return open_feature_cache(root)


# ----------------------------------------------------------------- the pipeline's trunk cache
@dataclass
class TrunkFeatures:
    """The train stage's cache of frozen-trunk features for chosen rows of the preprocessed cache.

    ``s16[v, k]`` / ``s32[v, k]`` (/ ``s8[v, k]`` for a trunk with the stride-8 tap): view ``v``
    (0 = the image, 1 = its mirror) of ``rows[k]`` (a row of ``data/processed/images.npy``); the
    mirror view exists where ``mirrored[k]``.
    """

    root: Path
    rows: np.ndarray
    mirrored: np.ndarray
    s16: np.ndarray
    s32: np.ndarray
    s8: np.ndarray | None = None


#: The trunk outputs in the order a trunk function returns them (the stride-8 tap last, optional).
TRUNK_OUTPUTS = ("s16", "s32", "s8")


def trunk_cache_key(
    images_path: Path,
    rows: np.ndarray,
    mirror: np.ndarray,
    trunk: torch.nn.Module,
    dtype: str,
    shapes: Sequence[tuple[int, ...]] = (),
) -> str:
    """Content hash of everything the features depend on: the preprocessed pixels, the rows, the
    mirrored rows, the trunk's weights, the storage dtype and the stored outputs' shapes (a trunk
    with the stride-8 tap has the same weights but stores one more map). A changed input makes a new folder."""
    import hashlib

    h = hashlib.sha256()
    with open(images_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    h.update(np.asarray(rows, dtype=np.int64).tobytes())
    h.update(np.asarray(mirror, dtype=bool).tobytes())
    for name, t in sorted(trunk.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(dtype.encode())
    if len(shapes) > 2:  # two-output keys stay as they were (existing caches remain valid)
        h.update(repr([tuple(sh) for sh in shapes]).encode())
    return h.hexdigest()[:16]


def build_trunk_cache(
    images: np.ndarray,
    rows: Sequence[int],
    mirror: Sequence[bool],
    root: Path | str,
    trunk_fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    shapes: Sequence[tuple[int, ...]],
    dtype: str = "float16",
    batch_size: int = 16,
    progress: Callable[[str], None] = log.info,
) -> TrunkFeatures:
    """Run ``trunk_fn`` (frozen, eval mode) once per row of ``images`` (and once more on the
    left-right mirror where ``mirror``) into ``.npy`` memmaps under ``root``; resumes an interrupted build.

    ``shapes``: the per-image shapes of the outputs ``trunk_fn`` returns, in :data:`TRUNK_OUTPUTS`
    order (stride 16, stride 32, and optionally stride 8). Deterministic: the same pixels and
    weights give the same bytes, so the folder is a pure cache (keyed by :func:`trunk_cache_key`),
    rebuilt only when an input changes.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = np.asarray(rows, dtype=np.int64)
    mirrored = np.asarray(mirror, dtype=bool)
    n = len(rows)
    names = TRUNK_OUTPUTS[: len(shapes)]
    paths = {name: root / f"{name}.npy" for name in names}
    done_path = root / "done.npy"
    if done_path.exists() and not _intact(paths, [(2, n, *sh) for sh in shapes], np.dtype(dtype)):
        progress(f"trunk feature cache: {root.name} is damaged (a file missing, short or reshaped): rebuilding")
        done_path.unlink()
    if not done_path.exists():
        for p, sh in zip(paths.values(), shapes, strict=True):
            np.lib.format.open_memmap(p, mode="w+", dtype=np.dtype(dtype), shape=(2, n, *sh)).flush()
        np.save(root / "rows.npy", rows)
        np.save(root / "mirrored.npy", mirrored)
        np.save(done_path, np.zeros((2, n), dtype=bool))
    done = np.load(done_path)
    todo = [(0, k) for k in range(n) if not done[0, k]] + [(1, k) for k in range(n) if mirrored[k] and not done[1, k]]
    if todo:
        progress(f"trunk feature cache: {len(todo)} passes to run ({int(done.sum())} cached) -> {root}")
    # Positional writes and reads, not memory maps: mapped pages would count in the stage's peak RSS
    # (npy_rows). Opened only with work to do: a finished cache is only read (it may be read-only).
    outs_rows = {name: NpyRows(p, lead=2, writable=True) for name, p in paths.items()} if todo else {}
    t0 = time.perf_counter()
    for b0 in range(0, len(todo), batch_size):
        chunk = todo[b0 : b0 + batch_size]
        x = torch.from_numpy(read_rows(images, [int(rows[k]) for _, k in chunk]).astype(np.float32))
        flip = torch.tensor([v == 1 for v, _ in chunk])
        x[flip] = x[flip].flip(-1)
        with torch.inference_mode():
            outs = trunk_fn(x.contiguous(memory_format=torch.channels_last))
        for j, (v, k) in enumerate(chunk):
            for file_rows, out in zip(outs_rows.values(), outs, strict=True):
                file_rows.write((v, k), out[j].numpy())
            done[v, k] = True
        if (b0 // batch_size) % 20 == 19 or b0 + batch_size >= len(todo):
            for file_rows in outs_rows.values():
                file_rows.sync()
            np.save(done_path, done)
            el = time.perf_counter() - t0
            nd = min(b0 + batch_size, len(todo))
            progress(
                f"  trunk features {nd}/{len(todo)}: {el / 60:.1f} min, {el / nd * 1000:.0f} ms/pass, "
                f"eta {(len(todo) - nd) * el / nd / 60:.1f} min"
            )
    for file_rows in outs_rows.values():
        file_rows.sync()
        file_rows.close()
    if todo:
        np.save(done_path, done)
    loaded = {name: np.load(p, mmap_mode="r") for name, p in paths.items()}
    return TrunkFeatures(root, rows, mirrored, **loaded)


def _intact(paths: dict[str, Path], shapes: list[tuple[int, ...]], dtype: np.dtype) -> bool:
    """Every output file exists with the header and the length its shape promises (a disk that filled
    up or a copy cut short leaves a file whose rows ``done.npy`` would still vouch for)."""
    for path, shape in zip(paths.values(), shapes, strict=True):
        try:
            file_rows = NpyRows(path)
        except (OSError, ValueError):
            return False
        full = file_rows.offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ok = file_rows.shape == shape and file_rows.dtype == dtype and path.stat().st_size == full
        file_rows.close()
        if not ok:
            return False
    return True


def trunk_fn(net: torch.nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Pixels → (blocks.4, blocks.5[, blocks.2]) maps of a dense network, whatever the arch's split."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s16, s32, *s8 = net.trunk(x)
        if s32 is None:  # the head holds blocks.5: the cache stores its (pretrained) output
            s32 = net.head.blocks5(s16)
        return (s16, s32, *s8)

    return run


def trunk_output_shapes(net: torch.nn.Module, image_size: int) -> list[tuple[int, int, int]]:
    """Per-image shapes of what :func:`trunk_fn` returns at ``image_size`` (stride 16, 32[, 8])."""
    shapes = [(S16_CHANNELS, image_size // 16, image_size // 16), (S32_CHANNELS, image_size // 32, image_size // 32)]
    if getattr(net.trunk, "tap8", False):
        shapes.append((S8_CHANNELS, image_size // 8, image_size // 8))
    return shapes


def trunk_cache_plan(index: pd.DataFrame, flip: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The index rows whose trunk features the train stage stores, in cache order, and which of them
    also get the mirror view: the training split (mirrored when ``train.dense.flip`` is ``exact``), then
    the validation split (never mirrored). One definition for the cache's rows and for the labels and
    boxes the head trains on beside them, and for the evaluate stage finding the same folder."""
    from bonefrac.training.data import split_rows

    tr, va = split_rows(index, "train"), split_rows(index, "val")
    return pd.concat([tr, va]), np.array([flip == "exact"] * len(tr) + [False] * len(va), dtype=bool)


def plan_rows(plan: pd.DataFrame) -> np.ndarray:
    """The preprocessed-cache rows of a :func:`trunk_cache_plan` frame."""
    from bonefrac.preprocess.cache import CACHE_ROW

    return plan[CACHE_ROW].to_numpy(dtype=np.int64)


def frozen_modules(net: torch.nn.Module) -> torch.nn.Module:
    """The modules whose weights the cached features depend on (the key's): the trunk, and a
    head's ``blocks.5`` where the arch moves it out of the trunk."""
    blocks5 = getattr(net.head, "blocks5", None)
    return torch.nn.ModuleList([net.trunk] + ([blocks5] if blocks5 is not None else []))


def trained_trunk_features(
    net: torch.nn.Module,
    record: dict | None,
    images: np.ndarray,
    images_path: Path,
    index: pd.DataFrame,
    features_dir: Path,
    progress: Callable[[str], None] = log.info,
) -> TrunkFeatures | None:
    """The train stage's trunk features for a trained dense ``net``, or ``None`` where there are none to share.

    ``record``: the bundle's ``trunk_cache`` metadata (key, flip, dtype), written by the train
    stage. ``None`` is returned for a bundle trained without a trunk cache, and for one whose
    frozen weights no longer give the recorded key (an arch that trains its ``blocks.5``: the
    cached maps are not its own). A deleted or partial folder is rebuilt by the same
    deterministic function, so the evaluate stage's numbers do not depend on what the machine
    kept.
    """
    if not record:
        return None
    plan, mirror = trunk_cache_plan(index, str(record["flip"]))
    rows = plan_rows(plan)
    shapes = trunk_output_shapes(net, int(images.shape[-1]))
    dtype = str(record["dtype"])
    key = trunk_cache_key(images_path, rows, mirror, frozen_modules(net), dtype, shapes)
    if key != record["key"]:
        return None
    root = Path(features_dir) / key
    return build_trunk_cache(images, rows, mirror, root, trunk_fn(net), shapes, dtype, progress=progress)

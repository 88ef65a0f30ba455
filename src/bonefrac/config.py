"""The one typed configuration object, built from ``params.yaml``.

Every stage reads ``params.yaml`` through :func:`load_params`, so a typo or an
out-of-range value stops the run at start with the key's dotted name and what
is allowed, instead of failing an hour into training. Library functions never
read this object globally: flows pass the relevant sections explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bonefrac.errors import BonefracError

Severity = Literal["critical", "quarantine", "warn", "off"]


class Strict(BaseModel):
    """Base: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------- paths
class Paths(Strict):
    """Where each stage writes; relative paths are resolved against the project root."""

    raw: str = "data/raw"
    interim: str = "data/interim"
    processed: str = "data/processed"
    # The train stage's own cache of frozen-trunk features (dense archs), keyed by a content hash.
    features: str = "data/features"
    models: str = "models"
    reports: str = "reports"
    metrics: str = "metrics"
    predictions_log: str = "data/predictions"
    # Per-file ingest cache (bonefrac.data.ingest_cache): deliberately no DVC output (DVC would
    # delete it before each ingest run and hash it into the stage); safe to delete.
    cache: str = "data/cache"


# ---------------------------------------------------------------------- data
class PhantomParams(Strict):
    """The embedded default dataset (``bonefrac.data.phantom``)."""

    n_patients: int = Field(60, ge=2)
    studies_per_patient: int = Field(1, ge=1)
    views_per_study: int = Field(2, ge=1)
    fracture_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    size: int = Field(256, ge=64, le=2048)
    bit_depths: list[Literal[8, 16]] = [8, 16]
    spatial_dims: Literal[2, 3] = 2
    volume_shape: tuple[int, int, int] = (48, 96, 96)
    seed: int = 7
    # Azimuth range (degrees from the frontal plane) of an *oblique* fracture's plane. null keeps
    # the default data set's ±34.4° (±0.6 rad), with which the lateral view sees the plane nearly
    # edge-on (41 % of lateral oblique views project under 12°, i.e. look transverse). [25, 65]
    # keeps the plane visibly oblique (≥ 13.7°) in both the frontal and the lateral view
    # (benchmarks/phantom_oblique_projection.py); the other types are unchanged.
    oblique_azimuth_deg: tuple[float, float] | None = None

    @field_validator("oblique_azimuth_deg")
    @classmethod
    def _azimuth_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (-90.0 <= v[0] <= v[1] <= 90.0):
            raise ValueError(f"oblique_azimuth_deg must be [lo, hi] with -90 <= lo <= hi <= 90, got {list(v)}")
        return v


class DataParams(Strict):
    """Which source to ingest and where it lives."""

    source: Literal["phantom", "imagefolder", "csv", "fracatlas", "dicom", "volume"] = "phantom"
    root: str = "data/raw/phantom"
    manifest_csv: str | None = None
    phantom: PhantomParams = PhantomParams()
    # Fracture-type labels are used when the source has them (phantom, CSV).
    use_fracture_types: bool = True
    # The declared fracture-type vocabulary (null: bonefrac.data.schema.KNOWN_FRACTURE_TYPES). A
    # sub-folder of the positive class or a fracture_type value outside it refuses the image at intake.
    fracture_types: list[str] | None = None
    # The declared body-part vocabulary (null: bonefrac.data.schema.KNOWN_BODY_PARTS). A body_part
    # column value or DICOM BodyPartExamined term outside it refuses the image at intake.
    body_parts: list[str] | None = None
    # DICOM flagged BurnedInAnnotation=YES is refused at intake unless this is true.
    allow_burned_in_annotation: bool = False
    # Optional filters, e.g. train on hands only and validate externally on legs.
    include_body_parts: list[str] | None = None
    exclude_body_parts: list[str] | None = None
    ingest_workers: int = Field(2, ge=1, description="processes that decode images at ingest")


# ---------------------------------------------------------------- validation
class ValidationSeverities(Strict):
    """Severity of each check: critical stops the run, quarantine moves the images aside."""

    required_columns: Severity = "critical"
    unreadable: Severity = "quarantine"
    exact_duplicates: Severity = "quarantine"
    near_duplicate_label_conflict: Severity = "quarantine"
    label_values: Severity = "critical"
    fracture_type_values: Severity = "quarantine"
    body_part_values: Severity = "quarantine"
    size_range: Severity = "quarantine"
    bit_depth: Severity = "quarantine"
    intensity_range: Severity = "quarantine"
    class_balance: Severity = "critical"


class ValidationParams(Strict):
    severities: ValidationSeverities = ValidationSeverities()
    min_side: int = Field(64, ge=1)
    max_side: int = Field(8192, ge=1)
    allowed_bit_depths: list[int] = [8, 12, 16]
    min_intensity_std: float = Field(0.01, ge=0.0, description="on [0,1]-scaled intensities; below is blank")
    min_positive_fraction: float = Field(0.02, ge=0.0, le=1.0)
    max_positive_fraction: float = Field(0.98, ge=0.0, le=1.0)
    near_duplicate_max_distance: int = Field(4, ge=0, le=64)
    near_duplicate_max_intensity_diff: float = Field(
        0.005, ge=0.0, le=1.0,
        description="same picture: |Δmean| and |Δstd| of [0,1] intensities at most this, besides the phash distance",
    )
    # null: data.body_parts, else the project's vocabulary (bonefrac.data.schema.KNOWN_BODY_PARTS),
    # and "unknown"; a list narrows it.
    allowed_body_parts: list[str] | None = None
    # null: data.fracture_types, else the project's vocabulary (bonefrac.data.schema.KNOWN_FRACTURE_TYPES).
    allowed_fracture_types: list[str] | None = None


# ------------------------------------------------------------------ splits
class SplitParams(Strict):
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    seed: int = 42
    # Also stratify fractured images by fracture type (a type head scored on every type, issue 14).
    stratify_fracture_type: bool = False


# --------------------------------------------------------------- preprocess
class PreprocessParams(Strict):
    """The deterministic, cacheable part of preprocessing (shared with inference)."""

    image_size: int = Field(128, ge=32, le=1024)
    volume_size: tuple[int, int, int] = (32, 64, 64)
    lower_percentile: float = Field(0.5, ge=0.0, lt=50.0)
    upper_percentile: float = Field(99.5, gt=50.0, le=100.0)


# -------------------------------------------------------------------- model
class ModelParams(Strict):
    arch: Literal[
        "custom_cnn", "vgg16", "resnet18", "resnet50", "densenet121", "efficientnet_lite0",
        "monai_densenet3d", "monai_resnet3d", "mip_efficientnet3d",
        "efficientnet_lite0_dense", "efficientnet_lite0_dense_b5", "efficientnet_lite0_dense_x3",
        "efficientnet_lite0_dense_tta",
        "efficientnet_lite0_dense_s8_tta", "efficientnet_lite0_dense_tta_stitch",
    ] = "efficientnet_lite0"
    # none | imagenet (torchvision's mechanism) | efficientnet_lite_offline | path to a checkpoint
    pretrained: str = "efficientnet_lite_offline"
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    multitask: bool = True


class AugmentParams(Strict):
    """The random part of preprocessing (MONAI transforms), applied on training only."""

    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    rotate_range_deg: float = Field(15.0, ge=0.0, le=180.0)
    zoom_range: tuple[float, float] = (0.9, 1.1)
    affine_prob: float = Field(0.5, ge=0.0, le=1.0)
    contrast_gamma: tuple[float, float] = (0.8, 1.25)
    contrast_prob: float = Field(0.3, ge=0.0, le=1.0)
    noise_std: float = Field(0.02, ge=0.0)
    noise_prob: float = Field(0.2, ge=0.0, le=1.0)


class FinetuneParams(Strict):
    strategy: Literal["full", "frozen", "discriminative", "gradual"] = "discriminative"
    backbone_lr_mult: float = Field(0.1, gt=0.0, le=1.0)
    unfreeze_every: int = Field(1, ge=1, description="gradual: epochs between unfreezing blocks")


class ImbalanceParams(Strict):
    sampler: Literal["none", "weighted"] = "none"
    loss: Literal["bce", "weighted_bce", "focal"] = "weighted_bce"
    focal_gamma: float = Field(2.0, ge=0.0)


class DenseTrainParams(Strict):
    """The dense archs (``efficientnet_lite0_dense*``): a box-supervised head trained on cached trunk features.

    The frozen trunk runs once per image (and once per mirrored training image) into a
    feature cache the train stage owns; epochs then cost seconds. ``train.augment`` does
    not apply (pixel-level augmentation would need the trunk every epoch): the left-right
    mirror is the only augmentation.
    """

    box_weight: float = Field(1.0, ge=0.0, description="weight of the dense box loss beside the image loss")
    box_grow_cells: float = Field(0.5, ge=0.0, le=4.0, description="boxes grown by this many map cells per side")
    box_profile: Literal["area", "centre", "outline"] = Field(
        "area",
        description="dense target inside a box: flat (area share), peaked at the box centre (Gaussian), or the "
        "share of each cell the fracture's outline covers where the box carries one (area elsewhere)",
    )
    focal_gamma: float = Field(0.0, ge=0.0, description="focal modulation of the dense loss (0: plain BCE)")
    peak_weight: float = Field(
        0.0, ge=0.0,
        description="weight of the peak loss (the map's softmax over cells against the target) inside the dense loss",
    )
    # exact: the mirrored image through the trunk (cached; costs a second trunk pass per training image);
    # features: mirror the cached feature maps (approximate, free); none: no flip augmentation.
    flip: Literal["exact", "features", "none"] = "exact"
    train_late_blocks: bool = Field(
        False, description="train the head's pretrained Lite0 blocks (blocks.6, and blocks.5 for *_b5) too"
    )
    feature_dtype: Literal["float16", "float32"] = "float16"
    keep_epoch: Literal["best_val_auroc", "last"] = Field(
        "best_val_auroc",
        description="the weights kept: the epoch of best validation AUROC, or the last epoch of the cosine schedule",
    )


class DistributedParams(Strict):
    """DDP from the same ``train`` stage: ``nproc_per_node > 1`` launches ``torch.distributed.run``.

    NCCL when CUDA is visible (one process per GPU), gloo on CPU; ``train.batch_size``
    stays the global batch, so a run matches single-process training on the same data.
    """

    nproc_per_node: int = Field(1, ge=1, description="processes on this machine; 1 = no DDP")


class TrainParams(Strict):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    early_stopping_patience: int = Field(4, ge=1)
    # Which validation number picks the best epoch (and drives early stopping). val_auroc: the
    # fracture AUROC alone. val_auroc_type_f1: the mean of it and the fracture-type macro-F1
    # (multi-task runs with types; otherwise the same as val_auroc): the type head keeps learning
    # after the fracture AUROC has levelled off, and an AUROC-picked epoch throws that away.
    monitor: Literal["val_auroc", "val_auroc_type_f1"] = "val_auroc"
    type_loss_weight: float = Field(0.5, ge=0.0)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    num_workers: int = Field(0, ge=0)
    deterministic: bool = True
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = all cores")
    finetune: FinetuneParams = FinetuneParams()
    distributed: DistributedParams = DistributedParams()
    imbalance: ImbalanceParams = ImbalanceParams()
    augment: AugmentParams = AugmentParams()
    dense: DenseTrainParams = DenseTrainParams()


# ---------------------------------------------------------------- evaluate
class OperatingPointParams(Strict):
    high_sensitivity_target: float = Field(0.95, gt=0.0, le=1.0)
    high_specificity_target: float = Field(0.95, gt=0.0, le=1.0)


class EvaluateParams(Strict):
    bootstrap_samples: int = Field(1000, ge=10)
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)
    ece_bins: int = Field(10, ge=2)
    operating_points: OperatingPointParams = OperatingPointParams()
    gradcam_gallery: int = Field(6, ge=0, description="images per gallery row (TP, FP, FN)")
    gradcam_layer: str | None = None
    # platt: slope + intercept (undoes the class-weight shift); temperature: slope only.
    calibration: Literal["identity", "temperature", "platt"] = "platt"


# --------------------------------------------------------------- operations
class PromotionParams(Strict):
    auroc_margin: float = Field(0.02, ge=0.0, le=0.5, description="non-inferiority margin")
    min_sensitivity: float = Field(0.90, ge=0.0, le=1.0)
    # Absolute floor for every promotion, the first one included (an empty store has nothing to be
    # non-inferior to): the one-sided (1 - alpha) lower bound of the challenger's test AUROC must
    # exceed it, so a chance-level model that calls everything positive never becomes champion.
    min_auroc_lower: float = Field(0.70, ge=0.0, le=1.0)
    bootstrap_samples: int = Field(1000, ge=10)
    alpha: float = Field(0.05, gt=0.0, lt=0.5)


class DriftParams(Strict):
    stattest_threshold: float = Field(0.05, gt=0.0, lt=1.0)
    drift_share: float = Field(0.25, gt=0.0, le=1.0, description="share of drifted features for a dataset verdict")
    embedding_dims: int = Field(4, ge=1, le=32)
    trigger_retrain: bool = False


class ServingParams(Strict):
    model_name: str = "bonefrac"
    max_batch_size: int = Field(16, ge=1)
    max_latency_ms: int = Field(10000, ge=1)
    max_upload_mb: float = Field(32.0, gt=0.0)
    max_pixels: int = Field(60_000_000, ge=1)
    backend: Literal["auto", "torch", "onnx"] = "auto"
    # Front-end processes (decode, preprocess, calibrate); the model runs in its own process.
    workers: int = Field(1, ge=1, le=64)
    onnx_cache_dir: str | None = None
    # A secret: never written in params.yaml; set BONEFRAC_API_KEY.
    api_key: str | None = Field(None, repr=False)
    # Without a key the service refuses to start unless this is on (a laptop, tests, `make serve`).
    insecure_local: bool = False
    # Decode budget per upload, checked from the header before decoding: the working memory of
    # decoding + preprocessing (pixels x (stored bytes + float32 copies)). Colour/16-bit bombs stop here.
    max_decoded_mb: float = Field(1024.0, gt=0.0)
    # Uploads decoded at once per front-end process; 0 = one per core.
    decode_slots: int = Field(0, ge=0, le=256)
    # On SIGTERM the model worker keeps answering until the front ends have exited (at most
    # drain_max_s; idle this long where it cannot see them), so accepted requests still complete.
    drain_idle_s: float = Field(2.0, ge=0.0)
    drain_max_s: float = Field(20.0, ge=0.0)
    debug: bool = False  # DEBUG logging of bonefrac.serving  # below circus' 30-s stop timeout
    # The model worker checks the registry's champion pointer this often and swaps to a newly
    # promoted or rolled-back champion without a restart; 0 = never (a model pinned by file never follows).
    registry_poll_s: float = Field(2.0, ge=0.0)
    # Resources the Bento declares: "on" = one GPU for the model worker (build it with
    # bentofile.gpu.yaml, a CUDA base image); "off" = CPU only; "auto" = whatever this machine has.
    gpu: Literal["auto", "on", "off"] = "auto"
    # Only for models of preprocessing version 1 (newer models define their decode scale
    # themselves, the same in training, `bonefrac predict` and here): large JPEGs decoded at
    # reduced DCT scale (libjpeg 1/2..1/8; ~4.6x faster decode on radiographs). Off by default:
    # version 1 takes the percentile window on the decoded image, so a probability can differ
    # from `bonefrac predict` and evaluation (measured: median |dp| 0.006, max 0.37,
    # benchmarks.draft_decode); on only where speed matters more than parity.
    reduced_jpeg_decode: bool = False

    @field_validator("max_batch_size")
    @classmethod
    def _batchable(cls, v: int) -> int:
        return max(2, v)  # BentoML requires max_batch_size > 1


#: Every environment override the project honours: variable -> (section, key). Ops retune a
#: container (no params.yaml inside) without rebuilding it; nothing else reads BONEFRAC_* settings.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "BONEFRAC_MODEL_NAME": ("serving", "model_name"),
    "BONEFRAC_MAX_BATCH_SIZE": ("serving", "max_batch_size"),
    "BONEFRAC_MAX_LATENCY_MS": ("serving", "max_latency_ms"),
    "BONEFRAC_MAX_UPLOAD_MB": ("serving", "max_upload_mb"),
    "BONEFRAC_MAX_PIXELS": ("serving", "max_pixels"),
    "BONEFRAC_BACKEND": ("serving", "backend"),
    "BONEFRAC_WORKERS": ("serving", "workers"),
    "BONEFRAC_PREDICTION_LOG_DIR": ("paths", "predictions_log"),
    "BONEFRAC_ONNX_CACHE": ("serving", "onnx_cache_dir"),
    "BONEFRAC_API_KEY": ("serving", "api_key"),
    "BONEFRAC_INSECURE_LOCAL": ("serving", "insecure_local"),
    "BONEFRAC_MAX_DECODED_MB": ("serving", "max_decoded_mb"),
    "BONEFRAC_DECODE_SLOTS": ("serving", "decode_slots"),
    "BONEFRAC_DRAIN_IDLE_S": ("serving", "drain_idle_s"),
    "BONEFRAC_DRAIN_MAX_S": ("serving", "drain_max_s"),
    "BONEFRAC_SERVICE_DEBUG": ("serving", "debug"),
    "BONEFRAC_REGISTRY_POLL_S": ("serving", "registry_poll_s"),
    "BONEFRAC_GPU": ("serving", "gpu"),
    "BONEFRAC_REDUCED_JPEG_DECODE": ("serving", "reduced_jpeg_decode"),
}


# -------------------------------------------------------------------- root
class Params(Strict):
    """The whole of ``params.yaml``."""

    seed: int = 42
    paths: Paths = Paths()
    data: DataParams = DataParams()
    validation: ValidationParams = ValidationParams()
    split: SplitParams = SplitParams()
    preprocess: PreprocessParams = PreprocessParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    promotion: PromotionParams = PromotionParams()
    drift: DriftParams = DriftParams()
    serving: ServingParams = ServingParams()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.split.val_fraction + self.split.test_fraction >= 0.9:
            raise ValueError("split.val_fraction + split.test_fraction must leave data to train on (< 0.9)")
        if self.validation.min_positive_fraction > self.validation.max_positive_fraction:
            raise ValueError("validation.min_positive_fraction must be <= validation.max_positive_fraction")
        return self

    @property
    def spatial_dims(self) -> int:
        """2 for radiographs, 3 for CT/MRI volumes; follows the data source."""
        if self.data.source == "volume" or (self.data.source == "phantom" and self.data.phantom.spatial_dims == 3):
            return 3
        return 2


class ConfigError(BonefracError, ValueError):
    """A params file that cannot be used; the message names the key and what is allowed."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see params.yaml for the allowed keys)"
        got = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {key}: {msg}{shown}")
    return "\n".join(lines)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a mapping; raise :class:`ConfigError` naming every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Nested overrides from the ``BONEFRAC_*`` variables of :data:`ENV_OVERRIDES` that are set."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        value = env.get(var, "").strip()
        if value:
            out.setdefault(section, {})[key] = value.lower() if key == "backend" else value
    return out


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Params:
    """Params for a long-running process (service, worker): ``params.yaml`` if present, then the environment.

    A container has no ``params.yaml`` (defaults apply); a broken one is an error
    naming the key, never silently replaced by defaults. ``BONEFRAC_PARAMS`` names
    another file.
    """
    env = os.environ if environ is None else environ
    file = Path(path or env.get("BONEFRAC_PARAMS") or "params.yaml")
    raw: dict[str, Any] = {}
    if file.exists():
        raw = _read_yaml(file)
    return params_from_dict(_deep_merge(raw, env_overrides(env)), f"{file} + environment")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load ``params.yaml`` (plus optional nested overrides) into :class:`Params`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    return params_from_dict(_deep_merge(_read_yaml(path), overrides or {}), str(path))


def project_root() -> Path:
    """The folder holding ``params.yaml`` (walks up from the working directory)."""
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "params.yaml").exists():
            return p
    return here


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """Resolve a params path against the project root (absolute paths pass through)."""
    p = Path(path)
    return p if p.is_absolute() else (root or project_root()) / p


def project_relative(path: str | Path, root: Path | None = None) -> str:
    """``path`` as a POSIX path relative to the project root: what tables and reports store.

    Outputs that DVC tracks must not depend on where the project is checked out, so
    they never hold absolute paths; readers turn them back with :func:`resolve`.
    A relative path passes through; ``""`` stays ``""``; a path outside the project
    becomes ``../…``; only a path on another drive (Windows) stays absolute.
    """
    if path == "" or path is None:
        return ""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return Path(os.path.relpath(p, root or project_root())).as_posix()
    except ValueError:  # no relative path between drives
        return p.as_posix()

"""The core of every run's schema: the sections every training method shares (data, crops, model, optim, train,
tracking, eval). A method adds one section of its own, named after it and declared beside its recipe
(`sslpipe.recipes`); `run_schema` joins the two. Every section forbids unknown keys, so a typo (`optim.lrr`) fails
with the closest valid spelling instead of training with a default.
"""
from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _scale_range(value: tuple[float, float]) -> tuple[float, float]:
    """A crop's area range: RandomResizedCrop (and the fast views) fail deep inside the loader on anything else."""
    if not 0 < value[0] <= value[1] <= 1:
        raise ValueError(f"must be (low, high) with 0 < low <= high <= 1, got {list(value)}")
    return value


def _sigma_range(value: tuple[float, float]) -> tuple[float, float]:
    if not 0 <= value[0] <= value[1]:
        raise ValueError(f"must be (low, high) with 0 <= low <= high, got {list(value)}")
    return value


def _betas(value: tuple[float, float]) -> tuple[float, float]:
    """Adam's decay rates; torch's own refusal does not name the key."""
    if not all(0 <= b < 1 for b in value):
        raise ValueError(f"must both be in [0, 1), got {list(value)}")
    return value


def _positive_each(value: tuple[float, ...]) -> tuple[float, ...]:
    if not all(v > 0 for v in value):
        raise ValueError(f"must all be > 0, got {list(value)}")
    return value


ScaleRange = Annotated[tuple[float, float], AfterValidator(_scale_range)]


def _takes_bool(annotation: Any) -> bool:
    """Whether a field annotated `annotation` may hold a boolean (bool itself, Any, or a union with either)."""
    if annotation is bool or annotation is Any:
        return True
    return any(_takes_bool(arg) for arg in get_args(annotation) if arg is not type(None))


class Section(BaseModel):
    """A block of a recipe: typed, validated on assignment, unknown keys refused. A boolean where a number is
    expected (YAML reads `yes`, `on`, `true` as booleans: `data.batch_size=yes` would be 1), an empty text (an
    unset shell variable: `model.init_from=$EXPORT`) and an infinite or NaN number are refused, never read."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers_nor_empty_text(cls, value: Any, info: ValidationInfo) -> Any:
        """A run's own saved config (`SAVED_READ`) is read as it trained: an empty text as unset (what it meant),
        the other two as the numbers they were read as."""
        saved = SAVED_READ.get() is not None
        if isinstance(value, str) and not value.strip():
            if saved:
                return None
            raise ValueError("is empty: give a value, or null to leave it unset (an unset shell variable?)")
        field = cls.model_fields.get(info.field_name or "")
        if saved:
            return value
        if isinstance(value, bool) and field is not None and not _takes_bool(field.annotation):
            raise ValueError(f"{str(value).lower()} is a boolean where a number is expected (YAML reads yes/no/on/off "
                             "as booleans)")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        return value

    def check_run(self, run: "RunConfig") -> None:
        """A method's section: refuse what it cannot check alone (core keys its settings leave unread); raise
        ValueError with a message that names the keys."""

    def refuse_unread_values(self, prefix: str, unread: dict[str, str]) -> None:
        """Keys that are read only with other settings (`unread`: key -> the setting that leaves it unread): a
        non-default value is refused, never ignored; the default is let through, as every saved config holds it.
        While a run's own saved config is read (`SAVED_READ`), such a value is put back to the default and listed
        instead: the run was made, and the key changed nothing in it."""
        for key, why in unread.items():
            if self.unread_value_stays(key, f"{prefix}.{key}", why):
                raise ValueError(f"key '{prefix}.{key}' = {getattr(self, key)!r} is not read with {why}: remove it "
                                 f"(or change {why.split('=')[0]})")

    def unread_value_stays(self, key: str, dotted: str, why: str) -> bool:
        """Whether `key` (the section's; `dotted` names it, a `*` segment for any one) holds a value its settings
        leave unread (`why`) that must be refused: a non-default value, unless a run's own saved config is read
        (`SAVED_READ`) and no override set it, in which case it is put back to the default and listed."""
        value = getattr(self, key)
        default = type(self).model_fields[key].get_default(call_default_factory=True)
        saved = SAVED_READ.get()
        if value == default:
            return False
        if saved is None or saved.overrides(dotted):
            return True
        self.__dict__[key] = default  # not through validate_assignment: the section is being validated
        saved.dropped.append(f"{dotted.removeprefix('*.')} = {value!r} (not read with {why})")
        return False


@dataclass
class SavedRead:
    """What reading a run's saved config (`sslpipe.config.loading.reading_saved`) dropped, and the dotted keys the
    command line set (those are refused as ever)."""

    overridden: frozenset[str]
    dropped: list[str] = dataclass_field(default_factory=list)

    def overrides(self, dotted: str) -> bool:
        """Whether the command line set the key `dotted` or a section above it (`'crops={...}'`); a `*` segment
        stands for any one (`*.qscore.eps`: the Q-score section of whichever method holds it)."""
        key = dotted.split(".")
        return any(len(given) <= len(key) and all(k in ("*", g) for k, g in zip(key, given))
                   for given in (item.split(".") for item in self.overridden))


SAVED_READ: ContextVar[SavedRead | None] = ContextVar("sslpipe_saved_read", default=None)


class DataConfig(Section):
    train: str
    train_split: str = "train"
    val: str | None = None
    val_split: str = "val"
    batch_size: int = Field(64, gt=0)
    num_workers: int = Field(8, ge=0)
    shuffle_buffer: int = Field(5000, ge=0)
    resampled: bool = False
    steps_per_epoch: int | None = Field(None, gt=0)
    on_error: Literal["warn", "raise"] = "warn"
    # remote (http/https) shards, sslpipe/data/remote.py: tries after the first, the first wait (doubled each try,
    # at most 30 s), seconds without a byte before a read fails; the run stops when a process's loader has lost more
    # than max_skipped_shards shards (null: never); verify_sha256 reads each shard whole and checks it first
    retries: int = Field(3, ge=0)
    retry_backoff: float = Field(1.0, ge=0)
    read_timeout: float = Field(60.0, gt=0)
    max_skipped_shards: int | None = Field(None, ge=0)
    verify_sha256: bool = False

    @model_validator(mode="after")
    def _resampled_needs_steps(self) -> "DataConfig":
        if self.resampled and self.steps_per_epoch is None:
            raise ValueError("data.resampled=true streams forever: set data.steps_per_epoch")
        if self.on_error == "raise":
            self.refuse_unread_values("data", {"max_skipped_shards": "data.on_error=raise"})
        return self


class CropsConfig(Section):
    """Views of an image: the multi-crop of the teacher-student methods (published iBOT values by default), the
    size and normalisation every method uses."""

    global_size: int = Field(224, gt=0)
    local_size: int = Field(96, gt=0)
    n_global: int = Field(2, ge=1)
    n_local: int = Field(10, ge=0)
    global_scale: ScaleRange = (0.25, 1.0)
    local_scale: ScaleRange = (0.05, 0.25)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: Annotated[tuple[float, float, float], AfterValidator(_positive_each)] = IMAGENET_STD
    # Gaussian blur sigma range in output-crop pixels (published)
    blur_sigma: Annotated[tuple[float, float], AfterValidator(_sigma_range)] = (0.1, 2.0)
    # true: blur_sigma is the published range for 224-px global / 96-px local crops, scaled to this recipe's sizes
    # (x global_size / 224 and x local_size / 96), so small CPU crops get the same relative blur
    blur_scale_with_size: bool = False
    # fast: the same augmentations on uint8 arrays (OpenCV + torch kernels), uint8 crops normalised on the device
    # (sslpipe.data.fast_views); device: workers only decode and draw the parameters, the batch is cropped and
    # coloured on the accelerator (sslpipe.data.device_views); torchvision: the reference pipeline, float crops
    backend: Literal["fast", "device", "torchvision"] = "fast"

    @model_validator(mode="after")
    def _local_keys_need_local_crops(self) -> "CropsConfig":
        if self.n_local == 0:
            self.refuse_unread_values("crops", dict.fromkeys(("local_size", "local_scale"), "crops.n_local=0"))
        return self

    def blur_sigmas(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(global, local) Gaussian blur sigma ranges in pixels of the output crops."""
        if not self.blur_scale_with_size:
            return tuple(self.blur_sigma), tuple(self.blur_sigma)
        g, loc = self.global_size / 224, self.local_size / 96
        return tuple(s * g for s in self.blur_sigma), tuple(s * loc for s in self.blur_sigma)


# timm arguments sslpipe sets itself when it builds a backbone (`sslpipe.models.backbones.create_backbone`): in
# model.kwargs they would collide with its own (a TypeError) or be overwritten without a word; what to set instead
SSLPIPE_SETS = {
    "img_size": "the image size is the recipe's crop size: set crops.global_size (a fine-tuning recipe: its "
                "section's img_size)",
    "patch_size": "set model.patch_size",
    "drop_path_rate": "set model.drop_path_rate",
    "num_classes": "backbones are built without a classifier (num_classes=0); a fine-tuning recipe's classes are its "
                   "section's num_classes",
    "pretrained": "sslpipe downloads no weights: start from an export with model.init_from (`sslpipe import` "
                  "converts a published checkpoint)",
    "dynamic_img_size": "sslpipe builds every ViT with dynamic_img_size=true (crops of several sizes)",
}


class ModelConfig(Section):
    arch: str = "vit_small_patch16_224"
    patch_size: int | None = Field(16, gt=0)
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    # BatchNorm backbones (CNNs) on several CUDA processes: SyncBatchNorm in student and teacher, as DINO's
    # main_dino.py does. gloo (CPU) has no SyncBatchNorm: there the backbone keeps per-process statistics.
    sync_batchnorm: bool = True
    # further timm arguments of the architecture (depth, embed_dim, reg_tokens, ...); not those in SSLPIPE_SETS
    kwargs: dict[str, Any] = {}
    # an export folder (`sslpipe export` / `sslpipe import`): its architecture and weights start the network
    init_from: str | None = None

    @model_validator(mode="after")
    def _kwargs_sslpipe_sets(self) -> "ModelConfig":
        """Refuse a key of `SSLPIPE_SETS` in `kwargs`, naming the key to set instead. A run's own saved config
        (`SAVED_READ`) that holds one (only `dynamic_img_size` could train: it was overwritten) drops it and lists
        it, as it changed nothing in the run."""
        saved = SAVED_READ.get()
        for key in [k for k in self.kwargs if k in SSLPIPE_SETS]:
            if saved is None or saved.overrides(f"model.kwargs.{key}"):
                raise ValueError(f"key 'model.kwargs.{key}' is set by sslpipe itself: {SSLPIPE_SETS[key]}, and remove "
                                 f"{key} from model.kwargs")
            saved.dropped.append(f"model.kwargs.{key} = {self.kwargs[key]!r} (sslpipe sets it)")
            # not through validate_assignment: the section is being validated
            self.__dict__["kwargs"] = {k: v for k, v in self.kwargs.items() if k != key}
        return self


class OptimConfig(Section):
    """With `lr_scaling: linear` (DINO/iBOT) `lr` is per 256 images: the applied rate is
    lr * batch_size * world_size * grad_accum_steps / 256; with `sqrt_wrt_1024` (DINOv2's `optim.scaling_rule`,
    dinov2/utils/config.py) `lr` is the rate for a global batch of 1024, applied as lr * sqrt(global batch / 1024);
    with `none` it is applied as given (fine-tuning recipes quote the published absolute rate at the published batch).

    `schedule`: `cosine` (DINO/iBOT: to `min_lr`), `step` (x `step_gamma` at each of `step_epochs`; ViTDet),
    `poly` ((1 - t)^`poly_power` to `min_lr`; Mask2Former, U2PL) or `constant`; all after a linear warm-up from 0 over
    `warmup_iters` iterations when set, else `warmup_epochs`. Parameter groups may carry `lr_scale` (layer decay,
    backbone multiplier): a group's rate is the scheduled rate times its `lr_scale`. Weight decay follows a cosine
    from `weight_decay` to `weight_decay_end` (equal values: constant).
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(5e-4, gt=0)
    lr_scaling: Literal["linear", "sqrt_wrt_1024", "none"] = "linear"
    min_lr: float = Field(1e-6, ge=0)
    schedule: Literal["cosine", "step", "poly", "constant"] = "cosine"
    warmup_epochs: float = Field(10, ge=0)
    warmup_iters: int | None = Field(None, ge=0)
    step_epochs: list[Annotated[float, Field(ge=0)]] = []
    step_gamma: float = Field(0.1, gt=0)
    poly_power: float = Field(0.9, gt=0)
    sgd_momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    clip_grad: float = Field(3.0, ge=0)
    clip_mode: Literal["per_tensor", "global", "none"] = "per_tensor"
    betas: Annotated[tuple[float, float], AfterValidator(_betas)] = (0.9, 0.999)

    @model_validator(mode="after")
    def _refuse_unread(self) -> "OptimConfig":
        reads = {"step": ("step_epochs", "step_gamma"), "poly": ("poly_power", "min_lr"), "cosine": ("min_lr",)}
        read = reads.get(self.schedule, ())
        skipped = [k for k in ("step_epochs", "step_gamma", "poly_power", "min_lr") if k not in read]
        unread = dict.fromkeys(skipped, f"optim.schedule={self.schedule}")
        unread["betas" if self.name == "sgd" else "sgd_momentum"] = f"optim.name={self.name}"
        if self.warmup_iters is not None:
            unread["warmup_epochs"] = f"optim.warmup_iters={self.warmup_iters}"
        self.refuse_unread_values("optim", unread)
        # either key can say "no clipping" (recipes write both); a clip value with mode none, or a mode with value
        # 0, is not read
        if self.clip_mode == "none" and self.clip_grad not in (0, type(self).model_fields["clip_grad"].default):
            raise ValueError(f"key 'optim.clip_grad' = {self.clip_grad} is not read with optim.clip_mode=none: remove "
                             "it (or set optim.clip_mode)")
        if self.clip_grad == 0 and self.clip_mode == "global":
            raise ValueError("key 'optim.clip_mode' = 'global' is not read with optim.clip_grad=0 (no clipping): "
                             "set optim.clip_mode=none (or a clip_grad > 0)")
        return self


class TrainConfig(Section):
    """Schedules always span `epochs * steps_per_epoch` optimizer steps; `max_steps` only stops the run early."""

    epochs: int = Field(800, gt=0)
    max_steps: int | None = Field(None, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML reads an unquoted `no` (`train.mixed_precision=no`) as false: that means "no" here."""
        return "no" if value is False else value

    # Deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace, cuDNN flags): on a GPU, resume is
    # then bit-exact; without it a resumed GPU run matches the uninterrupted one only to float rounding (docs).
    deterministic: bool = False
    # torch.compile, off by default (measure with bench step). compile_scope blocks: each transformer block (a CNN
    # backbone as a whole) of student and teacher on its own, which compiles fast and recompiles only per crop size;
    # step: DINOv2's / DINOv3's teacher and student forwards and loss as one graph, which needs the same shapes in
    # every batch (dinov2.pad_masked_patches) and compiles once
    compile: bool = False
    compile_backend: str = "inductor"
    compile_scope: Literal["blocks", "step"] = "blocks"
    # a file whose appearance asks the run to checkpoint and stop at the next log step (SIGUSR1 does the same);
    # launch/slurm.sbatch sets it for requeue before the time limit
    stop_file: str | None = None
    grad_accum_steps: int = Field(1, gt=0)
    log_every: int = Field(10, gt=0)
    health_every: int = Field(50, ge=0)
    checkpoint_every_steps: int | None = Field(None, ge=0)
    checkpoint_every_epochs: int = Field(1, ge=0)
    keep_last: int = Field(2, ge=0)
    best_metric: str | None = None  # a metric from recipe.evaluate (higher is better) whose best checkpoint is kept

    @model_validator(mode="after")
    def _scope_needs_compile(self) -> "TrainConfig":
        if self.compile_scope == "step" and not self.compile:
            raise ValueError("train.compile_scope=step chooses what train.compile compiles: set train.compile=true")
        if not self.compile:
            self.refuse_unread_values("train", {"compile_backend": "train.compile=false"})
        return self


class TrackingConfig(Section):
    log_with: list[Literal["wandb", "tensorboard"]] = []
    wandb_project: str = "sslpipe"
    wandb_mode: Literal["online", "offline", "disabled"] | None = None

    @model_validator(mode="after")
    def _wandb_keys_need_wandb(self) -> "TrackingConfig":
        if "wandb" not in self.log_with:
            self.refuse_unread_values("tracking", dict.fromkeys(
                ("wandb_project", "wandb_mode"), f"tracking.log_with={list(self.log_with)}"))
        return self


class EvalConfig(Section):
    """The periodic evaluation of a run: a weighted kNN of the backbone for the self-supervised methods, mIoU or
    mask AP on the val split for the dense ones, every `every_epochs` epochs (0: never). The same keys drive
    `sslpipe eval-seg`."""

    every_epochs: int = Field(0, ge=0)
    batch_size: int | None = Field(None, gt=0)  # null: data.batch_size for kNN, 8 images for the dense evaluations
    max_val: int | None = Field(None, gt=0)  # the first N val samples (kNN) or images (dense); null: all
    # short side before evaluation: kNN null = crops.global_size * 256 / 224 (DINO); dense null = native size
    resize: int | None = Field(None, gt=0)
    # kNN (DINO's eval_knn.py protocol)
    crop: int | None = Field(None, gt=0)  # centre crop; null: crops.global_size
    knn_k: list[int] = [10, 20, 100, 200]
    knn_temperature: float = Field(0.07, gt=0)
    max_train: int | None = Field(None, gt=0)  # the first N train samples; null: all
    # dense: the whole image, or sliding windows (BEiT / ViT-Adapter / U2PL) of `window` px at a stride of
    # `stride_rate` x window; null mode: the method's own (Mask2Former slide, U2PL whole)
    mode: Literal["whole", "slide"] | None = None
    window: int | None = Field(None, gt=0)  # null: the training crop
    stride_rate: float = Field(2 / 3, gt=0, le=1)
    predict_images: int = Field(6, ge=0)  # fine-tuning: images in the predictions PNG written at each evaluation

    @field_validator("knn_k")
    @classmethod
    def _positive_ks(cls, value: list[int]) -> list[int]:
        """The probe refuses these only after the first epoch's training, and no checkpoint is kept then."""
        if not value or min(value) < 1:
            raise ValueError(f"must hold one or more k >= 1, got {value}")
        return value


class RunConfig(Section):
    """The core schema; `run_schema` adds the method's own section. `unread` (per schema): the dotted core keys
    the method does not read, each with why; they are refused in a recipe and left out of the saved config.
    `evaluates_val` (per schema): the method's evaluation reads data.val, so `eval.every_epochs` needs it."""

    unread: ClassVar[dict[str, str]] = {}
    evaluates_val: ClassVar[bool] = False

    method: str
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    data: DataConfig
    crops: CropsConfig = Field(default_factory=CropsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _method_section_checks(self) -> "RunConfig":
        for name in type(self).model_fields.keys() - RunConfig.model_fields.keys():
            getattr(self, name).check_run(self)
        return self

    @model_validator(mode="after")
    def _knn_crop_fits_the_resize(self) -> "RunConfig":
        """The periodic kNN's centre crop must fit its resize (`sslpipe.eval.spec.FeatureSpec` refuses it at the
        first evaluation, an epoch in): a larger crop would pad the image with black."""
        if "eval.crop" in type(self).unread:
            return self
        size = self.crops.global_size
        crop, short = self.eval.crop or size, self.eval.resize or round(size * 256 / 224)
        if crop > short:
            raise ValueError(f"eval.crop={crop} is larger than eval.resize={short} (null: crops.global_size x "
                             "256/224): the kNN's images would be padded with black; set eval.resize to the crop or "
                             "more, or a smaller eval.crop")
        return self

    @model_validator(mode="after")
    def _evaluation_is_used(self) -> "RunConfig":
        """Without an evaluation the best checkpoint is never kept, and without data.val the evaluation finds
        nothing: both ran silently before. An explicit eval.every_epochs=0 switches a recipe's evaluation (and so
        its best_metric) off for a run, knowingly; only a best_metric with no evaluation ever set is refused."""
        every, best = self.eval.every_epochs, self.train.best_metric
        if best is not None and every == 0 and "every_epochs" not in self.eval.model_fields_set:
            raise ValueError(f"train.best_metric={best} is never computed: eval.every_epochs is not set (0: no "
                             "evaluation); set eval.every_epochs, or train.best_metric=null")
        if every > 0 and not self.data.val and type(self).evaluates_val:
            raise ValueError(f"eval.every_epochs={every} evaluates on data.val, which is not set: set data.val to "
                             "the validation shards, or eval.every_epochs=0")
        return self

    @model_validator(mode="after")
    def _crops_fit_patches(self) -> "RunConfig":
        """A ViT's patches must tile each crop (eval.crop too: the periodic kNN's); timm's assertion otherwise fails
        at the first step (the first evaluation, an epoch in) and names no key. With model.patch_size null (the
        architecture's own) the method's section checks it (`check_crops_fit_patch` with the network's patch size),
        as the schema alone does not know it."""
        if self.model.patch_size is not None:
            check_crops_fit_patch(self, self.model.patch_size)
        return self

    @model_validator(mode="after")
    def _local_crops_are_smaller(self) -> "RunConfig":
        """Local crops larger than the global ones are a recipe mistake (e.g. `crops.n_local=4` on a 28-px recipe
        that leaves local_size at its published 96): refused, except in a run's own saved config, which trained so."""
        crops, unread, saved = self.crops, type(self).unread, SAVED_READ.get()
        keys = ("crops.n_local", "crops.local_size", "crops.global_size")
        if crops.n_local == 0 or crops.local_size <= crops.global_size or any(key in unread for key in keys):
            return self
        if saved is not None and not any(saved.overrides(key) for key in keys):
            return self
        raise ValueError(f"crops.local_size={crops.local_size} is larger than crops.global_size={crops.global_size} "
                         f"with crops.n_local={crops.n_local}: local crops are the small views (published 96 beside "
                         "224); set crops.local_size below the global size, or crops.n_local=0")


def check_crops_fit_patch(run: RunConfig, patch: int, what: str | None = None) -> None:
    """Raise ValueError naming the key when crops.global_size, (with local crops) crops.local_size or (with a
    periodic kNN) eval.crop is not a multiple of `patch`; `what` says where the patch size comes from (None:
    model.patch_size). Skipped for the keys the method does not read and with model.kwargs.dynamic_img_pad (timm pads
    the image). eval.crop is read only when the run evaluates, and a run's own saved config keeps the value it was
    made with unless the command line sets it (its kNN fails at the evaluation, which then says so)."""
    if run.model.kwargs.get("dynamic_img_pad"):
        return
    crops, unread = run.crops, type(run).unread
    sizes = {f"crops.{key}": getattr(crops, key) for key in ("global_size", "local_size")
             if f"crops.{key}" not in unread and not (key == "local_size" and crops.n_local == 0)}
    saved = SAVED_READ.get()
    if (run.eval.crop is not None and run.eval.every_epochs > 0 and "eval.crop" not in unread
            and (saved is None or saved.overrides("eval.crop"))):
        sizes["eval.crop"] = run.eval.crop
    for key, size in sizes.items():
        if size % patch == 0:
            continue
        source, hint = ((f"model.patch_size={patch}", "(or model.patch_size=null for a CNN)") if what is None
                        else (f"{patch}, {what}", "(or set model.patch_size)"))
        raise ValueError(f"{key}={size} is not a multiple of {source}: use {patch_multiples(size, patch)} {hint}")


def patch_multiples(size: int, patch: int) -> str:
    """The multiples of `patch` nearest to `size`, below and above ("28 or 32"; "16" when below is 0): what an
    error about a size the patches do not tile proposes."""
    return " or ".join(str(s) for s in (size // patch * patch, (size // patch + 1) * patch) if s)


CORE_SECTIONS = ("data", "crops", "model", "optim", "train", "tracking", "eval")


def run_schema(key: str | None, section: type[Section] | None, unread: dict[str, str] | None = None,
               evaluates_val: bool = False) -> type[RunConfig]:
    """The schema of one method's runs: the core plus `key: section` (none for a method without settings), with
    the core keys it does not read and whether its evaluation reads data.val."""
    if key in RunConfig.model_fields:
        raise ValueError(f"a method section cannot be named {key!r}: that is a core section")
    fields = {key: (section, Field(default_factory=section))} if key and section else {}
    schema = create_model(f"{section.__name__ if section else 'Core'}Run", __base__=RunConfig, **fields)
    schema.unread = dict(unread or {})
    schema.evaluates_val = evaluates_val
    return schema

"""The typed recipe schema, YAML loading and `key.sub=value` overrides.

Defaults are the published iBOT ViT-S/16 values (shared/SPEC.md §1). Every section forbids unknown keys so that a
typo (`optim.lrr`) fails loudly with the closest valid spelling instead of silently training with a default.
"""
from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A recipe YAML or an override that cannot be turned into a valid `Config`; the message says what to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train: str
    train_split: str = "train"
    val: str | None = None
    val_split: str = "val"
    batch_size: int = 64
    num_workers: int = 8
    shuffle_buffer: int = 5000
    resampled: bool = False
    steps_per_epoch: int | None = None
    on_error: Literal["warn", "raise"] = "warn"

    @model_validator(mode="after")
    def _resampled_needs_steps(self) -> "DataConfig":
        if self.resampled and self.steps_per_epoch is None:
            raise ValueError("data.resampled=true streams forever: set data.steps_per_epoch")
        return self


class CropsConfig(_Section):
    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian blur sigma range in output-crop pixels (published)
    # true: blur_sigma is the published range for 224-px global / 96-px local crops, scaled to this recipe's sizes
    # (x global_size / 224 and x local_size / 96), so small CPU crops get the same relative blur
    blur_scale_with_size: bool = False
    # fast: the same augmentations on uint8 arrays (OpenCV + torch kernels), uint8 crops normalised on the device
    # (sslpipe.data.fast_views); device: workers only decode and draw the parameters, the batch is cropped and
    # coloured on the accelerator (sslpipe.data.device_views); torchvision: the reference pipeline, float crops
    backend: Literal["fast", "device", "torchvision"] = "fast"

    def blur_sigmas(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(global, local) Gaussian blur sigma ranges in pixels of the output crops."""
        if not self.blur_scale_with_size:
            return tuple(self.blur_sigma), tuple(self.blur_sigma)
        g, loc = self.global_size / 224, self.local_size / 96
        return tuple(s * g for s in self.blur_sigma), tuple(s * loc for s in self.blur_sigma)


class MaskingConfig(_Section):
    pred_ratio: float | list[float] = [0.0, 0.3]
    pred_ratio_var: float | list[float] = [0.0, 0.2]
    pred_shape: Literal["block", "rand"] = "block"
    pred_start_epoch: int = 0
    min_num_patches: int | None = None  # None: the official (min(H, W) // 3) ** 2, i.e. 16 on a 14x14 grid
    min_aspect: float = 0.3


class ModelConfig(_Section):
    arch: str = "vit_small_patch16_224"
    patch_size: int | None = 16
    drop_path_rate: float = 0.1
    # BatchNorm backbones (CNNs) on several CUDA processes: SyncBatchNorm in student and teacher, as DINO's
    # main_dino.py does. gloo (CPU) has no SyncBatchNorm: there the backbone keeps per-process statistics.
    sync_batchnorm: bool = True
    kwargs: dict[str, Any] = {}
    init_from: str | None = None  # an sslpipe export folder whose weights initialise the backbone (fine-tuning)


class HeadConfig(_Section):
    out_dim: int = 8192
    patch_out_dim: int = 8192
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    norm_last_layer: bool = False
    shared_head: bool = True
    shared_head_teacher: bool = True


class LossConfig(_Section):
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30
    center_momentum: float = 0.9
    center_momentum2: float = 0.9
    lambda1: float = 1.0
    lambda2: float = 1.0


class OptimConfig(_Section):
    """With `lr_scaling: linear` (DINO/iBOT) `lr` is per 256 images: the applied rate is
    lr * batch_size * world_size * grad_accum_steps / 256; with `sqrt_wrt_1024` (DINOv2's `optim.scaling_rule`,
    dinov2/utils/config.py) `lr` is the rate for a global batch of 1024, applied as lr * sqrt(global batch / 1024);
    with `none` it is applied as given (fine-tuning recipes quote the published absolute rate at the published batch).

    `schedule`: `cosine` (DINO/iBOT: to `min_lr`), `step` (x `step_gamma` at each of `step_epochs`; ViTDet),
    `poly` ((1 - t)^`poly_power` to `min_lr`; Mask2Former, U2PL) or `constant`; all after a linear warm-up from 0 over
    `warmup_iters` iterations when set, else `warmup_epochs`. Parameter groups may carry `lr_scale` (layer decay,
    backbone multiplier): a group's rate is the scheduled rate times its `lr_scale`.
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-4
    lr_scaling: Literal["linear", "sqrt_wrt_1024", "none"] = "linear"
    min_lr: float = 1e-6
    schedule: Literal["cosine", "step", "poly", "constant"] = "cosine"
    warmup_epochs: float = 10
    warmup_iters: int | None = None
    step_epochs: list[float] = []
    step_gamma: float = 0.1
    poly_power: float = 0.9
    sgd_momentum: float = 0.9
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    clip_mode: Literal["per_tensor", "global", "none"] = "per_tensor"
    freeze_last_layer_epochs: float = 1
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)


class TrainConfig(_Section):
    """Schedules always span `epochs * steps_per_epoch` optimizer steps; `max_steps` only stops the run early."""

    epochs: int = 800
    max_steps: int | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML reads an unquoted `no` (`train.mixed_precision=no`) as false: that means "no" here."""
        return "no" if value is False else value

    # Deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace, cuDNN flags): on a GPU, resume is
    # then bit-exact; without it a resumed GPU run matches the uninterrupted one only to float rounding (docs).
    deterministic: bool = False
    # regional torch.compile: each transformer block (a CNN backbone as a whole) of student and teacher is compiled
    # on its own, which compiles fast and recompiles only per crop size; off by default (measure with bench step)
    compile: bool = False
    compile_backend: str = "inductor"
    # a file whose appearance asks the run to checkpoint and stop at the next log step (SIGUSR1 does the same);
    # launch/slurm.sbatch sets it for requeue before the time limit
    stop_file: str | None = None
    grad_accum_steps: int = 1
    log_every: int = 10
    health_every: int = 50
    checkpoint_every_steps: int | None = None
    checkpoint_every_epochs: int = 1
    keep_last: int = 2
    best_metric: str | None = None  # a metric from recipe.evaluate (higher is better) whose best checkpoint is kept


class TrackingConfig(_Section):
    log_with: list[Literal["wandb", "tensorboard"]] = []
    wandb_project: str = "sslpipe"
    wandb_mode: Literal["online", "offline", "disabled"] | None = None


class EvalConfig(_Section):
    knn_every_epochs: int = 0
    knn_k: list[int] = [10, 20, 100, 200]
    knn_temperature: float = 0.07
    knn_max_train: int | None = None
    knn_max_val: int | None = None
    resize: int | None = None  # eval resize of the short side; None: global_size * 256 / 224 (DINO)
    crop: int | None = None  # eval centre crop; None: global_size


class QScoreConfig(_Section):
    """The Q-score regulariser (sslpipe/losses/qscore.py, SPEC.md §4, docs/qscore.md), off unless `enabled`.

    `reduction: balanced` (default): L_SSL + lambda1 * mean_{i: Q_i < alpha} (alpha - Q_i) / mean|Q| + lambda2 *
    mean_{k: c_k > beta} (c_k - beta) / mean c, both terms dimensionless (issue 19: with sums the sample term
    vanished next to the column term). `reduction: sum`: the published form, L_SSL - lambda1 * sum_{i: Q_i < alpha}
    Q_i + lambda2 * sum_{k: c_k > beta} c_k, with lambda1 = lambda2 = 1e-4 (second-hand). c_k = ||H_{*,k}||_1 over the
    batch features H (both views stacked); alpha / beta null = the batch means of Q_i / of the c_k.
    """

    enabled: bool = False
    version: Literal["v1", "v2"] = "v2"
    reduction: Literal["balanced", "sum"] = "balanced"
    lambda1: float = 0.1  # balanced terms (ours, untuned); the published sums use 1e-4 (second-hand)
    lambda2: float = 0.1  # balanced terms (ours, untuned); the published sums use 1e-4 (second-hand)
    alpha: float | None = None  # None: the batch mean of Q_i
    beta: float | None = None  # None: the batch mean of the column L1 norms
    eta: float = 1e-3  # soft-sparsity threshold (metrics only; the paper's value was not found)
    eps: float = 4.0  # v2: highly activating = h_ij > mu_i + eps * sigma_i
    percentiles: tuple[float, float] = (50.0, 95.0)  # v2: band of the non-zero activation rates = discriminative
    v2_coverage: float | None = 0.5  # v2: eps lowered from `eps` per batch until this share of rows has L_i ∩ D
    standardize: bool = True  # v2: Q in units of the row's std, (h_ij - mu_i) / sigma_i (ours: scale-free)
    l2_normalize: bool = True  # v1: Q on h / ||h||_2 (the third-party implementation's choice)
    features: Literal["backbone", "projection"] = "backbone"  # which output of the network H is


class SimCLRConfig(_Section):
    """SimCLR (sslpipe/recipes/simclr.py): NT-Xent temperature, projection head and two-view augmentation (lightly's
    SimCLRTransform at crops.global_size, normalised with crops.mean/std, blur sigma crops.blur_sigma)."""

    temperature: float = 0.5  # lightly's NTXentLoss default (SimCLR paper CIFAR-10); solo-learn IN-100 uses 0.2
    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128  # SimCLR paper
    proj_layers: int = 2  # SimCLR v1: Linear-(BN)-ReLU-Linear
    proj_batch_norm: bool = True  # lightly's SimCLRProjectionHead default; solo-learn's projector has none
    min_scale: float = 0.08  # RandomResizedCrop scale (0.08, 1)
    cj_prob: float = 0.8
    cj_strength: float = 1.0  # colour jitter (0.8, 0.8, 0.8, 0.2) x strength
    gray_p: float = 0.2
    blur_p: float = 0.5
    hflip_p: float = 0.5


class FinetuneConfig(_Section):
    """Dense fine-tuning (`method: finetune_mask2former` / `finetune_vitdet`; docs/finetune.md, SPEC.md §5-6).

    The backbone is `backbone` (an sslpipe export: its architecture and weights; `backbone_init: random` keeps the
    architecture and drops the weights, the same-network baseline) or, when null, `model.arch` at random init. The ViT
    becomes a ViTDet pyramid; Mask2Former or Mask R-CNN sits on it. Defaults are the published values."""

    backbone: str | None = None  # export folder (`sslpipe export`); null: model.arch/patch_size/kwargs, random init
    backbone_init: Literal["export", "random"] = "export"
    task: Literal["semantic", "instance"] = "semantic"  # Mask2Former only; ViTDet Mask R-CNN is always instance
    num_classes: int | None = None  # null: the shards' manifest classes (instance: minus class 0 = background)
    ignore_index: int = 255
    img_size: int = 1024  # training crop (square); also sizes the global blocks' relative-position tables
    scale_range: tuple[float, float] = (0.1, 2.0)  # scale jitter of the crop size (ViTDet LSJ 0.1-2.0)
    hflip: float = 0.5
    eval_size: int | None = None  # evaluation: resize the short side to this first; null: native size
    # evaluation on the training grid (ViT position tables never stretched): Mask2Former semantic `slide` (windows of
    # img_size at a stride of 2/3, BEiT / ViT-Adapter) or `whole` (the image as it is); instance tasks resize the
    # longer side to img_size and pad to the img_size square (ViTDet's square pad)
    eval_mode: Literal["slide", "whole"] = "slide"
    freeze_backbone: bool = False  # train the pyramid and head on a frozen ViT trunk (kept in eval mode)
    # ViTDet backbone (SPEC §5)
    window_size: int = 14
    global_blocks: list[int] = [2, 5, 8, 11]
    use_rel_pos: bool = True
    pyramid_channels: int = 256
    layer_decay: float = 0.7  # lr x decay^(L + 1 - layer_id) inside the ViT
    backbone_lr_mult: float = 1.0  # extra lr factor of the ViT (Mask2Former: 0.1)
    # Mask2Former (SPEC §6)
    num_queries: int = 100
    hidden_dim: int = 256
    num_heads: int = 8
    dim_feedforward: int = 2048
    decoder_layers: int = 10  # 9 masked-attention layers + the query-only prediction
    encoder_layers: int = 6
    encoder_feedforward_dim: int = 1024
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    test_topk: int = 100  # instance inference: top-k (query, class) pairs per image
    # Mask R-CNN (SPEC §5, detectron2 mask_rcnn_vitdet)
    anchor_sizes: list[int] = [32, 64, 128, 256, 512]  # one per pyramid level p2-p6
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000)  # (train, test)
    rpn_post_nms_top_n: tuple[int, int] = (1000, 1000)
    box_batch_size_per_image: int = 512
    box_head_convs: int = 4
    mask_head_convs: int = 4
    head_dim: int = 256
    fc_dim: int = 1024
    detections_per_img: int = 100
    # evaluation and predictions (every eval.knn_every_epochs epochs)
    eval_max_images: int | None = None  # null: the whole val split
    eval_batch_size: int = 8
    predict_images: int = 6  # images in the predictions PNG written at each evaluation


class U2PLConfig(_Section):
    """U2PL (`method: u2pl`, sslpipe/recipes/u2pl.py) and its supervised-only baseline (`method: supervised_seg`);
    docs/u2pl.md, SPEC.md §3. data.train = labelled shards (seg.png), `unlabeled` = unlabelled shards, data.val = val.
    The network is model.arch (timm CNN or ViT) or the export model.init_from. Defaults: the published VOC values
    (experiments/pascal/1464/ours/config.yaml), except contrastive_weight (the paper's 0.1)."""

    unlabeled: str | None = None  # unlabelled shards (image only); required by u2pl, unused by supervised_seg
    unlabeled_split: str = "train"
    unlabeled_ratio: float = 1.0  # unlabelled images per labelled image in a batch (official 4 + 4)
    num_classes: int | None = None  # null: the classes of data.train's manifest
    ignore_index: int = 255
    crop_size: int = 513
    # official RandResize: the scale is uniform in [lo, 1] or in [1, hi], each with probability 1/2 (lo <= 1 <= hi)
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    label_pad: int = 0  # label of the crop's padding on labelled images: official Crop pads with 0; 255 = ignore it
    # network: DeepLabv3+ (official dec_deeplabv3_plus), 256-d representation head
    output_stride: int = 8  # CNN encoders (dilated ResNet-101)
    decoder_channels: int = 256
    aspp_channels: int = 256
    aspp_dilations: list[int] = [12, 24, 36]
    rep_dim: int = 256
    low_level_index: int = 1  # timm feature index of the stride-4 skip
    vit_high_stride: int = 16  # ViT encoders: the pyramid level fed to ASPP
    vit_window_size: int = 0
    vit_global_blocks: list[int] = []
    head_lr_mult: float = 10.0  # decoder lr x10 (VOC; Cityscapes 1)
    # teacher and schedule
    sup_only_epoch: int = 1
    ema_decay: float = 0.99  # decay = min(1 - 1/(it - sup_only_iters + 1), ema_decay)
    # unsupervised loss on reliable pseudo-labels
    unsup_weight: float = 1.0
    drop_percent: float = 80.0
    cutmix: bool = True
    cutmix_p: float = 0.5
    # contrastive loss on unreliable pixels
    contrastive: bool = True
    contrastive_weight: float = 0.1  # paper (maintainer, issue #57); official code 1.0
    current_class_threshold: float = 0.3
    low_entropy_threshold: float = 20.0
    low_rank: int = 3
    high_rank: int = 20
    num_queries: int = 256
    num_negatives: int = 50
    temperature: float = 0.5
    queue_size: int = 30000
    background_queue_size: int = 50000  # class 0
    # evaluation (every eval.knn_every_epochs epochs and `sslpipe eval-seg`)
    eval_mode: Literal["whole", "slide"] = "whole"
    eval_crop: int | None = None  # slide: crop size; null = crop_size
    eval_stride_rate: float = 2 / 3
    eval_batch_size: int = 8
    eval_max_images: int | None = None


class DINOv2Config(_Section):
    """DINOv2 (`method: dinov2`, sslpipe/recipes/dinov2.py): what DINOv2 adds to DINO + iBOT. Defaults are
    facebookresearch/dinov2 dinov2/configs/ssl_default_config.yaml with the method switches of its train configs
    (train/vitl14.yaml, vitg14.yaml: separate heads, Sinkhorn-Knopp centering).

    The CLS head is `head.*` (out_dim = `dino.head_n_prototypes`); the patch head has `head.patch_out_dim`
    prototypes and, where the `ibot_*` sizes are null, head.*'s sizes. Temperatures and centre momenta: `loss.*`
    (one teacher temperature for CLS and patches, as in the official code: the `*_patch_temp` keys are iBOT's).
    LayerScale and registers are timm arguments (`model.kwargs: {init_values: 1.0e-5, reg_tokens: 4}`)."""

    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1  # on the student's backbone CLS tokens of each global crop, summed over crops
    separate_head: bool = True  # train/vitl14.yaml; ssl_default_config.yaml: false (the CLS head also maps patches)
    ibot_hidden_dim: int | None = None  # null: head.hidden_dim
    ibot_bottleneck_dim: int | None = None  # null: head.bottleneck_dim
    ibot_nlayers: int | None = None  # null: head.nlayers
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"  # softmax: DINO/iBOT's centre + softmax
    sinkhorn_iterations: int = 3
    # collate_data_and_cast: int(mask_sample_probability * global crops in the batch) crops are masked, with ratios
    # drawn from linearly spaced bins over mask_ratio_min_max, block masks of at least mask_min_num_patches patches
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5
    mask_min_num_patches: int = 4  # dinov2/data/masking.py MaskingGenerator default
    mask_min_aspect: float = 0.3
    drop_path_uniform: bool = True  # the same drop-path rate in every block (timm: linear from 0)
    layerwise_decay: float = 0.9  # lr x decay^(L + 1 - layer_id) in the backbone (dinov2/utils/param_groups.py)
    patch_embed_lr_mult: float = 0.2

    @model_validator(mode="after")
    def _ranges(self) -> "DINOv2Config":
        lo, hi = self.mask_ratio_min_max
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"dinov2.mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {[lo, hi]}")
        if not 0.0 < self.mask_sample_probability <= 1.0:
            raise ValueError(f"dinov2.mask_sample_probability must be in (0, 1], got {self.mask_sample_probability}")
        if self.sinkhorn_iterations < 1:
            raise ValueError(f"dinov2.sinkhorn_iterations must be >= 1, got {self.sinkhorn_iterations}")
        return self


class Config(_Section):
    method: str
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    data: DataConfig
    crops: CropsConfig = CropsConfig()
    masking: MaskingConfig = MaskingConfig()
    model: ModelConfig = ModelConfig()
    head: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    qscore: QScoreConfig = QScoreConfig()
    simclr: SimCLRConfig = SimCLRConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    u2pl: U2PLConfig = U2PLConfig()
    dinov2: DINOv2Config = DINOv2Config()


# --------------------------------------------------------------------------------------------------------- errors
def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The section model that owns the last key of `loc`, or None when `loc` leaves the schema (e.g. model.kwargs)."""
    model: type[BaseModel] = Config
    for key in loc[:-1]:
        field = model.model_fields.get(str(key))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _unknown_key_message(loc: tuple, where: str) -> str:
    dotted = ".".join(str(k) for k in loc)
    model = _model_at(loc)
    valid = list(model.model_fields) if model else []
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
    parent = ".".join(str(k) for k in loc[:-1])
    hint = f" Did you mean '{(parent + '.') if parent else ''}{close[0]}'?" if close else ""
    return f"{where}: unknown key '{dotted}'.{hint} Valid keys{(' of ' + parent) if parent else ''}: {', '.join(valid)}"


def _type_name(annotation: Any) -> str:
    text = str(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "")


def _expected_type(loc: tuple) -> str:
    keys = [k for k in loc if isinstance(k, str)]
    model: type[BaseModel] = Config
    annotation: Any = None
    for key in keys:
        field = model.model_fields.get(key)
        if field is None:
            break
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return _type_name(annotation) if annotation is not None else "?"


def _value_at(data: Any, loc: tuple) -> Any:
    for key in loc:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _format_validation_error(err: ValidationError, data: dict[str, Any], where: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if any(isinstance(k, int) for k in loc):  # an element of a list/tuple: report the whole value
            loc = loc[: next(i for i, k in enumerate(loc) if isinstance(k, int))]
            e = {**e, "type": "element", "input": _value_at(data, loc)}
        dotted = ".".join(str(k) for k in loc)
        if e["type"] == "extra_forbidden":
            lines.append(_unknown_key_message(loc, where))
        elif e["type"] == "missing":
            lines.append(f"{where}: required key '{dotted}' is missing")
        elif e["type"] == "value_error" and not loc:
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(
                f"{where}: key '{dotted}' = {e.get('input')!r} is invalid: expected {_expected_type(loc)} ({e['msg']})"
            )
    return "\n".join(dict.fromkeys(lines))


# ---------------------------------------------------------------------------------------------------- overrides
def _check_override_key(keys: list[str], item: str) -> Any:
    """Raise on a key the schema lacks; return the annotation of the field set, None inside a free-form dict."""
    model: type[BaseModel] = Config
    for i, key in enumerate(keys):
        field = model.model_fields.get(key)
        if field is None:
            raise ConfigError(_unknown_key_message(tuple(keys[: i + 1]), f"override '{item}'"))
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif i < len(keys) - 1 and typing.get_origin(ann) is not dict:
            raise ConfigError(f"override '{item}': '{'.'.join(keys[: i + 1])}' is a value, not a section")
        else:
            return ann if i == len(keys) - 1 else None
    return None


def _accepts_str(annotation: Any) -> bool:
    """True for `str`, a Literal of strings, or a union holding one of them (`str | None`)."""
    arms = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return any(a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))
               for a in arms)


def _typed_override(annotation: Any, raw: str, value: Any) -> Any:
    """The YAML value of an override, typed by its field as users type it: a string field keeps the text (YAML
    reads `off`, `no`, `on`, `yes` as booleans and `2024` as a number), and a list field takes one value as a
    one-element list (`tracking.log_with=wandb`)."""
    if annotation is None or value is None:
        return value
    if not isinstance(value, str) and _accepts_str(annotation):
        return raw.strip()
    if typing.get_origin(annotation) is list and not isinstance(value, list):
        return [value]
    return value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides in place; values are parsed as YAML (`1e-3`, `[0.4,1.0]`, `null`), then typed by
    the schema's field (`_typed_override`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        keys = [k for k in key.strip().split(".")]
        if not all(keys):
            raise ConfigError(f"override '{item}': empty key part in '{key}'")
        annotation = _check_override_key(keys, item)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            if not _accepts_str(annotation):
                raise ConfigError(f"override '{item}': value {raw!r} is not valid YAML ({exc})") from exc
            value = raw.strip()  # a string field takes any text (`run_name=a: b`)
        value = _typed_override(annotation, raw, value)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


# ------------------------------------------------------------------------------------------------------ loading
def config_from_dict(data: dict[str, Any], where: str = "config") -> Config:
    """Validate a plain dict; errors name `where`, the dotted key and what was expected."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, data, where)) from None


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a recipe YAML, apply `key.sub=value` overrides and validate it into a `Config`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give the path of a recipe YAML, e.g. recipes/demo_*.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{line}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    apply_overrides(data, overrides)
    return config_from_dict(data, where=str(path))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain YAML/JSON-friendly dict (tuples become lists)."""
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (what `load_config` reads back to the same `Config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path

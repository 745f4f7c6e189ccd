"""Config sections that several methods share, each inside the section of a method that reads it: the projection
head and the teacher's sharpening and centring of DINO, iBOT and DINOv2 (`<method>.head`, `<method>.loss`), the EMA
teacher's momentum and the last-layer freeze, and the Q-score regulariser (`<method>.qscore`).

Defaults are the published iBOT ViT-S/16 values (docs/methods.md §1); DINO's and DINOv2's own are written out in
their recipes (recipes/dino_vit_small.yaml, recipes/dinov2_vit_small.yaml).
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from sslpipe.config import Section
from sslpipe.config.core import SAVED_READ


class HeadConfig(Section):
    """DINO's projection head: MLP in -> hidden -> ... -> bottleneck, L2 normalisation, weight-normalised linear to
    `out_dim` prototypes (`norm_last_layer`: the weight-norm gain fixed to 1)."""

    out_dim: int = Field(8192, gt=0)
    hidden_dim: int = Field(2048, gt=0)
    bottleneck_dim: int = Field(256, gt=0)
    nlayers: int = Field(3, ge=1)
    norm_last_layer: bool = False


class TeacherLossConfig(Section):
    """Sharpening and centring of the teacher: student temperature, teacher temperature warmed up linearly from
    `warmup_teacher_temp` over `warmup_teacher_temp_epochs`, centre momentum.

    `temp_per_epoch`: DINO's and iBOT's official losses index `np.linspace(warmup, final, warmup_epochs)` by the
    epoch, so the warm-up is a whole number of epochs; DINOv2 (its subclass) moves the temperature per iteration."""

    temp_per_epoch: ClassVar[bool] = True
    student_temp: float = Field(0.1, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp_epochs: float = Field(30, ge=0)
    center_momentum: float = Field(0.9, ge=0, le=1)

    @field_validator("warmup_teacher_temp_epochs")
    @classmethod
    def _whole_epochs_when_per_epoch(cls, value: float) -> float:
        if cls.temp_per_epoch and not float(value).is_integer() and SAVED_READ.get() is None:  # a saved run: floored
            raise ValueError(f"{value} is not a whole number of epochs: this method moves the teacher temperature "
                             "once per epoch (its official loss); use an integer")
        return value

    @model_validator(mode="after")
    def _no_warmup_value_without_warmup(self) -> "TeacherLossConfig":
        """With no warm-up the temperature is `teacher_temp` from the first step: `warmup_teacher_temp` is unread,
        refused unless it is the default or equal to `teacher_temp` (the official configs write it so, "held")."""
        why = "loss.warmup_teacher_temp_epochs=0"
        if (self.warmup_teacher_temp_epochs == 0 and self.warmup_teacher_temp != self.teacher_temp
                and self.unread_value_stays("warmup_teacher_temp", "*.loss.warmup_teacher_temp", why)):
            problem = ValueError(f"not read with {why}: remove it, set it to teacher_temp, or warm up over some epochs")
            raise ValidationError.from_exception_data(type(self).__name__, [{
                "type": "value_error", "loc": ("warmup_teacher_temp",), "input": self.warmup_teacher_temp,
                "ctx": {"error": problem}}])
        return self


def _percentile_band(value: tuple[float, float]) -> tuple[float, float]:
    """v2's band of activation-rate percentiles; the selection would refuse it only at the first training step."""
    if not 0 <= value[0] <= value[1] <= 100:
        raise ValueError(f"must be (low, high) with 0 <= low <= high <= 100, got {list(value)}")
    return value


V2_KEYS = ("eps", "percentiles", "v2_coverage", "standardize")  # read only by version v2
V1_KEYS = ("l2_normalize",)  # read only by version v1


class QScoreConfig(Section):
    """The Q-score regulariser (sslpipe/losses/qscore.py, docs/methods.md §4, docs/qscore.md), off unless `enabled`.

    `reduction: balanced` (default): L_SSL + lambda1 * mean_{i: Q_i < alpha} (alpha - Q_i) / mean|Q| + lambda2 *
    mean_{k: c_k > beta} (c_k - beta) / mean c, both terms dimensionless (issue 19: with sums the sample term
    vanished next to the column term). `reduction: sum`: the published form, L_SSL - lambda1 * sum_{i: Q_i < alpha}
    Q_i + lambda2 * sum_{k: c_k > beta} c_k, with lambda1 = lambda2 = 1e-4 (second-hand). c_k = ||H_{*,k}||_1 over the
    batch features H (both views stacked); alpha / beta null = the batch means of Q_i / of the c_k.

    A key the settings leave unread is refused at load, never ignored: every key but `enabled` when the section is
    off, v2's `eps` / `percentiles` / `v2_coverage` / `standardize` with `version: v1`, v1's `l2_normalize` with
    `version: v2` (a value equal to the default passes: every saved config holds it).
    """

    enabled: bool = False
    version: Literal["v1", "v2"] = "v2"
    reduction: Literal["balanced", "sum"] = "balanced"
    lambda1: float = 0.1  # balanced terms (ours, untuned); the published sums use 1e-4 (second-hand)
    lambda2: float = 0.1  # balanced terms (ours, untuned); the published sums use 1e-4 (second-hand)
    alpha: float | None = None  # None: the batch mean of Q_i
    beta: float | None = None  # None: the batch mean of the column L1 norms
    eps: float = Field(4.0, gt=0)  # v2: highly activating = h_ij > mu_i + eps * sigma_i (the ceiling with coverage)
    # v2: band of the non-zero activation rates = discriminative
    percentiles: Annotated[tuple[float, float], AfterValidator(_percentile_band)] = (50.0, 95.0)
    # v2: eps lowered from `eps` per batch until this share of rows has L_i ∩ D (null: `eps` as given)
    v2_coverage: float | None = Field(0.5, gt=0, le=1)
    standardize: bool = True  # v2: Q in units of the row's std, (h_ij - mu_i) / sigma_i (ours: scale-free)
    l2_normalize: bool = True  # v1: Q on h / ||h||_2 (the third-party implementation's choice)
    features: Literal["backbone", "projection"] = "backbone"  # which output of the network H is

    @model_validator(mode="after")
    def _refuse_unread(self) -> "QScoreConfig":
        """Non-default values of the keys these settings do not read, each reported at its own key: the error's
        location then carries the method's section (`simclr.qscore.eps`), which this shared section cannot name."""
        if not self.enabled:
            unread = dict.fromkeys((k for k in type(self).model_fields if k != "enabled"), "enabled=false")
        elif self.version == "v1":
            unread = dict.fromkeys(V2_KEYS, "version=v1 (read only by v2)")
        else:
            unread = dict.fromkeys(V1_KEYS, "version=v2 (read only by v1)")
        errors = []
        for key, why in unread.items():
            if self.unread_value_stays(key, f"*.qscore.{key}", f"qscore.{why}"):
                problem = ValueError(f"not read with qscore.{why}: remove it (or change qscore.{why.split('=')[0]})")
                errors.append({"type": "value_error", "loc": (key,), "input": getattr(self, key),
                               "ctx": {"error": problem}})
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def regularizer_args(self) -> dict[str, Any]:
        """The keyword arguments of `sslpipe.losses.qscore.QScoreRegularizer`."""
        return self.model_dump(exclude={"enabled", "features"})


class TeacherStudentConfig(Section):
    """What every EMA teacher-student method reads: the teacher momentum, cosine from `momentum_teacher` to
    `momentum_teacher_end` per iteration; the epochs whose last-layer gradients are dropped; crop packing; head, loss,
    Q-score."""

    momentum_teacher: float = Field(0.996, ge=0, le=1)
    momentum_teacher_end: float = Field(1.0, ge=0, le=1)
    freeze_last_layer_epochs: float = Field(1, ge=0)
    # with model.init_from: the heads start from the export's when it carries this method's (`--with-heads`)
    init_heads: bool = True
    # the student's global and local crops in one pass of the ViT's blocks, attention inside each crop (the official
    # DINOv2 forward_features_list; sslpipe/models/packed_crops.py): fewer, larger kernels for a GPU
    pack_crops: bool = False
    head: HeadConfig = Field(default_factory=HeadConfig)
    loss: TeacherLossConfig = Field(default_factory=TeacherLossConfig)
    qscore: QScoreConfig = Field(default_factory=QScoreConfig)

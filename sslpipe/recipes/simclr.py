"""SimCLR (Chen et al., ICML 2020), the setting of the Q-score paper (docs/methods.md §4, §9), with the optional
Q-score term.

Two augmented views per image (lightly's `SimCLRTransform`: RandomResizedCrop, flip, colour jitter, grayscale,
Gaussian blur), a timm backbone (a ViT or CNN at any crops.global_size; one without stochastic depth with
model.drop_path_rate=0; one timm builds for a single input size, e.g. Swin or BEiT, only at that size), lightly's
`SimCLRProjectionHead` and `NTXentLoss(gather_distributed=True)`: with several processes the projections of every
process are all-gathered with gradients (lightly's GatherLayer), so each sample's negatives are the
2 * global_batch - 2 other views, not only the local ones.

    L = NT-Xent(z_view1, z_view2)  [+ the Q-score term of sslpipe.losses.qscore on H = both views' backbone features
                                     (simclr.qscore.features: backbone) or projections (projection), when enabled]

`model.init_from` initialises the backbone from an sslpipe export (the paper fine-tunes a pretrained SimCLR model);
the projection head then starts from scratch (exports hold only the backbone; the paper keeps its projector).
Export the trained backbone with `sslpipe export RUN --which student` (SimCLR has no teacher).
"""
from __future__ import annotations

from typing import Any

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from pydantic import Field
from torch import Tensor, nn

from sslpipe.config import RunConfig, Section
from sslpipe.data.stream import build_loader
from sslpipe.losses.health import embedding_health
from sslpipe.models.backbones import backbone_embed_dim, create_backbone, pooled_features, sync_batchnorm
from sslpipe.recipes.base import Recipe, continued_normalisation_notes, shard_reading
from sslpipe.recipes.knn_eval import periodic_knn
from sslpipe.recipes.multicrop import DENSE_EVAL_KEYS, build_qscore, check_native_patch, split_decay_groups
from sslpipe.recipes.sections import QScoreConfig


class SimCLRConfig(Section):
    """`simclr:` in a recipe: NT-Xent temperature, projection head, two-view augmentation (lightly's
    SimCLRTransform at crops.global_size, normalised with crops.mean/std, blur sigma crops.blur_sigma), Q-score."""

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
    qscore: QScoreConfig = Field(default_factory=QScoreConfig)

    def check_run(self, run: RunConfig) -> None:
        super().check_run(run)
        check_native_patch(run)


# the multi-crop keys: SimCLR makes two views of crops.global_size with its own scale range
TWO_VIEW_UNREAD = {f"crops.{key}": "SimCLR makes two views of crops.global_size (scale: simclr.min_scale)"
                   for key in ("local_size", "n_global", "n_local", "global_scale", "local_scale",
                               "blur_scale_with_size", "backend")}


class SimCLRNet(nn.Module):
    """Backbone + projection head: `forward(views) -> (backbone features, projections)`, both (2B, .)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Tensor) -> tuple[Tensor, Tensor]:
        feats = pooled_features(self.backbone, views)
        return feats, self.head(feats)


class TwoViewSample:
    """sample_fn of the stream: `{"views": [v1, v2], "label": int}` (a class, so DataLoader workers can pickle it)."""

    def __init__(self, transform: SimCLRTransform) -> None:
        self.transform = transform

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        image = raw["image"] if raw["image"].mode == "RGB" else raw["image"].convert("RGB")
        return {"views": self.transform(image), "label": int(raw["label"])}


def collate_two_views(samples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """`views` (2B, C, H, W) view-major (view 1 of every image, then view 2) and `labels` (B,)."""
    return {
        "views": torch.stack([s["views"][0] for s in samples] + [s["views"][1] for s in samples]),
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
    }


def build_transform(cfg: RunConfig) -> SimCLRTransform:
    s, c = cfg.simclr, cfg.crops
    return SimCLRTransform(
        input_size=c.global_size, cj_prob=s.cj_prob, cj_strength=s.cj_strength, min_scale=s.min_scale,
        random_gray_scale=s.gray_p, gaussian_blur=s.blur_p, sigmas=tuple(c.blur_sigma), hf_prob=s.hflip_p,
        normalize={"mean": list(c.mean), "std": list(c.std)},
    )


def build_ntxent(temperature: float) -> NTXentLoss:
    """lightly's NT-Xent with negatives gathered across processes (a no-op on one process)."""
    return NTXentLoss(temperature=temperature, gather_distributed=True)


class SimCLRRecipe(Recipe):
    """`method: simclr` in a YAML recipe."""

    config_key = "simclr"
    config_section = SimCLRConfig
    unread = {**TWO_VIEW_UNREAD, **DENSE_EVAL_KEYS,
              "train.compile": "train.compile is built for the teacher-student recipes",
              "train.compile_backend": "train.compile is built for the teacher-student recipes",
              "train.compile_scope": "train.compile is built for the teacher-student recipes"}

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.accelerator = None
        self.student: nn.Module

    def build(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        m, s = self.cfg.model, self.cfg.simclr
        backbone = create_backbone(m.arch, img_size=self.cfg.crops.global_size, patch_size=m.patch_size,
                                   drop_path_rate=m.drop_path_rate, **m.kwargs)
        if m.init_from:
            from sslpipe.weights.export import load_export_into

            notes = load_export_into(backbone, m.init_from) + continued_normalisation_notes(self.cfg)
            print(f"model.init_from={m.init_from}: backbone" + "".join(f"; {n}" for n in notes))
        dim = backbone_embed_dim(backbone)
        head = SimCLRProjectionHead(dim, s.proj_hidden_dim, s.proj_output_dim, num_layers=s.proj_layers,
                                    batch_norm=s.proj_batch_norm)
        self.student = sync_batchnorm(SimCLRNet(backbone, head), enabled=m.sync_batchnorm,
                                      num_processes=accelerator.num_processes, device=accelerator.device)
        self.loss = build_ntxent(s.temperature)
        self.qscore = build_qscore(s.qscore)

    # ----------------------------------------------------------------- data
    def train_loader(self, epoch: int, rank: int, world_size: int):
        d = self.cfg.data
        return build_loader(
            d.train, split=d.train_split, sample_fn=TwoViewSample(build_transform(self.cfg)),
            collate_fn=collate_two_views, batch_size=d.batch_size, num_workers=d.num_workers, epoch=epoch,
            seed=self.cfg.seed, rank=rank, world_size=world_size, shuffle=True, shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled, num_batches=self.steps_per_epoch(world_size), reading=shard_reading(d),
        )

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].shape[0])

    # ----------------------------------------------------------------- step
    def param_groups(self) -> list[dict[str, Any]]:
        return split_decay_groups(self.student)

    def step(self, batch: dict[str, Tensor], sched: dict[str, float]) -> tuple[Tensor, dict[str, Any]]:
        views = batch["views"].to(self.accelerator.device, non_blocking=True)
        feats, proj = self.student(views)
        z1, z2 = proj.chunk(2)
        ssl = self.loss(z1, z2)
        metrics: dict[str, Any] = {"ntxent": ssl.detach()}
        loss = ssl
        if self.qscore is not None:
            h = feats if self.cfg.simclr.qscore.features == "backbone" else proj
            term, qmetrics = self.qscore(h)
            loss = loss + term
            metrics.update(qmetrics)
        if self.cfg.train.health_every and (int(sched["it"]) + 1) % self.cfg.train.health_every == 0:
            metrics.update(embedding_health(student=feats.detach()))  # no teacher: the student's features only
        return loss, metrics

    def after_optimizer_step(self, sched: dict[str, float]) -> None:
        """No teacher, nothing to update."""

    def extra_state(self) -> dict[str, Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise KeyError(f"a SimCLR run keeps no extra state, but the checkpoint has {sorted(state)[:5]}")

    # ------------------------------------------------------------ evaluation
    def _unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student) if self.accelerator is not None else self.student

    def backbone(self, which: str = "teacher") -> nn.Module:
        """The student's timm backbone whatever `which` says (SimCLR has one network)."""
        return self._unwrapped_student().backbone

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Weighted kNN of the backbone on the validation split; the main process probes and broadcasts."""
        from accelerate.utils import broadcast_object_list

        metrics = [periodic_knn(self.cfg, self.backbone()) if self.accelerator.is_main_process else None]
        return broadcast_object_list(metrics)[0]

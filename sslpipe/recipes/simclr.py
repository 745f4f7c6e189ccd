"""SimCLR (Chen et al., ICML 2020), the setting of the Q-score paper (SPEC.md §4), with the optional Q-score term.

Two augmented views per image (lightly's `SimCLRTransform`: RandomResizedCrop, flip, colour jitter, grayscale,
Gaussian blur), any timm backbone, lightly's `SimCLRProjectionHead` and `NTXentLoss(gather_distributed=True)`:
with several processes the projections of every process are all-gathered with gradients (lightly's GatherLayer),
so each sample's negatives are the 2 * global_batch - 2 other views, not only the local ones.

    L = NT-Xent(z_view1, z_view2)  [+ the Q-score term of sslpipe.losses.qscore on H = both views' backbone features
                                     (qscore.features: backbone) or projections (projection), when qscore.enabled]

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
from torch import Tensor, nn

from sslpipe.config import Config
from sslpipe.data.stream import build_loader
from sslpipe.losses.health import embedding_health
from sslpipe.losses.qscore import build_qscore
from sslpipe.models.backbones import backbone_embed_dim, create_backbone, forward_cls, sync_batchnorm
from sslpipe.recipes.base import Recipe
from sslpipe.recipes.multicrop import split_decay_groups


class SimCLRNet(nn.Module):
    """Backbone + projection head: `forward(views) -> (backbone features, projections)`, both (2B, .)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Tensor) -> tuple[Tensor, Tensor]:
        feats = forward_cls(self.backbone, views)
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


def build_transform(cfg: Config) -> SimCLRTransform:
    s, c = cfg.simclr, cfg.crops
    return SimCLRTransform(
        input_size=c.global_size, cj_prob=s.cj_prob, cj_strength=s.cj_strength, min_scale=s.min_scale,
        random_gray_scale=s.gray_p, gaussian_blur=s.blur_p, sigmas=tuple(c.blur_sigma), hf_prob=s.hflip_p,
        normalize={"mean": list(c.mean), "std": list(c.std)},
    )


def build_ntxent(cfg: Config) -> NTXentLoss:
    """lightly's NT-Xent with negatives gathered across processes (a no-op on one process)."""
    return NTXentLoss(temperature=cfg.simclr.temperature, gather_distributed=True)


class SimCLRRecipe(Recipe):
    """`method: simclr` in a YAML recipe."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.accelerator = None
        self.student: nn.Module

    def build(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        m, s = self.cfg.model, self.cfg.simclr
        backbone = create_backbone(m.arch, img_size=self.cfg.crops.global_size, patch_size=m.patch_size,
                                   drop_path_rate=m.drop_path_rate, **m.kwargs)
        if m.init_from:
            from sslpipe.export import load_export_into

            load_export_into(backbone, m.init_from)
        dim = backbone_embed_dim(backbone)
        head = SimCLRProjectionHead(dim, s.proj_hidden_dim, s.proj_output_dim, num_layers=s.proj_layers,
                                    batch_norm=s.proj_batch_norm)
        self.student = sync_batchnorm(SimCLRNet(backbone, head), enabled=m.sync_batchnorm,
                                      num_processes=accelerator.num_processes, device=accelerator.device)
        self.loss = build_ntxent(self.cfg)
        self.qscore = build_qscore(self.cfg)

    # ----------------------------------------------------------------- data
    def train_loader(self, epoch: int, rank: int, world_size: int):
        d = self.cfg.data
        return build_loader(
            d.train, split=d.train_split, sample_fn=TwoViewSample(build_transform(self.cfg)),
            collate_fn=collate_two_views, batch_size=d.batch_size, num_workers=d.num_workers, epoch=epoch,
            seed=self.cfg.seed, rank=rank, world_size=world_size, shuffle=True, shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled, num_batches=self.steps_per_epoch(world_size), on_error=d.on_error,
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
            h = feats if self.cfg.qscore.features == "backbone" else proj
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

        from sslpipe.eval.knn import knn_probe

        if not self.cfg.data.val:
            return {}
        metrics = [None]
        if self.accelerator.is_main_process:
            result = knn_probe(self.backbone(), self.cfg, progress=False)
            metrics = [{f"knn/top1_k{k}": v["top1"] for k, v in result["k"].items()}]
        return broadcast_object_list(metrics)[0]

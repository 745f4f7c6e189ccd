"""Linear probe on frozen features (DINO eval_linear.py, docs/methods.md §2).

Features: the CLS token of each of the last `n_last_blocks` blocks, each after the final LayerNorm, concatenated
(DINO: n=4 for ViT-S; `FeatureSpec(pooling="blocks", layers=4)`, `sslpipe.eval.spec.LastBlocksCLS`); CNNs (no
class token) use their pooled features (`cls` pooling), and an `n_last_blocks` given for one is refused, as it would
be recorded and never read (the result's `n_last_blocks` is null for them). One `nn.Linear` (weight N(0, 0.01),
bias 0) is trained with SGD (momentum 0.9, weight decay 0, lr = 0.001 * batch / 256) and a per-epoch cosine
schedule to 0.

Deviation from DINO, for cost: features are extracted once from the evaluation view (Resize + CenterCrop) and the
classifier is trained on these cached features, so there is no RandomResizedCrop/flip training augmentation. The
numbers are therefore a little lower than DINO's protocol would give; the ranking of backbones is what it is for.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sslpipe.eval.features import extract_train_val, prepare_backbone, report
from sslpipe.eval.spec import LastBlocksCLS, has_block_cls

if TYPE_CHECKING:
    from sslpipe.eval.spec import FeatureSpec, ProbeData

DEFAULT_N_LAST_BLOCKS = 4  # DINO's value for ViT-S


def check_classifier_args(epochs: int, batch_size: int, lr: float | None) -> None:
    """Refuse classifier settings that train nothing (0 epochs would report the random initial layer) or cannot run,
    before any feature is extracted."""
    if epochs < 1 or batch_size < 1 or (lr is not None and not lr > 0):
        raise ValueError(f"the linear probe needs epochs >= 1, batch_size >= 1 and lr > 0, got epochs={epochs}, "
                         f"batch_size={batch_size}, lr={lr}")


@torch.no_grad()
def _accuracy(clf: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device) -> dict[str, float]:
    num_classes = clf.out_features
    top1 = top5 = 0
    for start in range(0, len(x), batch_size):
        logits = clf(x[start:start + batch_size].to(device))
        ranked = logits.topk(min(5, num_classes), dim=1).indices.cpu()
        hits = ranked.eq(y[start:start + batch_size].view(-1, 1))
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=1).sum())
    return {"top1": top1 / len(x), **({"top5": top5 / len(x)} if num_classes >= 5 else {})}


def train_linear(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train DINO's linear classifier on fixed features; returns val top-1 (and top-5 with >= 5 classes).

    lr defaults to 0.001 * batch_size / 256 (DINO's scaling rule); cosine annealing per epoch to 0.
    """
    check_classifier_args(epochs, batch_size, lr)
    train_y, val_y = train_y.long(), val_y.long()
    if (train_y < 0).any() or (val_y < 0).any():
        raise ValueError("the linear probe needs labelled samples (found label -1: shards without `cls`)")
    num_classes = int(num_classes or max(train_y.max(), val_y.max()) + 1)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lr = lr if lr is not None else 0.001 * batch_size / 256
    gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(train_x.shape[1], num_classes)
    nn.init.normal_(clf.weight, mean=0.0, std=0.01, generator=gen)
    nn.init.zeros_(clf.bias)
    clf.to(dev)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    x, y = train_x.float(), train_y
    loss = torch.tensor(math.nan)
    for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(clf(x[idx].to(dev)), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    result = _accuracy(clf, val_x.float(), val_y, batch_size, dev)
    result.update(final_loss=loss.item(), epochs=epochs, lr=lr, batch_size=batch_size, num_classes=num_classes,
                  n_train=len(x), n_test=len(val_x), feature_dim=int(train_x.shape[1]))
    return result


def linear_probe(
    backbone: str | Path | nn.Module,
    spec: FeatureSpec,
    data: ProbeData,
    *,
    n_last_blocks: int | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    out_json: str | Path | None = None,
    tracker: Any = None,
    step: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract features once, train the linear layer on them (`batch_size`, `lr`, `epochs`: the classifier's), report
    val accuracy (JSON + tracker keys `linear/top1`, `linear/top5`).

    `spec` gives the preprocessing and execution; the pooling is the probe's own, so it must keep the default
    (`cls`, 1 layer): a ViT is probed on its last `n_last_blocks` CLS tokens (None: 4, DINO's protocol), a backbone
    without a class token on its pooled features, and an `n_last_blocks` given for one is refused. Every setting is
    checked before any feature is extracted."""
    check_classifier_args(epochs, batch_size, lr)
    if spec.pooling != "cls" or spec.layers != 1:
        raise ValueError(f"linear_probe sets the pooling itself: pass n_last_blocks, not a FeatureSpec with "
                         f"pooling={spec.pooling!r}, layers={spec.layers}")
    model, source = prepare_backbone(backbone, spec)
    if has_block_cls(model):
        spec = replace(spec, pooling="blocks", layers=n_last_blocks or DEFAULT_N_LAST_BLOCKS)
        LastBlocksCLS(spec.layers).check(model)
    elif n_last_blocks is not None:
        LastBlocksCLS(n_last_blocks).check(model)  # refuses it, naming --n-last-blocks
    train_x, train_y, val_x, val_y = extract_train_val(model, spec, data, cache_dir=cache_dir, cache_name="linear_",
                                                       progress=progress)
    result = train_linear(train_x, train_y, val_x, val_y, num_classes=data.num_classes, epochs=epochs,
                          batch_size=batch_size, lr=lr, seed=seed, device=spec.device, progress=progress)
    result.update(backbone=source, n_last_blocks=spec.layers if spec.pooling == "blocks" else None)
    report(result, {f"linear/{m}": result[m] for m in ("top1", "top5") if m in result}, out_json, tracker, step)
    return result

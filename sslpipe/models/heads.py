"""DINO / iBOT projection heads (docs/methods.md §1 "Head"; iBOT models/head.py, DINO vision_transformer.py DINOHead).

MLP in -> hidden -> GELU -> hidden -> GELU -> bottleneck (trunc-normal std 0.02, zero bias), L2-normalise, then a
weight-normalised Linear bottleneck -> out_dim without bias whose norm g is filled with 1 (and frozen when
``norm_last_layer``); DINOv3's head (dinov3 layers/dino_head.py) ends in a plain Linear instead, trunc-normal 0.02.

Written here rather than using lightly's DINOProjectionHead (numerically the same head, tested in
tests/test_models.py) because lightly uses the legacy ``nn.utils.weight_norm`` hook, whose derived ``weight``
tensor makes the module impossible to ``copy.deepcopy`` (needed to build the EMA teacher). This module uses
``torch.nn.utils.parametrizations.weight_norm``: g and v are the parameters
``last_layer.parametrizations.weight.original0`` / ``original1`` (names contain ``last_layer``, which the trainer
freezes during the first epoch), it deep-copies and round-trips through ``state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Sequential:
    if nlayers < 1:
        raise ValueError(f"head nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
    else:
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    mlp = nn.Sequential(*layers)
    for m in mlp.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return mlp


def _weight_normed_linear(bottleneck_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Linear:
    """Linear without bias, weight = g * v / ||v|| per output row; g = 1, frozen if norm_last_layer."""
    layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0
    g.data.fill_(1.0)
    g.requires_grad_(not norm_last_layer)
    return layer


def weight_norm_g(layer: nn.Module) -> Tensor:
    """The weight-norm magnitude g (out_dim, 1) of a layer built by this module."""
    return layer.parametrizations.weight.original0


def _plain_linear(bottleneck_dim: int, out_dim: int) -> nn.Linear:
    """DINOv3's last layer (dinov3 layers/dino_head.py): a Linear without bias, trunc-normal std 0.02 like the MLP."""
    layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
    nn.init.trunc_normal_(layer.weight, std=0.02)
    return layer


class DINOHead(nn.Module):
    """DINO projection head: x (..., in_dim) -> logits (..., out_dim). ``plain_last_layer``: DINOv3's head, whose
    last layer is a plain Linear (its `head_norm_last_layer` is only logged), so ``norm_last_layer`` must be False."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, plain_last_layer: bool = False) -> None:
        super().__init__()
        if plain_last_layer and norm_last_layer:
            raise ValueError("a plain last layer has no weight-norm magnitude to hold at 1: norm_last_layer must be "
                             "false with plain_last_layer")
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        self.last_layer = (_plain_linear(bottleneck_dim, out_dim) if plain_last_layer
                           else _weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer))

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class IBOTHead(nn.Module):
    """iBOT head: one MLP for CLS and patch tokens; ``last_layer`` (CLS) and ``last_layer2`` (patches).

    With ``shared_head`` (the published ViT-S/16 setting) ``last_layer2`` IS ``last_layer`` (one module, one set of
    parameters), which requires ``out_dim == patch_out_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int, shared_head: bool = True,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        if shared_head and out_dim != patch_out_dim:
            raise ValueError(f"shared_head=True needs out_dim == patch_out_dim, got {out_dim} and {patch_out_dim}: "
                             "set both to the same value or use shared_head=False")
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        self.last_layer = _weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer2 = (self.last_layer if shared_head
                            else _weight_normed_linear(bottleneck_dim, patch_out_dim, norm_last_layer))

    def forward_cls(self, cls_tokens: Tensor) -> Tensor:
        """CLS logits only, from (B, D) CLS tokens (student local crops: no patch term)."""
        return self.last_layer(F.normalize(self.mlp(cls_tokens), dim=-1, p=2))

    def forward(self, tokens: Tensor, num_prefix_tokens: int = 1,
                mask_indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens (B, P+N, D) -> (cls_logits (B, K), patch_logits (B, N, Kp)); the CLS token is tokens[:, 0].

        Prefix tokens other than the CLS token (registers) get no output. With ``mask_indices`` (M,), the masked
        positions in the flattened (B * N) patches (`sslpipe.data.collate.mask_batch_fields`), patch logits are
        computed only there and returned as those rows, (M, Kp): the student's MIM term reads only masked positions,
        so this skips most of the patch head's work (an optimisation the official code does not make; the loss is
        unchanged), and no (B * N, Kp) tensor is filled and scattered into (about 20 ms of a 620 ms CPU step, measured).
        """
        if tokens.dim() != 3 or tokens.shape[1] <= num_prefix_tokens:
            raise ValueError(f"IBOTHead expects tokens (B, P+N, D) with N > 0 and P={num_prefix_tokens}, "
                             f"got shape {tuple(tokens.shape)}")
        patches = tokens[:, num_prefix_tokens:]
        if mask_indices is None:
            x = F.normalize(self.mlp(torch.cat([tokens[:, :1], patches], dim=1)), dim=-1, p=2)
            return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])
        cls_logits = self.forward_cls(tokens[:, 0])
        flat = patches.flatten(0, 1)
        return cls_logits, self.last_layer2(F.normalize(self.mlp(flat.index_select(0, mask_indices)), dim=-1, p=2))


def cancel_last_layer_gradients(module: nn.Module) -> None:
    """DINO `cancel_gradients_last_layer`: drop the gradients of parameters named *last_layer* (the heads' last
    layer is frozen for the first `freeze_last_layer_epochs`, which stabilises the start of training)."""
    for name, param in module.named_parameters():
        if "last_layer" in name:
            param.grad = None

"""Segmentation network for U2PL and its supervised baseline: encoder -> DeepLabv3+ decoder -> {"pred", "rep"}.

Decoder (official U2PL `u2pl/models/decoder.py: dec_deeplabv3_plus`, `base.py: ASPP`; docs/methods.md §3):
    ASPP(high) = concat[ image pool -> 1x1, 1x1, 3x3 d1, 3x3 d2, 3x3 d3 ] (each conv + BN + ReLU, `inner` channels)
    head = 3x3 conv (5*inner -> C) + BN + ReLU + Dropout(0.1);  low = 1x1 conv (low_ch -> C) + BN + ReLU
    x = concat[ low, upsample(head, low size) ]          (2C channels at the low-level stride, 4)
    classifier     = (3x3 conv 2C->C, BN, ReLU, Dropout) x 2 as 2C->C, C->C, then 1x1 -> num_classes
    representation = the same shape, 1x1 -> rep_dim (256)                      (U2PL's representation head)
Official sizes: C = inner = 256, dilations (12, 24, 36) at output stride 8, rep 256. Both heads are built on the
same concatenated features; the supervised baseline builds no representation head (the code's `rep_head: False`).

Encoders (`build_encoder`), each giving (low, high) feature maps:
- any timm CNN: `forward_intermediates` at `low_index` (stride 4) and the last stage, built with timm's
  `output_stride` (8 = the paper's dilated ResNet-101: `replace_stride_with_dilation [False, True, True]`);
- a timm ViT (or an sslpipe export of one): ViTDet's simple feature pyramid (sslpipe/heads/vitdet.py) with low =
  p2 (stride 4) and high = the pyramid level at `vit_high_stride` (16 = the ViT's own grid).
Named deviations from the official ResNet-101: timm's `resnet101s` has the same deep 64-64-128 stem, but timm's
dilation is uniform inside a stage (the code's `multi_grid` 1-2-4 rates in layer4 are not built); the ImageNet
weights come from `model.init_from` (an sslpipe export), never from a download.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.models.backbones import is_vit_arch


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=bias), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3; the official `ASPP`): five branches concatenated."""

    def __init__(self, in_ch: int, inner: int = 256, dilations: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_ch, inner, 1))
        self.branches = nn.ModuleList([nn.Sequential(*_conv_bn_relu(in_ch, inner, 1))] + [
            nn.Sequential(*_conv_bn_relu(in_ch, inner, 3, d)) for d in dilations])
        self.out_channels = inner * (len(dilations) + 2)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([pooled] + [b(x) for b in self.branches], dim=1)


def _head(ch: int, out: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(2 * ch, ch, 3, bias=True), nn.Dropout2d(0.1),
                         *_conv_bn_relu(ch, ch, 3, bias=True), nn.Dropout2d(0.1), nn.Conv2d(ch, out, 1))


class DeepLabV3PlusDecoder(nn.Module):
    """(low, high) -> {"pred": (B, K, h_low, w_low), "rep": (B, rep_dim, h_low, w_low) if rep_dim}."""

    def __init__(self, low_ch: int, high_ch: int, num_classes: int, channels: int = 256, inner: int = 256,
                 dilations: Sequence[int] = (12, 24, 36), rep_dim: int | None = 256) -> None:
        super().__init__()
        self.low_conv = nn.Sequential(*_conv_bn_relu(low_ch, channels, 1, bias=True))
        self.aspp = ASPP(high_ch, inner, dilations)
        self.head = nn.Sequential(*_conv_bn_relu(self.aspp.out_channels, channels, 3), nn.Dropout2d(0.1))
        self.classifier = _head(channels, num_classes)
        self.representation = _head(channels, rep_dim) if rep_dim else None

    def forward(self, low: Tensor, high: Tensor) -> dict[str, Tensor]:
        x = self.head(self.aspp(high))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
        x = torch.cat([self.low_conv(low), x], dim=1)
        out = {"pred": self.classifier(x)}
        if self.representation is not None:
            out["rep"] = self.representation(x)
        return out


class CNNEncoder(nn.Module):
    """A timm CNN (num_classes=0) -> (low, high) via `forward_intermediates` (timm >= 1.0)."""

    def __init__(self, model: nn.Module, low_index: int = 1) -> None:
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{type(model).__name__} has no forward_intermediates: pick a timm CNN that has it "
                             "(resnet*, convnext*, efficientnet*, ...)")
        self.model = model
        info = model.feature_info
        self.indices = [low_index, len(info) - 1]
        self.channels = (int(info[low_index]["num_chs"]), int(info[-1]["num_chs"]))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low, high = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return low, high


class ViTEncoder(nn.Module):
    """A timm ViT through ViTDet's simple feature pyramid -> (p2, level at `high_stride`)."""

    def __init__(self, vit: nn.Module, *, channels: int = 256, high_stride: int = 16, window_size: int = 0,
                 global_blocks: Sequence[int] = (), img_size: int | None = None) -> None:
        super().__init__()
        from sslpipe.heads.vitdet import build_vitdet_pyramid

        self.high_name = f"p{int(high_stride).bit_length() - 1}"
        self.pyramid = build_vitdet_pyramid(vit, window_size=window_size, global_blocks=global_blocks,
                                            img_size=img_size, out_channels=channels,
                                            strides=sorted({4, int(high_stride)}), top_block=False)
        self.channels = (channels, channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        maps = self.pyramid(x)
        return maps["p2"], maps[self.high_name]


class SegmentationNet(nn.Module):
    """encoder + DeepLabv3+ decoder; outputs stay at the decoder's stride (4): callers upsample to label size
    (bilinear, align_corners=True, as the code). `encoder` / `decoder` name the two lr groups (head lr x10)."""

    def __init__(self, encoder: nn.Module, decoder: DeepLabV3PlusDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        low, high = self.encoder(x)
        return self.decoder(low, high)


def _timm_model(arch: str, model_args: dict[str, Any], export: dict[str, Any] | None = None,
                weights: str | None = None) -> nn.Module:
    """A plain timm model at random init (`arch`), or the network an export's config.json describes, with the
    export's weights when `weights` names them (else they come from a checkpoint later)."""
    import timm
    from safetensors.torch import load_file

    if export is None:
        return timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
    model = timm.create_model(export["architecture"], pretrained=False, **{**export["model_args"], **model_args})
    if weights is not None:
        path = weights if str(weights).endswith(".safetensors") else f"{weights}/model.safetensors"
        try:
            model.load_state_dict(load_file(path), strict=True)
        except RuntimeError as err:
            raise ValueError(f"model.init_from={weights}: its weights do not fit {export['architecture']} "
                             f"({err})") from err
    return model


def build_segmentation_net(arch: str, num_classes: int, *, init_from: str | None = None,
                           export_config: dict[str, Any] | None = None, load_weights: bool = True,
                           output_stride: int = 8, img_size: int = 224, patch_size: int | None = None,
                           model_kwargs: dict | None = None, channels: int = 256, aspp_channels: int = 256,
                           dilations: Sequence[int] = (12, 24, 36), rep_dim: int | None = 256, low_index: int = 1,
                           vit_high_stride: int = 16, vit_window_size: int = 0,
                           vit_global_blocks: Sequence[int] = ()) -> SegmentationNet:
    """The network of the module docstring for a timm `arch` (random init) or the export `init_from`: the network
    its config.json describes (`export_config`: that config as a run recorded it) and, with `load_weights`, its
    weights."""
    kwargs = dict(model_kwargs or {})
    export = None
    if init_from is not None:
        from sslpipe.weights.export import read_export_config

        export = export_config or read_export_config(init_from)
    weights = init_from if load_weights else None
    if is_vit_arch(export["architecture"] if export else arch):
        if export is None:
            from sslpipe.models.backbones import create_backbone

            vit = create_backbone(arch, img_size=img_size, patch_size=patch_size, **kwargs)
        else:  # the export's network; of the recipe's arguments only stochastic depth applies
            vit = _timm_model(arch, {k: v for k, v in kwargs.items() if k == "drop_path_rate"}, export, weights)
        encoder: nn.Module = ViTEncoder(vit, channels=channels, high_stride=vit_high_stride,
                                        window_size=vit_window_size, global_blocks=vit_global_blocks,
                                        img_size=img_size)
    else:
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        encoder = CNNEncoder(_timm_model(arch, kwargs, export, weights), low_index=low_index)
    low_ch, high_ch = encoder.channels
    decoder = DeepLabV3PlusDecoder(low_ch, high_ch, num_classes, channels=channels, inner=aspp_channels,
                                   dilations=dilations, rep_dim=rep_dim)
    return SegmentationNet(encoder, decoder)

"""Backbones (timm), projection heads and the EMA teacher."""

from sslpipe.models.backbones import MaskedViT, backbone_embed_dim, create_backbone, is_vit_arch, pooled_features
from sslpipe.models.ema import build_teacher, ema_update
from sslpipe.models.heads import DINOHead, IBOTHead, weight_norm_g

__all__ = ["MaskedViT", "backbone_embed_dim", "create_backbone", "is_vit_arch", "pooled_features", "build_teacher",
           "ema_update", "DINOHead", "IBOTHead", "weight_norm_g"]

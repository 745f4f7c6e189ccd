"""Backbones (timm), projection heads and the EMA teacher."""

from sslpipe.models.backbones import MaskedViT, backbone_embed_dim, create_backbone, forward_cls, is_vit_arch
from sslpipe.models.ema import build_teacher, ema_update
from sslpipe.models.heads import DINOHead, IBOTHead, weight_norm_g

__all__ = ["MaskedViT", "backbone_embed_dim", "create_backbone", "forward_cls", "is_vit_arch", "build_teacher",
           "ema_update", "DINOHead", "IBOTHead", "weight_norm_g"]

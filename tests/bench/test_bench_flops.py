"""The benchmarks' FLOP counter against a hand count of a ViT: attention counted on the CPU as on CUDA."""
from __future__ import annotations

import timm
import torch

from sslpipe.bench.flops import count_flops
from tests.bench.vit_count import vit_flops


def test_count_flops_matches_a_hand_count_of_a_vit(device: str) -> None:
    """Tokens 65 (8x8 patches + CLS), d 64, 2 blocks: attention is 1/7 of the forward here, so leaving it out (what
    FlopCounterMode alone does for the CPU kernel) fails by far more than the exact equality asked."""
    torch.set_num_threads(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                            embed_dim=64, depth=2, num_heads=2).to(device)
    assert vit.blocks[0].attn.fused_attn  # the scaled_dot_product_attention kernel, as in training
    x = torch.randn(3, 3, 32, 32, device=device)
    hand_fwd, hand_both = (3 * vit_flops(65, 64, 2, 3 * 4 * 4, backward) for backward in (False, True))
    with torch.no_grad():
        assert count_flops(lambda: vit.forward_features(x)) == hand_fwd
    assert count_flops(lambda: vit.forward_features(x).float().mean().backward()) == hand_both

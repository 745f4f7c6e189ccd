"""FLOP counting for the benchmarks: torch's `FlopCounterMode`, with the CPU attention kernel counted as on CUDA.

torch registers FLOP formulas for the CUDA scaled-dot-product-attention kernels only (flash, memory-efficient,
cuDNN). The CPU kernel that timm's fused attention runs, `aten._scaled_dot_product_flash_attention_for_cpu`, has
none, so on a CPU QK^T and AV would count as 0 FLOPs (7.8 % of a ViT-S/16 step at 224 px). Here that kernel and its
backward get torch's own CUDA formulas, so a step counts the same on either device: forward 4*N^2*d per head (QK^T
and AV, 2 FLOPs per multiply-add), backward torch's five products (its recompute of QK^T included, as on CUDA).
Only matmuls, convolutions and attention are counted (not norms, softmax or element-wise ops).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import flop_counter

_aten = torch.ops.aten


def _cpu_sdpa(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward(grad_out: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None,
                       **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


CPU_ATTENTION_FLOPS = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                       _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (forward and backward, whatever it runs), attention included on every device."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        fn()
    return int(counter.get_total_flops())

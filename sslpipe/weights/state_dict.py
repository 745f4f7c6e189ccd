"""State dicts of models whose modules share tensors, written by the recipes (extra state) and the checkpoints
(`sslpipe.weights.state_io`) alike."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of tensors registered twice (iBOT's shared head: last_layer2 is last_layer).

    safetensors refuses aliased tensors; loading the first name restores the shared module for both names.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor  # FSDP2: this process's slice
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out

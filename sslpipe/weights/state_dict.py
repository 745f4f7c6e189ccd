"""State dicts of models whose modules share tensors or are sharded, written by the recipes (extra state) and the
checkpoints (`sslpipe.weights.state_io`) alike."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_slice(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice of an FSDP2-sharded tensor (a DTensor), a plain tensor itself: what in-place updates that
    need no communication (an EMA, clipping by precomputed factors) work on."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of tensors registered twice (iBOT's shared head: last_layer2 is last_layer).

    safetensors refuses aliased tensors; loading the first name restores the shared module for both names.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        local = local_slice(tensor)
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out

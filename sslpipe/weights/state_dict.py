"""State dicts of models whose modules share tensors, written by the recipes (extra state) and the checkpoints
(`sslpipe.weights.state_io`) alike."""
from __future__ import annotations

import torch


def without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of tensors registered twice (iBOT's shared head: last_layer2 is last_layer).

    safetensors refuses aliased tensors; loading the first name restores the shared module for both names.
    """
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out

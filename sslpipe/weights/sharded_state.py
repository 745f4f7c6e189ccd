"""Whole tensors in and out of FSDP2-sharded modules (`torch.distributed.fsdp.fully_shard`), so that a sharded run
writes and reads the same checkpoint files as a DDP run (`sslpipe.weights.state_io`): a run may be resumed sharded
or not, on any number of processes.

Under FSDP2 every parameter is a DTensor that holds one slice (dim 0) per process. Writing gathers the whole tensors
one at a time onto the main process's CPU (a collective: every process calls it; the others drop them); reading hands
every process the whole tensors and keeps its own slice. The optimizer's state stays keyed by parameter index, as in
an unsharded run: its tensors are gathered and sliced like the parameters they belong to, so a parameter without
state (the frozen last layer of DINO's first epoch) is simply absent, as it is in an unsharded run.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from sslpipe.weights.state_dict import without_aliases


def whole(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """The same dict with every DTensor gathered into its whole tensor, moved to the CPU one at a time (a collective:
    call on every process, with the same keys in the same order). `keep=False` (the processes that write nothing):
    take part in the gathers and return {}."""
    out = {}
    for key, value in tensors.items():
        value = value.full_tensor().cpu() if isinstance(value, DTensor) else value
        if keep:
            out[key] = value
    return out


def load_whole(module: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> Any:
    """`module.load_state_dict(state)` that also fills a sharded module from whole tensors (each process keeps its
    slice). Returns what `load_state_dict` returns (missing and unexpected keys)."""
    own = module.state_dict()
    state = {k: distribute_tensor(v.to(own[k].device, own[k].dtype), own[k].device_mesh, own[k].placements)
             if isinstance(own.get(k), DTensor) else v for k, v in state.items()}
    return module.load_state_dict(state, strict=strict)


def gathered_model_state(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The whole state dict of a model, sharded or not, without the second names of shared tensors (a collective
    when sharded; `keep=False`: take part and return {})."""
    return whole(without_aliases(model.state_dict()), keep)


def gathered_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """`optimizer.state_dict()` with whole tensors (a collective when sharded, every process calls it; `keep=False`:
    take part and return an empty state)."""
    sd = optimizer.state_dict()
    state = {}
    for index in sorted(sd["state"]):  # the same order on every process
        entries = whole(sd["state"][index], keep)
        if keep:
            state[index] = entries
    return {"state": state, "param_groups": sd["param_groups"]}


def slice_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """An index-keyed state dict of whole tensors (as every run writes it) with each tensor of a sharded parameter's
    shape cut to this process's slice, ready for `optimizer.load_state_dict` (unchanged for an unsharded one)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sliced = {}
    for index, entries in state["state"].items():
        param = params[int(index)]
        sliced[index] = {
            name: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape
            else value
            for name, value in entries.items()}
    return {"state": sliced, "param_groups": state["param_groups"]}

"""Whole tensors in and out of FSDP2-sharded modules (`torch.distributed.fsdp.fully_shard`), so that a sharded run
writes and reads the same checkpoint files as a DDP run (`sslpipe.weights.state_io`): a run may be resumed sharded
or not, on any number of processes.

Under FSDP2 every parameter is a DTensor that holds one slice (dim 0) per process. Writing gathers the whole tensors
(a collective: every process calls it, the main process keeps them, on the CPU); reading hands every process the
whole tensors and keeps its own slice. The optimizer's state is stored as in an unsharded run, by parameter index in
the order of its groups, and mapped to and from the parameter names that torch's state-dict API speaks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from sslpipe.weights.state_dict import without_aliases

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(module: nn.Module | None) -> bool:
    """Whether any parameter of `module` is a DTensor (the module, or part of it, is FSDP2-sharded)."""
    return module is not None and any(isinstance(p, DTensor) for p in module.parameters())


def whole(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same dict with every DTensor gathered into its whole tensor (a collective: call on every process, with
    the same keys in the same order)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def load_whole(module: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> Any:
    """`module.load_state_dict(state)` that also fills a sharded module from whole tensors (each process keeps its
    slice). Returns what `load_state_dict` returns (missing and unexpected keys)."""
    own = module.state_dict()
    state = {k: distribute_tensor(v.to(own[k].device, own[k].dtype), own[k].device_mesh, own[k].placements)
             if isinstance(own.get(k), DTensor) else v for k, v in state.items()}
    return module.load_state_dict(state, strict=strict)


def gathered_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model on the main process (empty on the others), on the CPU, without the
    second names of shared tensors (told apart before gathering, which copies them)."""
    first_names = without_aliases(model.state_dict())
    return {k: v for k, v in get_model_state_dict(model, options=_GATHER).items() if k in first_names}


def set_model_from_whole(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Fill a sharded model from its whole state dict as `state_io.save_model` wrote it (every process passes the
    same one): strict, except for the second names of shared tensors. `source` names the file in errors."""
    own = model.state_dict()
    aliases = set(own) - set(without_aliases(own))
    missing = set(own) - aliases - set(state)
    unexpected = set(state) - set(own)
    if missing or unexpected:
        raise KeyError(f"{source} does not fit the model: missing {sorted(missing)[:10]}, unexpected "
                       f"{sorted(unexpected)[:10]}")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter of `optimizer`, in its index order (the order of its groups)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state of a sharded model, keyed by parameter index as `optimizer.state_dict()` of an
    unsharded run is, on the main process (empty state on the others)."""
    named = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in named.get("param_groups", [])]
    return {"state": {index[n]: s for n, s in named.get("state", {}).items()}, "param_groups": groups}


def set_optimizer_from_whole(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Fill the optimizer of a sharded model from an index-keyed whole state (as written by an unsharded run)."""
    names = _names(model, optimizer)
    named = {"state": {names[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))

"""Training state as tensors and JSON, never pickles: model weights, optimizer state, RNG states, grad scaler.

accelerate's `save_state` writes the optimizer, the grad scaler and every process's RNG states with `torch.save`
(pickles), and loading a pickle can execute code: a checkpoint from elsewhere would be a program. Here every tensor
goes into a safetensors file and everything else (optimizer hyper-parameters, the python RNG's counters) into the
file's string metadata as JSON, so reading a checkpoint only ever parses numbers.

- model: the unwrapped state dict (shared tensors, e.g. iBOT's shared head, stored once under their first name);
- optimizer: `state.{param index}.{name}` tensors + JSON of the param groups and of non-tensor state values;
- RNG, one file per process: torch CPU and CUDA generator states (uint8 tensors), numpy's MT19937 key (uint32) and
  python's `random` state (625 ints) as int64 tensors, their scalar parts as JSON;
- grad scaler (fp16): its state dict is plain numbers, JSON.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sslpipe.weights.sharded_state import load_whole, slice_optimizer_state
from sslpipe.weights.state_dict import without_aliases


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


# ----------------------------------------------------------------------------------------------------------- model
def save_model(state: dict[str, torch.Tensor], path: Path) -> None:
    """`state`: the model's whole state dict (`sslpipe.weights.sharded_state.gathered_model_state`)."""
    save_file(_cpu(without_aliases(state)), str(path), metadata={"format": "pt"})


def load_model(model: nn.Module, path: Path) -> None:
    """Strict, except for the second names of shared tensors (restored through their first name); a sharded model
    keeps its slices."""
    state = model.state_dict()
    aliases = set(state) - set(without_aliases(state))
    missing, unexpected = load_whole(model, load_file(str(path)), strict=False)
    if unexpected or set(missing) - aliases:
        old_heads = any(k.endswith("last_layer.parametrizations.weight.original0") for k in unexpected) and any(
            k.endswith("last_layer.weight") for k in missing)
        hint = ("; its heads' last layers are weight-normalised, as sslpipe wrote DINOv3 heads before they became "
                "plain Linear layers (as upstream): export the run with `sslpipe export RUN --with-heads` and continue "
                "from it with model.init_from=EXPORT (the heads convert), or finish it with the sslpipe that started "
                "it") if old_heads else ""
        raise ValueError(f"{path} does not fit the model: missing {sorted(set(missing) - aliases)[:10]}, "
                         f"unexpected {sorted(unexpected)[:10]}{hint}")


# ------------------------------------------------------------------------------------------------------- optimizer
def save_optimizer_state(sd: dict[str, Any], path: Path) -> None:
    """An optimizer state dict keyed by parameter index (`optimizer.state_dict()`'s layout; a sharded run's is
    gathered into it, `sslpipe.weights.sharded_state`)."""
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(_cpu(tensors), str(path), metadata=meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    optimizer.load_state_dict(slice_optimizer_state(optimizer, _read_optimizer_state(optimizer, path)))


def _read_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    """The state dict in `path`, checked to fit `optimizer`'s groups (their count and sizes)."""
    meta = _metadata(path)
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(path)).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(meta["scalars"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = json.loads(meta["param_groups"])
    if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(h["params"]) for g, h in zip(groups, optimizer.param_groups)):
        raise ValueError(f"{path}: the optimizer was saved with parameter groups of sizes "
                         f"{[len(g['params']) for g in groups]}, this run has "
                         f"{[len(g['params']) for g in optimizer.param_groups]} (a different model or recipe?)")
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------------------------- RNG
def save_rng(path: Path) -> None:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(mt, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": json.dumps([version, gauss]), "numpy": json.dumps([kind, int(pos), int(has_gauss), cached])}
    save_file(_cpu(tensors), str(path), metadata=meta)


def load_rng(path: Path) -> None:
    meta = _metadata(path)
    tensors = load_file(str(path))
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ---------------------------------------------------------------------------------------------------------- scaler
def save_scaler(scaler: Any, path: Path) -> None:
    path.write_text(json.dumps(scaler.state_dict()))


def load_scaler(scaler: Any, path: Path) -> None:
    scaler.load_state_dict(json.loads(path.read_text()))

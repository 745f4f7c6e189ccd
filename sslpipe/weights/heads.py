"""Projection heads beside an export, so continued pretraining can pick up exactly where a run stopped.

`sslpipe export RUN --with-heads` and `sslpipe import CHECKPOINT OUT --with-heads` write `heads.safetensors` next to
`model.safetensors`: the DINO / iBOT / DINOv2 / DINOv3 heads of the exported network, named as sslpipe's networks name
them (`head.*`; `dino_head.*`, `ibot_head.*`), and record in config.json which method they belong to and their sha256.
The masked-image-modelling methods' trained mask token goes with them (`backbone.mask_token`; iBOT's official
`masked_embed`; a teacher export takes the student's, as the teacher has none), since the backbone export leaves it out.
With `model.init_from=EXPORT`, a recipe of that method starts its student and teacher heads, and its student's mask
token, from them (`<method>.init_heads`); otherwise they start fresh. The official DINO / iBOT / DINOv2 heads keep
their weight-normalised last layers as `weight_g` / `weight_v`; sslpipe's use torch's parametrisation
(`parametrizations.weight.original0` / `original1`). DINOv3's last layers are plain Linear layers (layers/dino_head.py),
in its checkpoints and in sslpipe's DINOv3 heads alike; DINOv3 heads kept as g / v by an earlier sslpipe are turned
back into W = g v / ||v|| on loading.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sslpipe.files import set_default_mode
from sslpipe.weights.export import SAFETENSORS_METADATA, StagedExport, export_paths, rewrite_config, some_keys
from sslpipe.weights.hashing import sha256_file
from sslpipe.weights.state_dict import without_aliases
from sslpipe.weights.verify import file_problems

HEADS_NAME = "heads.safetensors"
# the prefixes of the heads in each method's network (sslpipe's and the official checkpoints' alike)
HEAD_PREFIXES = {"dino": ("head.",), "ibot": ("head.",), "dinov2": ("dino_head.", "ibot_head."),
                 "dinov3": ("dino_head.", "ibot_head.")}
_OFFICIAL_NAMES = {".weight_g": ".parametrizations.weight.original0", ".weight_v": ".parametrizations.weight.original1"}
MASK_TOKEN = "backbone.mask_token"
_MASK_TOKENS = (MASK_TOKEN, "backbone.masked_embed")  # sslpipe, DINOv2 and DINOv3; iBOT's official name


def heads_of(network: dict[str, Tensor], method: str) -> dict[str, Tensor]:
    """The head tensors of a network's state dict (sslpipe's or an official checkpoint's), in sslpipe's names."""
    prefixes = HEAD_PREFIXES.get(method)
    if prefixes is None:
        raise ValueError(f"--with-heads: method {method!r} has no projection heads to keep (dino, ibot, dinov2, "
                         "dinov3 have)")
    heads = {}
    for key, value in without_aliases(network).items():
        if key.startswith(prefixes):
            for old, new in _OFFICIAL_NAMES.items():
                if key.endswith(old):
                    key = key[: -len(old)] + new
            heads[key] = value.detach().cpu().clone()
    if not heads:
        raise ValueError(f"--with-heads: no {' or '.join(prefixes)} tensors in the {method} network")
    token = mask_token_of(network) if method != "dino" else None  # the masked-image-modelling methods
    if token is not None:
        heads[MASK_TOKEN] = token.detach().cpu().clone()
    return heads


def mask_token_of(network: dict[str, Tensor]) -> Tensor | None:
    """The trained mask token of a network's state dict (sslpipe's, DINOv2's, DINOv3's or iBOT's official name), None
    when it has none (iBOT's teacher: `sslpipe import` then takes the student's)."""
    return next((network[k] for k in _MASK_TOKENS if k in network), None)


def _as_built(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with a weight-normalised last layer (g, v) turned into W = g v / ||v|| where the layer built here is a
    plain Linear (DINOv3 heads kept as g / v by an earlier sslpipe)."""
    g_name, v_name = _OFFICIAL_NAMES[".weight_g"], _OFFICIAL_NAMES[".weight_v"]
    out = dict(state)
    for key in [k for k in state if k.endswith(v_name)]:
        plain = key.removesuffix(v_name) + ".weight"
        g_key = key.removesuffix(v_name) + g_name
        if plain in target and key not in target and g_key in state:
            v = out.pop(key)
            out[plain] = out.pop(g_key) * v / v.norm(dim=1, keepdim=True)
    return out


def _record(heads: dict[str, Tensor], method: str) -> dict[str, Any]:
    """config.json's `heads` entry: method, file, count and (masked-image-modelling methods) whether the network had
    a mask token to keep, which `load_heads` reports."""
    record: dict[str, Any] = {"method": method, "file": HEADS_NAME, "tensors": len(heads)}
    if method != "dino":
        record["mask_token"] = MASK_TOKEN in heads
    return record


def _save(heads: dict[str, Tensor], path: Path) -> None:
    save_file(heads, str(path), metadata=SAFETENSORS_METADATA)  # the method: config.json's `heads` records it
    set_default_mode(path)  # safetensors' private temporary file: readable as any file the umask allows


def stage_heads(staged: StagedExport, heads: dict[str, Tensor], method: str) -> None:
    """Add `heads` to an export being written (`sslpipe export --with-heads`): renamed into place with its weights."""
    staged.write(HEADS_NAME, lambda path: _save(heads, path))
    staged.config["heads"] = _record(heads, method)


def write_heads(export: str | Path, heads: dict[str, Tensor], method: str) -> Path:
    """Write `heads` beside an export already in place and record them (method, count, sha256) in its config.json,
    both atomically (`sslpipe export` and `sslpipe import` stage theirs with the weights: `stage_heads`)."""
    weights, config_path = export_paths(export)
    out, tmp = weights.parent / HEADS_NAME, weights.parent / f".tmp-{HEADS_NAME}"
    _save(heads, tmp)
    config = json.loads(config_path.read_text())
    config["heads"] = _record(heads, method)
    config.setdefault("sha256", {})[HEADS_NAME] = sha256_file(tmp)
    tmp.replace(out)
    rewrite_config(config_path, config)
    return out


def fresh_note(net: nn.Module) -> str:
    """What starts fresh in `net` when no heads are loaded: the heads, and a masked-image-modelling student's mask
    token."""
    has_token = getattr(getattr(net, "backbone", None), "mask_token", None) is not None
    return "the heads and the mask token start fresh" if has_token else "the heads start fresh"


def load_heads(net: nn.Module, export: str | Path, method: str) -> list[str]:
    """Copy an export's heads of `method` into `net` (a recipe's network: backbone + heads), tensor for tensor.
    Returns a note; a note and nothing loaded when the export carries no heads or another method's; a ValueError
    naming the export when its heads file differs from the sha256 recorded with it (damaged heads would continue
    pretraining without a word) or its heads do not fit the ones built here."""
    weights, config_path = export_paths(export)
    config = json.loads(config_path.read_text())
    recorded = config.get("heads")
    own_token = getattr(getattr(net, "backbone", None), "mask_token", None)
    fresh = fresh_note(net)
    if not recorded:
        return [f"{export} carries no heads: {fresh} (export with --with-heads to keep them)"]
    if recorded["method"] != method:
        return [f"{export} carries {recorded['method']} heads, not {method}'s: {fresh}"]
    path = weights.parent / recorded["file"]
    digest = (config.get("sha256") or {}).get(recorded["file"])
    table = {recorded["file"]: {"sha256": digest}} if digest else {}
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={export}: {path} is missing though its config.json lists heads: "
                                f"copy it again, or set {method}.init_heads=false to start the heads fresh")
    if file_problems(weights.parent, table):
        raise ValueError(f"model.init_from={export}: {path} does not match the sha256 in its config.json (bit rot, a "
                         f"copy cut short, or modified): copy or export it again, or set {method}.init_heads=false "
                         "to start the heads fresh")
    state = load_file(str(path))
    token = state.pop(MASK_TOKEN, None)
    heads = nn.ModuleDict({name: module for name, module in net.named_children() if name != "backbone"})
    target = heads.state_dict()
    state = _as_built(state, target)
    real = without_aliases(target)  # iBOT's shared head: last_layer2 is last_layer
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in sorted(set(state) & set(target))
              if state[k].shape != target[k].shape]
    missing, unexpected = sorted(set(real) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected or shapes:
        problems = [f"missing in the export: {some_keys(missing, 6)}" if missing else "",
                    f"not built here: {some_keys(unexpected, 6)}" if unexpected else "",
                    f"shape export vs built: {some_keys(shapes, 6)}" if shapes else ""]
        raise ValueError(f"model.init_from={export}: its {method} heads do not fit the heads of this recipe ("
                         + "; ".join(p for p in problems if p) + f"): set {method}.head.* to the export's sizes, or "
                         f"{method}.init_heads=false to start the heads fresh")
    heads.load_state_dict(state, strict=False)
    notes = [f"heads from {export} ({len(state)} tensors)"]
    if own_token is not None:
        if token is None:
            why = ("the network the heads came from had none" if recorded.get("mask_token") is False else
                   "the export's heads carry none: its network had none, or it was written before sslpipe kept "
                   "the token")
            notes.append(f"the mask token starts at zero ({why})")
        elif token.shape != own_token.shape:
            raise ValueError(f"model.init_from={export}: its mask token is {tuple(token.shape)}, the backbone built "
                             f"here takes {tuple(own_token.shape)}: export it again from a run of this architecture")
        else:
            with torch.no_grad():
                own_token.copy_(token)
            notes.append("the mask token from the export")
    return notes

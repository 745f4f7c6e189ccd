"""The key layouts of official self-supervised checkpoints and their mapping onto timm's names (`sslpipe import`,
docs/own_backbone.md). Read from the official code:

- DINO (facebookresearch/dino, main_dino.py) and iBOT (bytedance/ibot, main_ibot.py) save `{'student', 'teacher',
  'optimizer', 'epoch', 'args', 'dino_loss' | 'ibot_loss'[, 'fp16_scaler']}`; a network is a MultiCropWrapper
  (`backbone.` + projection `head.`) and the student -- iBOT's teacher and a BatchNorm DINO teacher too -- sits in DDP
  (`module.`). Their ViT keys are timm's, except iBOT's layer scale `gamma_1/2` and its student's MIM token
  `masked_embed`. Released backbones: DINO a bare state dict, iBOT `{'state_dict': ...}`.
- DINOv2 (facebookresearch/dinov2): a hub backbone is the bare DinoVisionTransformer state dict (`mask_token`,
  `register_tokens` for the `_reg` models, `ls1.gamma`, SwiGLU `mlp.w12/w3` for ViT-g); `block_chunks > 0` nests the
  blocks as `blocks.{chunk}.{index}.`; training saves `{'model': {'student.backbone.', 'teacher.backbone.',
  '*.dino_head.', '*.ibot_head.'}, 'optimizer', 'iteration'}` and `eval/N/teacher_checkpoint.pth` as
  `{'teacher': ...}`. FSDP's per-rank files hold flattened shards (`flat_param`) and are refused.
- MAE (facebookresearch/mae, models_mae.py + util/misc.py): `{'model', 'optimizer', 'epoch', 'scaler', 'args'}`,
  the encoder in timm's names beside the decoder (`decoder_*`) and its `mask_token`.
- DINOv3 (facebookresearch/dinov3): rotary ViTs and ConvNeXts, onto timm by timm's own filters:
  `sslpipe.weights.layouts_dinov3`.

timm's `checkpoint_filter_fn` knows two of the renames (iBOT/DeiT-3 `gamma_` with adapt_layer_scale, DINOv2
registers and SwiGLU), but it also resamples position and patch embeddings silently with its own rule, starts the
DINOv2 conversion only on a `mask_token` key (MAE has one too) and flattens no block chunks; so the renames are
spelled out in `to_timm_names` (tests check them against timm's).

The architecture is then read from the shapes in timm's names (`infer_vit`, `infer_resnet`); the number of attention
heads leaves no trace in any shape, so the standard of the width is taken, and said.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Collection, Mapping

import timm
import torch
from torch import Tensor

FORMATS = ("dino", "ibot", "dinov2", "dinov3", "mae", "timm", "safetensors")
NETWORKS = ("teacher", "student")
_WRAPPERS = re.compile(r"^module\.|(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")
# DINOv2 block chunks hold ViT blocks (`blocks.{chunk}.{index}.attn.qkv`); timm's EfficientNet / MobileNet stages
# are `blocks.{stage}.{index}.` too, but of convolutions, so only this marks the chunked layout.
_VIT_CHUNK = re.compile(r"^blocks\.\d+\.\d+\.attn\.qkv\.weight$")
# timm's Twins-SVT stages are `blocks.{stage}.{index}.` of attention blocks too, but its locally-grouped blocks
# alternate with sub-sampled ones (`attn.q` + `attn.kv`), which DINOv2's chunks never hold.
_TWINS_ATTN = re.compile(r"^blocks\.\d+\.\d+\.attn\.(q|kv)\.weight$")
# Keys of timm architectures that share iBOT's `gamma_1/2` layer scale (Eva incl. every `vit_*_dinov3`, BEiT, CaiT,
# Perception Encoder) and that no iBOT ViT has: registers, split q/v biases, relative position bias, Eva's SwiGLU and
# rotary buffers, CaiT's class-attention blocks, the pre-norm (PE's `norm_pre`).
_TIMM_ONLY = re.compile(r"(^|\.)(reg_token|q_bias|v_bias|relative_position_bias_table|fc1_g\.weight|rope\.\w+|"
                        r"norm_pre\.weight)$|(^|\.)blocks_token_only\.")
# Keys only DINOv3 networks have: RoPE periods, storage tokens, the key-bias mask, the untied local CLS norm, and
# the ConvNeXt's final norm listed again.
_DINOV3 = re.compile(r"(^|\.)(rope_embed\.periods|storage_tokens|local_cls_norm\.weight|attn\.qkv\.bias_mask|"
                     r"norms\.3\.weight)$")
# Top-level entries of training checkpoints that are no network.
_TOP_LEVEL = {"optimizer": "optimizer state", "scaler": "loss-scaler state", "fp16_scaler": "loss-scaler state",
              "epoch": "training progress", "iteration": "training progress", "args": "training arguments",
              "dino_loss": "DINO loss centre", "ibot_loss": "iBOT loss centres"}
# Members of DINOv3's SSLMetaArch beside the chosen network (train/ssl_meta_arch.py).
_BESIDE = {"model_ema": "the teacher again (SSLMetaArch.model_ema is the teacher)",
           "gram_teacher": "the Gram teacher (Gram anchoring's frozen copy of the teacher)",
           "dino_loss": "DINO loss centre", "ibot_patch_loss": "iBOT loss centre"}
# DINOv2's and DINOv3's SSLMetaArch networks: backbone + `dino_head` + `ibot_head`; the backbone's iBOT mask token.
_META_ARCH = (("dino_head.", "DINO head"), ("ibot_head.", "iBOT head"),
              ("mask_token", "mask token of masked image modelling (training only)"))
# What a format holds beside its backbone: (key or key prefix, why it is not exported).
_NOT_BACKBONE = {
    "dino": (("head.", "DINO projection head"),),
    "ibot": (("head.", "iBOT projection head"), ("masked_embed", "mask token of masked image modelling (training "
                                                                "only)")),
    "dinov2": _META_ARCH,
    "dinov3": _META_ARCH,
    "mae": (("decoder_", "MAE decoder (pretraining only)"), ("mask_token", "mask token of the MAE decoder")),
}


# Attention heads of the standard ViT widths (DINO, iBOT, MAE, DINOv2, timm); other widths: 64 channels per head.
_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}
_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1408: "giant", 1536: "giant"}
# (blocks per stage, bottleneck) -> torchvision / timm ResNet (same key names; DINO's ResNet-50 is torchvision's).
_RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
            ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152"}


class UnusableCheckpoint(ValueError):
    """A checkpoint `sslpipe import` cannot turn into an export; the message names the file, the keys and the fix."""


@dataclass(frozen=True)
class Dropped:
    """Entries of the checkpoint left out of the export: a top-level entry, a key or a `prefix*` group."""

    entry: str
    tensors: int
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"entry": self.entry, "tensors": self.tensors, "why": self.why}


def _strip_wrappers(key: str) -> str:
    """`module.` (DDP), `_orig_mod.` (torch.compile), FSDP / activation-checkpoint wrappers out of a key."""
    return _WRAPPERS.sub(lambda m: m.group(1) or "", key)


def _count(value: Any) -> int:
    if isinstance(value, Tensor):
        return 1
    return sum(_count(v) for v in value.values()) if isinstance(value, Mapping) else 0


def _pick(available: list[str], which: str | None, path: Any) -> str:
    if which is None:
        return "teacher" if "teacher" in available else available[0]
    if which not in available:
        raise UnusableCheckpoint(f"{path} holds only the {' and '.join(available)}: leave --which out or pass "
                                 f"--which {available[0]}")
    return which


def select_network(ckpt: Mapping[str, Any], which: str | None, path: Any) -> tuple[dict, str | None, list[Dropped]]:
    """(the chosen network's tensors with wrapper prefixes removed, "teacher" | "student" | None, the entries left
    out). A file of tensors is the network; otherwise `teacher`/`student`, then `model`, `state_dict` or `module`,
    and inside those `teacher.`/`student.` prefixes (DINOv2 training), pick it."""
    dropped: list[Dropped] = []
    at_top = {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    networks = [n for n in NETWORKS if isinstance(ckpt.get(n), Mapping)]
    container = next((k for k in ("model", "state_dict", "module") if isinstance(ckpt.get(k), Mapping)), None)
    if at_top:
        net, chosen, taken = at_top, None, set(at_top)
    elif networks:
        chosen = _pick(networks, which, path)
        net, taken = dict(ckpt[chosen]), {chosen}
    elif container is not None:
        net, chosen, taken = dict(ckpt[container]), None, {container}
        inner = [n for n in NETWORKS if any(k.startswith(n + ".") for k in net)]
        if inner:
            chosen = _pick(inner, which, path)
            groups: dict[str, int] = {}
            for key in net:
                if not key.startswith(chosen + "."):
                    label = f"{container}.{key.split('.')[0]}.*"
                    groups[label] = groups.get(label, 0) + 1
            dropped += [Dropped(label, n, f"the {label.split('.')[1]} (--which {label.split('.')[1]} imports it)"
                                if label.split(".")[1] in NETWORKS else _BESIDE.get(label.split(".")[1],
                                                                                     f"not in the {chosen}"))
                        for label, n in groups.items()]
            net = {k[len(chosen) + 1:]: v for k, v in net.items() if k.startswith(chosen + ".")}
    else:
        raise UnusableCheckpoint(f"{path} holds no network: top-level entries {sorted(map(str, ckpt))[:12]}; "
                                 "expected a state dict or `teacher`/`student`/`model`/`state_dict` (pass the file "
                                 "that holds the backbone weights)")
    if which is not None and chosen is None:
        raise UnusableCheckpoint(f"{path} holds a single network (no teacher/student): leave --which out")
    for key, value in ckpt.items():
        if key in taken:
            continue
        why = (f"the {key} (--which {key} imports it)" if key in NETWORKS else
               _TOP_LEVEL.get(key, "not the network imported" if _count(value) else "not a network"))
        dropped.append(Dropped(str(key), _count(value), why))
    tensors = {}
    for key, value in net.items():
        if "flat_param" in key:
            raise UnusableCheckpoint(
                f"{path} is an FSDP shard of flattened parameters (key {key}): use a consolidated checkpoint "
                "(DINOv2: eval/N/teacher_checkpoint.pth) or save the model's full state dict first")
        if isinstance(value, Tensor):
            tensors[_strip_wrappers(key)] = value
        else:
            dropped.append(Dropped(key, _count(value), "not a tensor"))
    return tensors, chosen, dropped


def _cls_position_table(net: Mapping[str, Tensor]) -> bool:
    """A `pos_embed` of 1 + a square grid beside a `cls_token` of the same network (as official iBOT's always is)."""
    for key, pos in net.items():
        if key.split(".")[-1] != "pos_embed" or pos.dim() != 3:
            continue
        prefix = key[: -len("pos_embed")]
        if prefix + "cls_token" in net and square(pos.shape[1] - 1) is not None:
            return True
    return False


def detect_format(ckpt: Mapping[str, Any], net: Mapping[str, Tensor], suffix: str) -> str:
    """The official layout a checkpoint follows, from its keys (all networks in it, wrappers removed); "timm" /
    "safetensors" when none matches. Each marker is one no timm architecture shares, since timm layouts are
    imported unrenamed."""
    keys: set[str] = set(net)
    for value in ckpt.values():
        if isinstance(value, Mapping):
            keys |= {_strip_wrappers(str(k)) for k in value}
    mask = net.get("mask_token")
    if any(_DINOV3.search(k) for k in keys):
        return "dinov3"
    # iBOT's layer scale only in a ViT whose position table holds the CLS position (official iBOT: 1 + a square grid,
    # with a cls_token) and with no timm-only key: timm's Eva without rotary keys (vit_*_rope_ape, PE) has `gamma_1`
    # and a grid-only table too
    ibot_gamma = (any(k.endswith(".gamma_1") for k in keys) and _cls_position_table(net)
                  and not any(_TIMM_ONLY.search(k) for k in keys))
    if "ibot_loss" in ckpt or ibot_gamma or any(k.endswith("masked_embed") or "last_layer2." in k for k in keys):
        return "ibot"
    twins = any(_TWINS_ATTN.match(k) for k in keys)
    if any("register_tokens" in k or "dino_head." in k or "ibot_head." in k or ".mlp.w12." in k
           or (not twins and _VIT_CHUNK.match(k.removeprefix("backbone."))) for k in keys) \
            or (mask is not None and mask.dim() == 2):
        return "dinov2"
    if any(k.startswith("decoder_") for k in keys) or (mask is not None and mask.dim() == 3):
        return "mae"
    if "dino_loss" in ckpt or any(n in ckpt for n in NETWORKS) or any(".last_layer.weight_" in k for k in keys):
        return "dino"
    return "safetensors" if suffix == ".safetensors" else "timm"


def backbone_state(net: Mapping[str, Tensor], fmt: str) -> tuple[dict[str, Tensor], list[Dropped]]:
    """The backbone's tensors (under `backbone.` when the network wraps one) and, grouped, what else the network
    holds: projection heads, decoders, mask tokens."""
    rules = _NOT_BACKBONE.get(fmt, ())
    wrapped = any(k.startswith("backbone.") for k in net)
    groups: dict[str, list[Any]] = {}
    state = {}
    for key, value in net.items():
        inside = key.removeprefix("backbone.") if wrapped else key
        rule = next(((p, why) for p, why in rules if inside == p or (p.endswith((".", "_")) and inside.startswith(p))),
                    None)
        if wrapped and not key.startswith("backbone."):
            rule = rule or (key.split(".")[0] + ".", "beside the backbone in the training wrapper")
        if rule is None:
            state[inside] = value
            continue
        label = rule[0] if not rule[0].endswith((".", "_")) else rule[0] + "*"
        groups.setdefault(label, [0, rule[1]])[0] += 1
    return state, [Dropped(label, n, why) for label, (n, why) in groups.items()]


def to_timm_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official names -> timm's: DINOv2 block chunks flattened, iBOT's `gamma_1/2` -> `ls1/2.gamma`, DINOv2's SwiGLU
    `w12/w3` -> `fc1/fc2` (timm's SwiGLUPacked) and registers into timm's layout (`reg_token`; no position for the
    prefix tokens, so the CLS position is folded into `cls_token`), as timm's `_convert_dinov2` does."""
    out = {}
    chunked = any(_VIT_CHUNK.match(k) for k in state)
    for key, value in state.items():
        key = _CHUNKED.sub(r"blocks.\1.", key) if chunked else key
        key = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key))
        out[key] = value
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        if "cls_token" in out and "pos_embed" in out:
            out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
            out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def square(n: int) -> int | None:
    """The side of a square grid of `n` positions, None when `n` is no square."""
    side = math.isqrt(max(n, 0))
    return side if side > 0 and side * side == n else None


def native_size(state: Mapping[str, Tensor]) -> int | None:
    """Input size of a ViT's own position grid (grid x patch), None for models without one."""
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        return None
    n = state["pos_embed"].shape[1]
    prefix = ("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    grid = square(n - prefix) or square(n)
    return grid * state["patch_embed.proj.weight"].shape[-1] if grid else None


def mlp_ratio(hidden: int, dim: int) -> float:
    """The `mlp_ratio` for which timm's `int(dim * mlp_ratio)` is `hidden` (hidden / dim, one ulp up where the
    division rounds down)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else math.nextafter(ratio, math.inf)


def infer_vit(state: Mapping[str, Tensor], fmt: str) -> tuple[str, dict[str, Any], int, list[str]]:
    """(timm name, model arguments, patch size, notes) of a ViT in timm's names. Every structural argument is
    written out, so the name only supplies what no shape shows (norm eps, activation; SwiGLU for ViT-g)."""
    try:
        dim, chans, patch, patch_w = state["patch_embed.proj.weight"].shape
        fc1, fc2 = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc2.weight"]
    except (KeyError, ValueError) as err:
        raise UnusableCheckpoint(f"cannot read a ViT's architecture from these keys (no {err}): pass --arch") from err
    heads = _HEADS.get(dim) or (dim // 64 if dim % 64 == 0 else 0)
    if not heads or patch != patch_w:
        raise UnusableCheckpoint(f"cannot tell the architecture of a width-{dim} ViT with {patch}x{patch_w} patches "
                                 "from the shapes: pass --arch TIMM_NAME")
    swiglu = fc1.shape[0] == 2 * fc2.shape[1]  # packed SwiGLU (DINOv2 ViT-g): fc1 gives value and gate
    ratio = mlp_ratio(fc1.shape[0], dim)
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    n_pos = state["pos_embed"].shape[1] if "pos_embed" in state else 0
    args: dict[str, Any] = {
        "embed_dim": dim, "depth": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
        "num_heads": heads, "init_values": 1e-5 if "blocks.0.ls1.gamma" in state else None, "reg_tokens": regs,
        "no_embed_class": square(n_pos - ("cls_token" in state) - regs) is None and square(n_pos) is not None,
    }
    if ratio != 4.0:
        args["mlp_ratio"] = ratio
    for key, arg in (("blocks.0.attn.qkv.bias", "qkv_bias"), ("blocks.0.attn.proj.bias", "proj_bias")):
        if key not in state:
            args[arg] = False
    if chans != 3:
        args["in_chans"] = chans
    if "cls_token" not in state:
        args.update(class_token=False, global_pool="avg")
    if "fc_norm.weight" in state:  # mean pooling (iBOT use_mean_pooling, MAE fine-tuning)
        args["global_pool"] = "avg"
    if "norm_pre.weight" in state:
        args["pre_norm"] = True
    size = _SIZES.get(dim, "base")
    names = ["vit_giant_patch14_dinov2"] if swiglu else [
        *([f"vit_{size}_patch14{'_reg4' if regs == 4 else ''}_dinov2"] if fmt == "dinov2" else []),
        f"vit_{size}_patch{patch}_224", f"vit_{size}_patch16_224", "vit_base_patch16_224"]
    notes = [f"num_heads={heads}: the standard for width {dim} (heads leave no trace in the shapes; pass --arch if "
             "yours differ)"]
    return next(n for n in names if timm.is_model(n)), args, patch, notes


def infer_resnet(state: Mapping[str, Tensor]) -> str:
    """torchvision / timm ResNet name from the blocks per stage (DINO's ResNet-50 is torchvision's)."""
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    arch = _RESNETS.get((counts, bottleneck))
    if arch is None:
        raise UnusableCheckpoint(f"a ResNet with {counts} blocks per stage is not a standard depth: pass --arch")
    if arch in ("resnet50", "resnet101") and state["layer1.0.conv1.weight"].shape[0] == 128:
        arch = f"wide_{arch}_2"
    return arch


# Hugging Face transformers' DINOv2 names (models/dinov2/convert_dinov2_to_hf.py, as the hub files and save_pretrained
# have them; also the in-memory names of transformers 5, `q_proj`, `gate_proj`, ...) -> the official ones, each block
# `encoder.layer.{i}.` -> `blocks.{i}.`.
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
             "layer_scale1": "ls1", "layer_scale2": "ls2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3", "mlp.down_proj": "mlp.w3"}
# (query, key, value) -> qkv and (gate, up) -> SwiGLU's packed w12, concatenated in that order
_HF_CONCAT = {("attention.attention.query", "attention.attention.key", "attention.attention.value"): "attn.qkv",
              ("attention.q_proj", "attention.k_proj", "attention.v_proj"): "attn.qkv",
              ("mlp.gate_proj", "mlp.up_proj"): "mlp.w12"}
HF_MAPPED = ("dinov2", "dinov2_with_registers")
_HF_BLOCK_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def split_transformers_keys(state: Mapping[str, Tensor], top: Mapping[str, str], layer: re.Pattern[str],
                            block_names: Mapping[str, str], grouped: Collection[str]
                            ) -> tuple[dict[str, Tensor], dict[tuple[int, str, str], Tensor], list[str]]:
    """A transformers state dict sorted for the official names (DINOv2's and DINOv3's mappings): the `top` keys and
    the `block_names` of each layer renamed (`layer` matches (index, module, weight|bias|lambda1); layer scales'
    `lambda1` become `gamma`), the `grouped` modules' tensors by (index, module, kind) for the caller to
    concatenate, and the keys neither knows."""
    out: dict[str, Tensor] = {}
    parts: dict[tuple[int, str, str], Tensor] = {}
    other: list[str] = []
    for key, value in state.items():
        found = layer.match(key)
        if key in top:
            out[top[key]] = value
        elif found is None:
            other.append(key)
        else:
            index, name, kind = int(found.group(1)), found.group(2), found.group(3)
            kind = "gamma" if kind == "lambda1" else kind
            if name in block_names:
                out[f"blocks.{index}.{block_names[name]}.{kind}"] = value
            elif name in grouped:
                parts[(index, name, kind)] = value
            else:
                other.append(key)
    return out, parts, other


def transformers_to_official(state: Mapping[str, Tensor], config: Mapping[str, Any], path: Any
                             ) -> tuple[dict[str, Tensor], list[Dropped], int]:
    """A transformers `Dinov2Model` / `Dinov2WithRegistersModel` state dict (a `save_pretrained` folder) in the
    official DINOv2 names, what was left out, and the number of heads from its config.json (no shape shows it).
    Refused: settings timm's DINOv2 ViTs do not compute (another activation or norm eps)."""
    model_type = config.get("model_type")
    act, eps = config.get("hidden_act", "gelu"), float(config.get("layer_norm_eps", 1e-6))
    if act != "gelu" or eps != 1e-6:
        raise UnusableCheckpoint(f"{path}: its config.json sets hidden_act={act!r}, layer_norm_eps={eps:g}; timm's "
                                 "DINOv2 ViTs compute gelu and eps 1e-6: import the official .pth instead")
    prefix = f"{model_type}."
    out, parts, other = split_transformers_keys({k.removeprefix(prefix): v for k, v in state.items()}, _HF_TOP,
                                                _HF_BLOCK_KEY, _HF_BLOCK, {n for g in _HF_CONCAT for n in g})
    for index, name, kind in sorted(parts):
        group = next((g for g in _HF_CONCAT if name == g[0]), None)
        if group is None:
            continue  # a later member of a group, concatenated with its first
        pieces = [parts.get((index, member, kind)) for member in group]
        if any(p is None for p in pieces):
            raise UnusableCheckpoint(f"{path}: encoder.layer.{index}.{name}.{kind} without all of {list(group)}: "
                                     "not a complete transformers DINOv2 layer")
        out[f"blocks.{index}.{_HF_CONCAT[group]}.{kind}"] = torch.cat(pieces, dim=0)
    heads = [k for k in other if k.startswith("classifier.")]
    dropped = [Dropped("classifier.*", len(heads), "classifier of the transformers model")] if heads else []
    unknown = [k for k in other if not k.startswith("classifier.")]
    if unknown:
        raise UnusableCheckpoint(f"{path}: keys a transformers {model_type} backbone does not have: "
                                 f"{', '.join(unknown[:6])}; import the official .pth instead")
    return out, dropped, int(config["num_attention_heads"])

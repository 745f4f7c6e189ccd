"""The DINOv3 layout (facebookresearch/dinov3) onto timm's `vit_*_dinov3` (Eva) and ConvNeXt (`sslpipe import`,
docs/own_backbone.md). Read from the official code:

- ViT (models/vision_transformer.py DinoVisionTransformer, layers/): `cls_token`, `storage_tokens` (4 in every
  release), `mask_token` (masked image modelling), `rope_embed.periods` (the rotary periods, a persistent buffer),
  blocks `norm1`, `attn.qkv` (with `bias_mask` where mask_k_bias: the key bias is multiplied by 0), `attn.proj`,
  `ls1/ls2.gamma`, `mlp.fc1/fc2` or SwiGLU `mlp.w1/w2/w3`, the final `norm`; `local_cls_norm` where
  untie_global_and_local_cls_norm (the local crops' CLS, training only), `cls_norm` where untie_cls_and_patch_norms.
  The hub backbones (hub/backbones.py) are that state dict bare.
- ConvNeXt (models/convnext.py), the distilled releases: facebookresearch/ConvNeXt's names (`downsample_layers`,
  `stages.S.B.dwconv/norm/pwconv1/pwconv2/gamma`, `norm`) and `norms.3`, the final norm listed again for
  get_intermediate_layers.
- Training (train/ssl_meta_arch.py, train/train.py): SSLMetaArch's `{student, teacher, model_ema (the teacher again),
  gram_teacher, dino_loss, ibot_patch_loss}` with `backbone`, `dino_head`, `ibot_head`, saved with
  torch.distributed.checkpoint as a folder (`dcp_to_torch` makes it one `{'model', 'optimizer', 'iteration'}` file);
  do_test's `eval/N/teacher_checkpoint.pth` is `{'teacher': ...}`.

timm's `checkpoint_filter_fn`s make the renames and are used as they are: eva's (storage_tokens -> reg_token,
ls1/2.gamma -> gamma_1/2, qkv.bias -> q_bias + v_bias, w1/w2/w3 -> fc1_g/fc1_x/fc2) and convnext's (stem, stages,
downsample, conv_dw, mlp.fc, norm -> head.norm). Added here: what they drop silently is checked first and reported
(the RoPE periods equal timm's, the key bias is masked or zero, zero q/v biases for the variant without them, `norms.3`
is `norm`); eva's filter takes its DINOv3 path only on a `storage_tokens` key, so a network without storage tokens gets
an empty one; and the architecture is read from the shapes: width, depth, heads (4 x the RoPE periods is the head
width), MLP or SwiGLU and its width, storage tokens, layer scale, q/v biases, the RoPE base (from the periods).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import timm
import torch
from timm.models import convnext, eva
from torch import Tensor, nn

from sslpipe.weights.layouts import Dropped, UnusableCheckpoint, mlp_ratio, split_transformers_keys

# The DINOv3 widths: timm's name for them and the released heads (hub/backbones.py), used without RoPE periods.
_SIZES = {384: "small", 768: "base", 1024: "large", 1280: "huge_plus", 4096: "7b"}
_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}
# (depths, dims) of the distilled ConvNeXts (models/convnext.py convnext_sizes), timm's names.
_CONVNEXTS = {((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_tiny", ((3, 3, 27, 3), (96, 192, 384, 768)):
              "convnext_small", ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_base",
              ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_large"}
_QKV_BIAS = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.bias$")


def _is_convnext(state: Mapping[str, Tensor]) -> bool:
    return "downsample_layers.0.0.weight" in state


def _depth(state: Mapping[str, Tensor], prefix: str) -> int:
    """How many numbered children `prefix` has (blocks of a ViT, blocks of a ConvNeXt stage)."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _effective_qkv_biases(state: Mapping[str, Tensor], path: Any) -> dict[int, Tensor]:
    """The qkv bias each block adds, per block: `bias * bias_mask` as LinearKMaskedBias computes it, the bias itself
    without a mask. Refused: a mask never filled (NaN) and a key bias, which timm's Eva fixes at zero."""
    out = {}
    for key, bias in state.items():
        found = _QKV_BIAS.match(key)
        if found is None:
            continue
        mask = state.get(key + "_mask")
        value = bias * mask.to(bias.dtype) if mask is not None else bias
        if value.isnan().any():
            raise UnusableCheckpoint(f"{path}: {key}_mask holds NaN, its value before init_weights: save the network "
                                     "after its weights are initialised or loaded")
        if value.chunk(3)[1].any():
            raise UnusableCheckpoint(
                f"{path}: {key} has a non-zero key bias (trained with mask_k_bias false); timm's Eva fixes the key "
                "bias at zero, and with rotary embeddings it changes the attention: no timm architecture computes "
                "this network")
        out[int(found.group(1))] = value
    return out


def _has_qv_bias(biases: Mapping[int, Tensor]) -> bool:
    return any(bool(b.any()) for b in biases.values())


def _periods(base: float, n: int) -> Tensor:
    return base ** (torch.arange(n, dtype=torch.float64) / n)


def _same_periods(ours: Tensor, theirs: Tensor) -> bool:
    """Equal to the checkpoint's precision (the official code computes them in pos_embed_rope_dtype)."""
    eps = torch.finfo(theirs.dtype).eps
    return ours.shape == theirs.shape and torch.allclose(ours.double(), theirs.double(), rtol=2 * eps, atol=0)


def _rope_temperature(periods: Tensor, path: Any) -> float:
    """The RoPE base of the official periods `base ** (k / n)`, k < n (pos_embed_rope_base): the whole number when
    it gives them (bfloat16 periods blur the base), else the base they give. The min/max-period schedule, which
    timm's vit_*_dinov3 cannot be given, is refused."""
    n = periods.numel()
    estimate = float(periods[-1].double() ** (n / (n - 1))) if n > 1 else 0.0
    for base in (float(round(estimate)), estimate):
        if base > 0 and _same_periods(_periods(base, n), periods):
            return base
    raise UnusableCheckpoint(f"{path}: its RoPE periods {[round(p, 4) for p in periods.tolist()[:3]]}... follow no "
                             "base (pos_embed_rope_min_period/max_period?), which timm's vit_*_dinov3 cannot be given")


def infer_dinov3(state: Mapping[str, Tensor], path: Any) -> tuple[str, dict[str, Any], int | None, list[str]]:
    """(timm name, model arguments, patch size or None, notes) of a DINOv3 ViT or ConvNeXt in the official names.
    Every structural argument is written out; the name supplies the rest (norm eps 1e-5, the rotary layout)."""
    if _is_convnext(state):
        depths = tuple(_depth(state, f"stages.{s}.") for s in range(4))
        dims = tuple(int(state[f"stages.{s}.0.dwconv.weight"].shape[0]) for s in range(4))
        args: dict[str, Any] = {"depths": list(depths), "dims": list(dims)}
        if "stages.0.0.gamma" not in state:
            args["ls_init_value"] = None
        if state["downsample_layers.0.0.weight"].shape[1] != 3:
            args["in_chans"] = int(state["downsample_layers.0.0.weight"].shape[1])
        return _CONVNEXTS.get((depths, dims), "convnext_tiny"), args, None, []
    swiglu = "blocks.0.mlp.w1.weight" in state
    try:
        dim, chans, patch, patch_w = state["patch_embed.proj.weight"].shape
        hidden = state["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise UnusableCheckpoint(f"{path}: no DINOv3 ViT or ConvNeXt in these keys (no {err}): leave --format out, "
                                 "or pass --arch") from err
    if patch != patch_w:
        raise UnusableCheckpoint(f"{path}: {patch}x{patch_w} patches: pass --arch TIMM_NAME")
    periods = state.get("rope_embed.periods")
    if periods is not None and dim % (4 * periods.numel()) == 0:
        heads = dim // (4 * periods.numel())
        how = f"from the RoPE periods ({periods.numel()} per head: head width {4 * periods.numel()})"
    else:
        heads, how = _HEADS.get(dim, dim // 64), "the release of this width (no RoPE periods in the checkpoint)"
    qkvb = _has_qv_bias(_effective_qkv_biases(state, path))
    args = {"embed_dim": int(dim), "depth": _depth(state, "blocks."), "num_heads": int(heads), "qkv_bias": qkvb,
            "mlp_ratio": mlp_ratio(hidden, dim), "swiglu_mlp": swiglu,
            "num_reg_tokens": int(state["storage_tokens"].shape[1]) if "storage_tokens" in state else 0,
            "init_values": 1e-5 if "blocks.0.ls1.gamma" in state else None}
    if swiglu:
        args["swiglu_align_to"] = 1  # the width read is exact (timm rounds up to this); non-zero: w1/w2 kept apart
    if periods is not None:
        args["rope_temperature"] = _rope_temperature(periods, path)
    if chans != 3:
        args["in_chans"] = int(chans)
    size = "small_plus" if dim == 384 and swiglu else _SIZES.get(int(dim), "base")
    suffix = "_qkvb" if qkvb else ""
    name = f"vit_{size}_patch16_dinov3{suffix}"
    return (name if timm.is_model(name) else f"vit_base_patch16_dinov3{suffix}"), args, int(patch), \
        [f"num_heads={heads}: {how}"]


def _vit_to_timm(state: dict[str, Tensor], module: nn.Module, arch: str, path: Any
                 ) -> tuple[dict[str, Tensor], list[Dropped], list[str]]:
    rope = getattr(module, "rope", None)
    if not isinstance(getattr(rope, "periods", None), Tensor):
        raise UnusableCheckpoint(f"{path} is a DINOv3 ViT with rotary position embeddings; {arch} has none: name a "
                                 "vit_*_dinov3 architecture with --arch, or leave --arch out")
    if any(k.startswith("cls_norm.") for k in state):
        raise UnusableCheckpoint(f"{path}: its CLS token has a final norm of its own (`cls_norm`, "
                                 "untie_cls_and_patch_norms), which timm's Eva does not have")
    dropped: list[Dropped] = []
    notes: list[str] = []
    periods = state.pop("rope_embed.periods", None)
    if periods is not None:
        if not _same_periods(rope.periods, periods):
            raise UnusableCheckpoint(
                f"{path}: its {periods.numel()} RoPE periods (head width {4 * periods.numel()}) are not those of "
                f"{arch} ({rope.periods.numel()}, rope_temperature={rope.temperature:g}): leave --arch out to read "
                "the architecture from the checkpoint")
        dropped.append(Dropped("rope_embed.periods", 1, "RoPE periods: timm computes the same "
                                                        f"(rope_temperature={rope.temperature:g})"))
        if periods.dtype != torch.float32:
            notes.append(f"the RoPE periods are {periods.dtype} (pos_embed_rope_dtype): the official network rotates "
                         "in that precision, timm in float32, and timm computes the periods exactly where the "
                         "checkpoint stores them rounded, so the features differ from the official network's even in "
                         "float32 (about 0.3 % of their scale, measured on a ViT-S)")
    biases = _effective_qkv_biases(state, path)
    keep = module.blocks[0].attn.q_bias is not None
    if not keep and _has_qv_bias(biases):
        raise UnusableCheckpoint(f"{path}: its q/v biases are not zero and {arch} has none: pass --arch "
                                 f"{arch.removesuffix('_qkvb')}_qkvb, or leave --arch out")
    masks = [k for k in state if k.endswith(".attn.qkv.bias_mask")]
    local = [k for k in state if k.startswith("local_cls_norm.")]
    for key in masks + local:
        del state[key]
    for index, value in biases.items():
        if keep:
            state[f"blocks.{index}.attn.qkv.bias"] = value  # masked; timm's filter splits it into q_bias and v_bias
        else:
            del state[f"blocks.{index}.attn.qkv.bias"]
    if masks:
        dropped.append(Dropped("blocks.*.attn.qkv.bias_mask", len(masks), "key-bias mask (mask_k_bias): applied; "
                                                                          "the key bias is zero in timm"))
    if biases and not keep:
        dropped.append(Dropped("blocks.*.attn.qkv.bias", len(biases), "qkv biases, all zero: the variant without "
                                                                      "them computes the same"))
    if local:
        dropped.append(Dropped("local_cls_norm.*", len(local), "the local crops' CLS norm (training only)"))
    # eva's filter resamples another patch size silently (resample_patch_embed): a patch size is no resize
    theirs, ours = state.get("patch_embed.proj.weight"), module.patch_embed.proj.weight
    if theirs is not None and tuple(theirs.shape[-2:]) != tuple(ours.shape[-2:]):
        raise UnusableCheckpoint(f"{path}: its patches are {theirs.shape[-1]} px, {arch} has {ours.shape[-1]} px "
                                 "patches, and a patch embedding cannot be resampled into the same network: leave "
                                 "--arch out to read the architecture from the checkpoint, or name one with its patch "
                                 "size")
    empty = "storage_tokens" not in state and "cls_token" in state
    if empty:  # eva's filter takes its DINOv3 path on this key alone
        state["storage_tokens"] = state["cls_token"][:, :0]
    out = eva.checkpoint_filter_fn(state, module)
    if empty:
        del out["reg_token"]
    return out, dropped, notes


def _convnext_to_timm(state: dict[str, Tensor], module: nn.Module, path: Any
                      ) -> tuple[dict[str, Tensor], list[Dropped]]:
    again = {k: state.pop(k) for k in [k for k in state if k.startswith("norms.")]}
    for key, value in again.items():
        twin = state.get(re.sub(r"^norms\.\d+\.", "norm.", key))
        if twin is None or not torch.equal(value, twin):
            raise UnusableCheckpoint(f"{path}: {key} is not the final norm (`norm`), as ConvNeXt.norms[3] is: not an "
                                     "official DINOv3 ConvNeXt")
    dropped = [Dropped("norms.*", len(again), "the final norm again (ConvNeXt.norms[3] is norm)")] if again else []
    return convnext.checkpoint_filter_fn(state, module), dropped


def dinov3_to_timm(state: Mapping[str, Tensor], module: nn.Module, arch: str, path: Any
                   ) -> tuple[dict[str, Tensor], list[Dropped], list[str]]:
    """The official backbone's tensors (heads and mask token already out) in the names of `module`, timm's `arch`,
    what was left out and why, and notes."""
    if _is_convnext(state):
        out, dropped = _convnext_to_timm(dict(state), module, path)
        return out, dropped, []
    return _vit_to_timm(dict(state), module, arch, path)


# Hugging Face transformers' DINOv3 ViT names (models/dinov3_vit/modeling_dinov3_vit.py, DINOv3ViTModel; on disk its
# blocks are `layer.{i}.`, in memory `model.layer.{i}.`) -> the official ones, each block -> `blocks.{i}.`.
HF_DINOV3 = ("dinov3_vit",)
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.register_tokens": "storage_tokens",
           "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
           "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_HF_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")


def _hf_block_names(gated: bool) -> dict[str, str]:
    """transformers' block module names -> the official ones; the gated MLP is SwiGLU's w1 (gate), w2 (up), w3."""
    mlp = ({"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"} if gated
           else {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"})
    return {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "layer_scale1": "ls1",
            "layer_scale2": "ls2", **mlp}


def _hf_refusals(config: Mapping[str, Any], path: Any) -> tuple[bool, int]:
    """(gated MLP, head width) of a DINOv3ViTConfig; refused in one line: what timm's vit_*_dinov3 cannot compute
    (another activation or norm eps, non-square patches, a head width RoPE cannot split in four)."""
    gated = bool(config.get("use_gated_mlp", False))
    act, eps = config.get("hidden_act", "gelu"), float(config.get("layer_norm_eps", 1e-5))
    patch = config.get("patch_size", 16)
    dim, heads = int(config.get("hidden_size", 384)), int(config.get("num_attention_heads", 6))
    wanted = "silu" if gated else "gelu"
    problem = (f"hidden_act={act!r} with use_gated_mlp={gated} (timm computes {wanted})" if act != wanted
               else f"layer_norm_eps={eps:g} (timm's is 1e-5)" if eps != 1e-5
               else f"patch_size={patch} (not square)" if isinstance(patch, (list, tuple)) and len(set(patch)) != 1
               else f"a head width of {dim}/{heads} (RoPE needs a multiple of 4)" if dim % heads or dim // heads % 4
               else None)
    if problem is not None:
        raise UnusableCheckpoint(f"{path}: its config.json sets {problem}, which timm's vit_*_dinov3 cannot compute: "
                                 "import the official DINOv3 .pth instead")
    return gated, dim // heads


def transformers_to_official_dinov3(state: Mapping[str, Tensor], config: Mapping[str, Any], path: Any
                                    ) -> dict[str, Tensor]:
    """A transformers `DINOv3ViTModel` state dict (the hub's facebook/dinov3-vit*, a `save_pretrained` folder) in
    the official DINOv3 names, so `infer_dinov3` and `dinov3_to_timm` read it as any official backbone. What no key
    holds is written as the official network has it: the RoPE periods from rope_theta and the head width (transformers
    computes them, as timm does), zero biases where the config turns one off (query/key/value/proj/mlp_bias), an
    empty storage-token set left out. A key bias is kept: a non-zero one is refused later, as timm fixes it at zero."""
    gated, head_dim = _hf_refusals(config, path)
    out, qkv, other = split_transformers_keys(state, _HF_TOP, _HF_LAYER, _hf_block_names(gated), _HF_QKV)
    if other:
        raise UnusableCheckpoint(f"{path}: keys a transformers DINOv3ViTModel does not have: {', '.join(other[:6])}; "
                                 "import the official DINOv3 .pth instead")
    if "mask_token" in out:
        out["mask_token"] = out["mask_token"].reshape(1, -1)  # the official shape (DinoVisionTransformer)
    if "storage_tokens" in out and out["storage_tokens"].shape[1] == 0:
        del out["storage_tokens"]
    for index in sorted({i for i, _, _ in qkv}):
        weights = [qkv.get((index, name, "weight")) for name in _HF_QKV]
        if any(w is None for w in weights):
            raise UnusableCheckpoint(f"{path}: layer.{index}.attention without all of q_proj, k_proj, v_proj "
                                     "weights: not a complete transformers DINOv3 layer")
        out[f"blocks.{index}.attn.qkv.weight"] = torch.cat(weights, dim=0)
        biases = [qkv.get((index, name, "bias")) for name in _HF_QKV]
        if any(b is not None for b in biases):
            out[f"blocks.{index}.attn.qkv.bias"] = torch.cat(
                [b if b is not None else weights[0].new_zeros(weights[0].shape[0]) for b in biases])
    for key in [k for k in out if k.endswith(".weight") and (".attn.proj." in k or ".mlp." in k)]:
        out.setdefault(key.removesuffix("weight") + "bias", out[key].new_zeros(out[key].shape[0]))
    out["rope_embed.periods"] = _periods(float(config.get("rope_theta", 100.0)), head_dim // 4).float()
    return out

"""`sslpipe import`: an official DINO / iBOT / DINOv2 / DINOv3 / MAE checkpoint, a timm state dict or a safetensors
file -> an export folder, exactly what `sslpipe export` writes (`model.safetensors`, `config.json`, model card), so
every probe and fine-tuning recipe takes it (docs/own_backbone.md). The official key layouts:
`sslpipe.weights.layouts`, DINOv3's `sslpipe.weights.layouts_dinov3` (mapped by timm's own filters, which need the
timm model: so a DINOv3 network is renamed after the model is built, the others before). A Hugging Face transformers
DINOv2 folder (config.json `model_type` dinov2 / dinov2_with_registers) is mapped onto the official DINOv2 names first
(`layouts.transformers_to_official`), a DINOv3 ViT folder (`dinov3_vit`) onto the official DINOv3 names
(`layouts_dinov3.transformers_to_official_dinov3`); other transformers folders are refused, pointing to weights that
are read.

Reading is safe: `.safetensors` hold tensors only; anything else goes through `torch.load(weights_only=True)`, which
rebuilds tensors and plain containers and refuses every other pickled object (unpickling one can run code). One
class is let through: `argparse.Namespace`, the `args` entry of every DINO / iBOT / MAE training checkpoint. It is a
plain attribute container -- rebuilding it fills a `__dict__` and runs none of its code -- and its values pass the
same restricted unpickler, so a Namespace holding anything else is refused too.

Every tensor is accounted for: what is not exported (the other network, heads, decoder, mask tokens, optimizer ...)
is listed with the reason in the report and in config.json's `source.dropped`; a backbone key missing, left over or
of another shape is an error naming the first keys on both sides.

The architecture is read from the shapes (patch size, width, depth, MLP ratio, registers, layer scale, biases,
position grid); the number of attention heads leaves no trace in any shape (DINOv3's RoPE periods and a
transformers config.json excepted), so the standard of the width is taken, and said. A position grid other than the
one asked for (`img_size / patch`) is resized here, once, by the source's own rule (an sslpipe export's: the rule of
the network it came from), so the export at that size computes what the official model computes at that size
(DINOv3's rotary embeddings need none).
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from sslpipe.weights.card import model_card
from sslpipe.weights.export import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    create_timm_backbone,
    key_mismatches,
    some_keys,
    staged_export,
)
from sslpipe.weights.hashing import sha256_file
from sslpipe.weights.heads import HEADS_NAME, MASK_TOKEN, heads_of, mask_token_of, stage_heads
from sslpipe.weights.layouts import (
    FORMATS,
    HF_MAPPED,
    Dropped,
    UnusableCheckpoint,
    backbone_state,
    detect_format,
    infer_resnet,
    infer_vit,
    native_size,
    select_network,
    to_timm_names,
    transformers_to_official,
)
from sslpipe.weights.layouts_dinov3 import HF_DINOV3, dinov3_to_timm, infer_dinov3, transformers_to_official_dinov3
from sslpipe.weights.positions import Rule, export_position_rule, fit_position_grid, position_rule

SAFE_GLOBALS = (argparse.Namespace,)
_OFFICIAL = ("dino", "ibot", "dinov2", "dinov3", "mae")
# Layouts `to_timm_names` maps (DINOv3's is mapped after the model is built); timm's own are imported as they are.
_RENAMED = ("dino", "ibot", "dinov2", "mae")
_CLASSIFIERS = ("head", "fc", "classifier")
_CONVERT = """If you trust the file, keep only its tensors, once (this runs its pickles):
    import torch
    ck = torch.load("{src}", map_location="cpu", weights_only=False)
    torch.save({{k: v for k, v in ck.items() if isinstance(v, (dict, torch.Tensor))}}, "{dst}")
and import that: `sslpipe import {dst} OUT`. (Or allow the class in your own code with
torch.serialization.add_safe_globals([{name}]).)"""


def _what_file(path: Path) -> str | None:
    """"safetensors" or "torchscript" when the first bytes say the file is one of those whatever its name, else None:
    torch.load's own error for them reads like a damaged file."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return None
    if len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{":
        return "safetensors"  # an 8-byte little-endian header length, then the JSON header
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"  # torch.jit.save's archive: the scripted code and its constants
    return None


def _refuse_misnamed(path: Path) -> None:
    """Refuse, naming what the file is, a safetensors file or a TorchScript archive under a torch checkpoint's name."""
    found = _what_file(path)
    if found == "safetensors":
        raise UnusableCheckpoint(f"{path} is a safetensors file (its header says so), not a torch checkpoint: rename "
                                 f"it to {path.with_suffix('.safetensors').name} and import that")
    if found == "torchscript":
        raise UnusableCheckpoint(f"{path} is a TorchScript archive (torch.jit.save), not a state dict: save its "
                                 f"weights once, torch.save(torch.jit.load('{path}').state_dict(), 'weights.pth'), "
                                 "and import weights.pth with --arch")


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """The checkpoint's contents, read without running pickled code (module docstring). A missing, truncated or
    damaged file, one that pickles objects and one without tensors each raise one error that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a .pth/.pt/.bin checkpoint, a .safetensors file or an "
                                "export folder")
    kind = "safetensors file" if path.suffix == ".safetensors" else "torch checkpoint"

    def damaged(detail: object) -> UnusableCheckpoint:
        return UnusableCheckpoint(f"{path} could not be read as a {kind} ({detail}): truncated or damaged? Download "
                                  "it again (and compare its sha256)")

    if path.suffix != ".safetensors":
        _refuse_misnamed(path)
    if path.suffix == ".safetensors":
        try:
            ckpt: Any = load_file(str(path))
        except SafetensorError as err:
            raise damaged(err) from err
    else:
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            if found is None:
                raise damaged(str(err).splitlines()[0]) from err
            name = found.group(1)
            raise UnusableCheckpoint(
                f"{path} holds a pickled Python object ({name}) that a safe load refuses: unpickling it could run "
                "code (only tensors, plain containers and argparse.Namespace are read). "
                + _CONVERT.format(src=path, dst=path.with_name(path.stem + ".tensors.pth"), name=name)) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            detail = str(err).split(". ")[0] if str(err) else f"{type(err).__name__}: the file ends early"
            raise damaged(detail) from err
    if not isinstance(ckpt, Mapping):
        raise UnusableCheckpoint(f"{path} holds a {type(ckpt).__name__}, not a dict of tensors: save "
                                 "model.state_dict() (or a dict of state dicts)")

    def tensors(value: Any) -> bool:
        return isinstance(value, Tensor) or (isinstance(value, Mapping) and any(map(tensors, value.values())))

    if not tensors(ckpt):
        entries = sorted(map(str, ckpt))[:12] or "none, an empty dict"
        raise UnusableCheckpoint(f"{path} holds no tensors (entries: {entries}): pass the checkpoint that holds the "
                                 "weights")
    return ckpt


def _fit(state: dict[str, Tensor], module: nn.Module, rule: Rule) -> tuple[list[Dropped], list[str]]:
    """Resize the position grid to the module's by `rule` and drop a classifier the export leaves out (in place)."""
    dropped = []
    notes = fit_position_grid(state, module, rule)
    target_keys = module.state_dict()
    classifier = sorted(k for k in state if k not in target_keys and k.split(".")[0] in _CLASSIFIERS)
    for key in classifier:
        del state[key]
    for group in dict.fromkeys(k.split(".")[0] for k in classifier):
        dropped.append(Dropped(f"{group}.*", sum(k.startswith(group + ".") for k in classifier),
                               "classifier (an export has num_classes=0)"))
    return dropped, notes


def _check_keys(state: Mapping[str, Tensor], module: nn.Module, what: str, hint: str) -> None:
    missing, unexpected, shapes = key_mismatches(state, module)
    problems = [f"in the model, not in the checkpoint: {some_keys(missing, 6)}" if missing else "",
                f"in the checkpoint, not in the model: {some_keys(unexpected, 6)}" if unexpected else "",
                f"shape checkpoint vs model: {some_keys(shapes, 4)}" if shapes else ""]
    if missing or unexpected or shapes:
        raise UnusableCheckpoint(f"{what}: " + "; ".join(p for p in problems if p) + f". {hint}")


def _tensors(n: int) -> str:
    return "" if n == 0 else "1 tensor" if n == 1 else f"{n} tensors"


def _sidecar(path: Path) -> dict[str, Any]:
    """Architecture, model arguments, input size and normalisation from the config.json beside a .safetensors file:
    an sslpipe export's (with its `source`, whose format fixes the position rule), or a timm Hugging Face folder's
    (`architecture` + `pretrained_cfg`); a Hugging Face transformers folder's config (`model_type`) as `transformers`.
    """
    config = path.parent / CONFIG_NAME
    if not config.is_file():
        return {}
    try:
        cfg = json.loads(config.read_text())
    except ValueError as err:
        if path.suffix != ".safetensors":
            return {}  # beside a torch checkpoint only a transformers config.json is read
        raise UnusableCheckpoint(f"{config} beside {path.name} is not valid JSON ({err}): fix or remove it") from err
    if isinstance(cfg, dict) and "architecture" not in cfg and "model_type" in cfg:
        return {"transformers": cfg}  # model.safetensors or pytorch_model.bin
    if path.suffix != ".safetensors" or not isinstance(cfg, dict) or "architecture" not in cfg:
        return {}
    export = cfg.get("format") == FORMAT
    pre = cfg if export else cfg.get("pretrained_cfg", {})
    size = pre.get("img_size") or (pre.get("input_size") or [None])[-1]
    out = {"arch": cfg["architecture"], "model_args": dict(cfg.get("model_args") or {}), "img_size": size,
           "mean": pre.get("mean"), "std": pre.get("std"), "from": f"{config.name} beside the weights"}
    if export:
        out["export_source"] = dict(cfg.get("source") or {})
    return out


def _transformers_layout(cfg: Mapping[str, Any], path: Path) -> str:
    """The layout of a Hugging Face transformers folder: DINOv2's (`transformers_to_official`) and DINOv3 ViT's
    (`transformers_to_official_dinov3`) are mapped; any other model type is refused in one line that points to
    weights sslpipe reads."""
    model_type = cfg.get("model_type")
    if model_type in HF_MAPPED:
        return "dinov2"
    if model_type in HF_DINOV3:
        return "dinov3"
    where = ("the official DINOv3 .pth (github.com/facebookresearch/dinov3) or timm's weights "
             "(timm/vit_*_dinov3.lvd1689m, timm/convnext_*_dinov3.lvd1689m)" if str(model_type).startswith("dinov3")
             else "the original checkpoint or a timm model folder")
    raise UnusableCheckpoint(f"{path} is a Hugging Face transformers {model_type} folder (config.json "
                             f"{cfg.get('architectures')}), whose key names are transformers' own: sslpipe import "
                             f"reads transformers' dinov2 and dinov3_vit folders only; import {where} instead")


def _normalisation(mean: Sequence[float] | None, std: Sequence[float] | None, side: Mapping[str, Any]
                   ) -> tuple[list[float], list[float], str]:
    """(mean, std, where they come from): --mean/--std, the config.json beside the weights, else ImageNet's, assumed
    (no weight records the statistics it was trained with)."""
    if (mean is None) != (std is None):
        raise UnusableCheckpoint("pass --mean and --std together (3 values each, the RGB statistics the weights were "
                                 "trained with)")
    if mean is not None and std is not None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise UnusableCheckpoint(f"--mean {list(mean)} --std {list(std)}: give as many values for each, and "
                                     "positive standard deviations")
        return [float(m) for m in mean], [float(s) for s in std], "given with --mean/--std"
    if side.get("mean") and side.get("std"):
        return list(side["mean"]), list(side["std"]), side["from"]
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD), ("ImageNet's, assumed: no weight records its "
                                                                      "statistics; pass --mean/--std if yours differ")


def _source_file(source: Path) -> Path:
    if not source.is_dir():
        return source
    if (source / ".metadata").is_file():
        raise UnusableCheckpoint(f"{source} is a torch.distributed.checkpoint folder (DINOv3's training checkpoints): "
                                 "make it one file first, `python -m torch.distributed.checkpoint.format_utils "
                                 f"dcp_to_torch {source} {source}.pth`, and import that")
    for name in (WEIGHTS_NAME, "pytorch_model.bin"):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(f"{source} is a folder without {WEIGHTS_NAME} or pytorch_model.bin: pass the checkpoint "
                            f"file (it holds {sorted(p.name for p in source.iterdir())[:8]})")


# The DINOv3 ViT-L distilled from the 7B on satellite images (SAT-493M) unties its local CLS norm, the LVD-1689M one
# does not (hub/backbones.py); its statistics are the README's "Image transforms" for satellite imagery.
SAT493M_MEAN, SAT493M_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)


@dataclass
class ImportReport:
    """What `import_checkpoint` read, kept, left out and assumed; `lines()` is what `sslpipe import` prints."""

    source: Path
    out: Path
    fmt: str
    detected: bool
    which: str | None
    arch: str
    arch_from: str
    model_args: dict[str, Any]
    kept: int
    dropped: list[Dropped]
    notes: list[str]
    mean: list[float]
    std: list[float]
    normalisation_from: str

    def lines(self) -> list[str]:
        out = [f"read {self.source}: {self.fmt} layout ({'detected from the keys' if self.detected else '--format'})"
               + (f", the {self.which}" if self.which else "")]
        out.append(f"architecture {self.arch} ({self.arch_from}): "
                   + ", ".join(f"{k}={v}" for k, v in self.model_args.items() if k != "num_classes"))
        out.append(f"normalisation: mean {tuple(round(m, 4) for m in self.mean)} std "
                   f"{tuple(round(v, 4) for v in self.std)} ({self.normalisation_from})")
        out += [f"note: {n}" for n in self.notes]
        if self.dropped:
            out.append("dropped, not part of the backbone:")
            width = max(len(d.entry) for d in self.dropped)
            out += [f"  {d.entry:<{width}}  {_tensors(d.tensors):>12}  {d.why}" for d in self.dropped]
        out.append(f"kept {self.kept} tensors -> {self.out} ({WEIGHTS_NAME}, {CONFIG_NAME}, {CARD_NAME}); reloaded "
                   "in timm with the same outputs")
        return out


def _student_mask_token(ckpt: Mapping[str, Any], path: Path) -> Tensor | None:
    """The trained mask token of the checkpoint's student (iBOT builds it in the student only), None without one."""
    try:
        student = select_network(ckpt, "student", path)[0]
    except UnusableCheckpoint:
        return None
    return mask_token_of(student)


def _sat_note(state: Mapping[str, Tensor], fmt: str, path: Path, given: bool) -> list[str]:
    """A warning when the weights look like DINOv3's SAT-493M release and no --mean/--std were given."""
    width = getattr(state.get("cls_token"), "shape", (0,))[-1]
    sat = fmt == "dinov3" and ("sat493m" in path.name.lower()  # the 7B has local_cls_norm in both releases
                               or ("local_cls_norm.weight" in state and width == 1024))
    if not sat or given:
        return []
    return [f"this looks like DINOv3's SAT-493M release (a ViT-L with local_cls_norm, or the file name): its "
            f"normalisation is mean {SAT493M_MEAN}, std {SAT493M_STD}, not ImageNet's recorded here; import again "
            f"with --mean {' '.join(map(str, SAT493M_MEAN))} --std {' '.join(map(str, SAT493M_STD))}"]


def import_checkpoint(source: str | Path, out: str | Path, *, fmt: str | None = None, which: str | None = None,
                      arch: str | None = None, img_size: int | None = None, with_heads: bool = False,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImportReport:
    """Write the backbone of `source` as an export folder `out` (module docstring).

    `fmt`: one of FORMATS (default: detected from the keys); `which`: "teacher" | "student" for checkpoints with
    both (default: the teacher); `arch`: a timm name whose defaults describe the weights (default: read from the
    shapes, or from an export's config.json beside a .safetensors file); `img_size`: the input size of the export
    (default: the checkpoint's position grid x patch size; 224 for CNNs); `with_heads`: also the DINO / iBOT /
    DINOv2 projection heads of a training checkpoint (`sslpipe.weights.heads`), to continue its pretraining;
    `mean`/`std`: the normalisation the weights were trained with (default: the config.json beside the weights,
    else ImageNet's, assumed and said).
    """
    path = _source_file(Path(source))
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    mean_, std_, norm_from = _normalisation(mean, std, {})  # checked before any reading; the sidecar's come below
    ckpt = read_checkpoint(path)
    net, chosen, dropped = select_network(ckpt, which, path)
    # a config.json naming a timm architecture (an export, a timm Hugging Face folder) says the keys are timm's
    beside_config = _sidecar(path)
    hf_config = beside_config.pop("transformers", None)
    hf_heads: int | None = None
    if hf_config is not None:  # a Hugging Face transformers folder: its DINOv2 / DINOv3 ViT in the official names
        found = _transformers_layout(hf_config, path)
        if found == "dinov3":  # the heads: from the RoPE periods it gets, as an official checkpoint's
            net = transformers_to_official_dinov3(net, hf_config, path)
        else:
            net, hf_dropped, hf_heads = transformers_to_official(net, hf_config, path)
            dropped += hf_dropped
    else:
        found = "safetensors" if beside_config else detect_format(ckpt, net, path.suffix)
    if fmt in _OFFICIAL and found in _OFFICIAL and found != fmt:
        raise UnusableCheckpoint(f"--format {fmt}, but {path} has the keys of a {found} checkpoint: leave --format "
                                 f"out or pass --format {found}")
    detected, fmt = fmt is None, fmt or found
    # an sslpipe export imported again keeps the layout of the network it came from (its position rule, provenance)
    export_source = beside_config.get("export_source") if fmt in ("timm", "safetensors") else None
    state, beside = backbone_state(net, fmt)
    sat_notes = _sat_note(state, fmt, path, mean is not None)
    if fmt in _RENAMED:
        state = to_timm_names(state)
    side = beside_config if fmt in ("timm", "safetensors") and arch is None else {}
    notes: list[str] = []
    patch: int | None = None
    kwargs: dict[str, Any] = {}
    # weights read in an official layout by detection may still be a timm network's that shares its key names
    misread = (f" (the keys were read as the {fmt} layout; if this is a timm state dict, pass --format timm)"
               if detected and fmt in _OFFICIAL and hf_config is None else "")
    if arch is not None:
        if not timm.is_model(arch):
            raise UnusableCheckpoint(f"--arch {arch!r} is not a timm architecture (timm.list_models('vit_*') lists "
                                     "them)")
        arch_from, hint = "--arch", (f"These weights are no {arch}: leave --arch out to read the architecture from "
                                     f"the shapes, or name the right one{misread}")
    elif side:
        arch, arch_from = side["arch"], side["from"]
        hint = f"The {CONFIG_NAME} beside it does not describe these weights: pass --arch"
        patch = side["model_args"].get("patch_size")
        kwargs = {k: v for k, v in side["model_args"].items()
                  if k not in ("img_size", "patch_size", "num_classes", "dynamic_img_size")}
    else:
        arch_from, hint = "inferred from the shapes", ("Name the architecture with --arch TIMM_NAME (its defaults "
                                                       f"apply){misread}")
        if fmt == "dinov3":
            arch, kwargs, patch, notes = infer_dinov3(state, path)
        elif "patch_embed.proj.weight" in state:
            arch, kwargs, patch, notes = infer_vit(state, fmt)
            if hf_heads is not None:
                kwargs["num_heads"], arch_from = hf_heads, "inferred from the shapes and the transformers config.json"
                notes = [f"num_heads={hf_heads}: from the transformers config.json (num_attention_heads)"]
        elif "conv1.weight" in state and "layer1.0.conv1.weight" in state:
            arch = infer_resnet(state)
        else:
            raise UnusableCheckpoint(f"cannot read the architecture of {path} from keys like "
                                     f"{some_keys(sorted(state), 6)}: pass --arch TIMM_NAME")
    if hf_config is not None:
        notes.append(f"a Hugging Face transformers {hf_config.get('model_type')} folder: its keys mapped onto the "
                     + ("official DINOv3 names; the RoPE periods from its config.json (rope_theta, the head width)"
                        if fmt == "dinov3" else "official DINOv2 names (the conversion script's table); a grid "
                        "resized by DINOv2's own rule"))
    size = int(img_size or side.get("img_size") or native_size(state) or 224)
    try:
        module, model_args = create_timm_backbone(arch, size, patch, kwargs)
    except TypeError as err:
        raise UnusableCheckpoint(f"timm.create_model({arch!r}) rejects the model arguments {kwargs} "
                                 f"({arch_from}): {err}. {hint}") from err
    step = getattr(getattr(module, "patch_embed", None), "patch_size", (1,))[0]
    if size % step:
        raise UnusableCheckpoint(f"--img-size {size} is not a multiple of the patch size {step}")
    renamed: list[Dropped] = []
    if fmt == "dinov3":
        state, renamed, more = dinov3_to_timm(state, module, arch, path)
        notes += more
    registers = "reg_token" in state
    if export_source is not None:
        rule = export_position_rule({"source": export_source}, registers)
        origin = export_source.get("format")
        notes.append(f"an sslpipe export of a {origin} network" if origin else "an sslpipe export of an sslpipe run")
    else:
        rule = position_rule(fmt, registers)
    classifier, resized = _fit(state, module, rule)
    _check_keys(state, module, f"{path} ({fmt} layout) does not fit {arch} with {model_args} ({arch_from})", hint)
    module.load_state_dict(state, strict=True)
    dropped += beside + renamed + classifier
    notes += resized
    heads = heads_of(net, fmt) if with_heads else None
    if heads is not None and fmt != "dino" and MASK_TOKEN not in heads and chosen == "teacher":
        token = _student_mask_token(ckpt, path)
        if token is not None:
            heads[MASK_TOKEN] = token.detach().cpu().clone()
            notes.append("the mask token from the student (the teacher's network has none), kept with the heads")
    if heads is not None:
        notes.append(f"the {fmt} projection heads kept beside the backbone ({HEADS_NAME}, {len(heads)} tensors)")
    if mean is None:
        mean_, std_, norm_from = _normalisation(None, None, side or beside_config)
    notes += sat_notes
    source_info = {"imported_from": str(path.resolve()), "sha256": sha256_file(path), "format": fmt, "which": chosen,
                   "architecture_from": arch_from, "dropped": [d.as_dict() for d in dropped], "notes": notes,
                   "normalisation_from": norm_from}
    if export_source is not None:  # the layout of the network the export came from: its position rule
        source_info.update(format=export_source.get("format"), imported_as=fmt, export_source=export_source)
    provenance = [("source", f"`{path.name}`, sha256 `{source_info['sha256']}`"),
                  ("layout", f"{fmt}" + (f", the {chosen}" if chosen else "")),
                  ("architecture read from", arch_from),
                  ("normalisation", norm_from),
                  ("left out", "; ".join(f"`{d.entry}`: {d.why}" for d in dropped) or "nothing"),
                  *(("note", n) for n in notes)]
    with staged_export(module.eval(), out, arch=arch, model_args=model_args, img_size=size, mean=mean_, std=std_,
                       source=source_info) as staged:  # weights, heads, config.json and card replaced together
        if heads is not None:
            stage_heads(staged, heads, fmt)
        staged.card = lambda config: model_card(config, title=f"{arch} imported from a {fmt} checkpoint",
                                                tags=[fmt, "imported"], provenance=provenance)
    out_dir = Path(out)
    return ImportReport(path, out_dir, fmt, detected, chosen, arch, arch_from, model_args, len(state), dropped, notes,
                        mean_, std_, norm_from)

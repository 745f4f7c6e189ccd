"""Backbone export and import (docs/internals.md §6).

An export folder holds `model.safetensors` (the plain timm model's state dict, no pickles) and `config.json` (timm
architecture name + the model arguments that re-create it, image size, normalisation, where the weights came from,
and the sha256 of `model.safetensors`, which `sslpipe check` compares). Both are written under temporary names and
renamed; a failed write removes them and leaves an earlier export as it was.
`export_run` and `sslpipe import` also write `README.md`, a model card with the Hugging Face header (`library_name:
timm`), so the folder can be published to a model hub as it is. It loads in plain timm, without sslpipe:

    timm.create_model(cfg["architecture"], pretrained=True,
                      pretrained_cfg_overlay=dict(file=".../model.safetensors", custom_load=False),
                      **cfg["model_args"])

(`model_args` holds `num_classes=0`; `custom_load=False`: timm before 1.0.31 otherwise hands a ViT's file to its JAX
`.npz` reader, as its published ViT configs ask). timm reads a `file` overlay from disk (no download is attempted);
since `num_classes=0` differs from the architecture's default pretrained config it drops classifier keys and loads
non-strictly, so `load_backbone` loads strictly itself and the export is checked right after writing by reloading it
and comparing outputs.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sslpipe.errors import WriteFailed, io_failure

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT = "sslpipe-backbone/1"
# Keys that belong to the training wrapper, never to the timm model (iBOT's learnable mask token).
_TRAINING_ONLY_KEYS = ("mask_token",)
# Where the backbone sits inside a recipe's network: MaskedViT wrapper first (its `.vit` is the timm model), then
# DINO/iBOT/SimCLR's plain `backbone`, then the CNN encoder of U2PL / supervised_seg (a ViT encoder there is ViTDet-
# modified: not a plain timm ViT).
_BACKBONE_PREFIXES = ("backbone.vit.", "backbone.", "encoder.model.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile


def _version() -> str:
    try:
        return metadata.version("sslpipe")
    except metadata.PackageNotFoundError:
        return "unknown"


def strip_prefix(state: Mapping[str, torch.Tensor], network: str = "") -> dict[str, torch.Tensor]:
    """The timm backbone's keys out of a recipe checkpoint.

    Keeps keys under `{network}.` (e.g. `teacher.` in `extra_state.safetensors`; "" for the student's accelerate
    model file), drops DDP/compile wrappers (`module.`, `_orig_mod.`), then takes the first of `backbone.vit.`
    (masked ViT wrapper) and `backbone.` (plain timm model) that matches and removes it.
    """
    root = f"{network}." if network else ""
    keys: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(root):
            continue
        key = key[len(root):]
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        keys[key] = value
    for prefix in _BACKBONE_PREFIXES:
        found = {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix)}
        if found:
            return found
    seen = sorted({".".join(k.split(".")[:2]) for k in state})
    raise KeyError(
        f"no backbone weights under {root or '(root)'}{{{', '.join(_BACKBONE_PREFIXES)}}}; "
        f"key prefixes found: {seen[:20]}"
    )


def _timm_args(arch: str, img_size: int, patch_size: int | None, kwargs: Mapping[str, Any]) -> tuple[nn.Module, dict]:
    """Create `arch` the way `create_backbone` does (ViTs: img_size, patch_size, dynamic_img_size) and return the
    model with the exact timm arguments; architectures without `img_size` (CNNs) are retried without it."""
    vit_args: dict[str, Any] = {"img_size": img_size, "dynamic_img_size": True}
    if patch_size:
        vit_args["patch_size"] = patch_size
    args = {**vit_args, **kwargs, "num_classes": 0}
    try:
        return timm.create_model(arch, pretrained=False, **args), args
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
    args = {**kwargs, "num_classes": 0}
    return timm.create_model(arch, pretrained=False, **args), args


def export_backbone(
    module: nn.Module,
    out_dir: str | Path,
    *,
    arch: str,
    model_args: Mapping[str, Any],
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    source: Mapping[str, Any],
) -> Path:
    """Write `module` (a plain timm model) as `out_dir/model.safetensors` + `config.json`, then reload and check.

    `model_args` are the keyword arguments of `timm.create_model(arch, ...)` (num_classes is forced to 0). Keys named
    `mask_token` (training-only, iBOT) are stripped. Returns `out_dir`.
    """
    out = Path(out_dir)
    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in module.state_dict().items()
        if k.split(".")[-1] not in _TRAINING_ONLY_KEYS
    }
    args = {**dict(model_args), "num_classes": 0}
    config = {
        "format": FORMAT,
        "architecture": arch,
        "model_args": args,
        "num_features": int(getattr(module, "num_features", 0)),
        "img_size": int(img_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": "bicubic",
        "source": dict(source),
        "sslpipe_version": _version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp_weights, tmp_config = out / (WEIGHTS_NAME + ".tmp"), out / (CONFIG_NAME + ".tmp")
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp_weights), metadata={"format": "pt", "architecture": arch})
        with open(tmp_weights, "rb") as f:
            config["sha256"] = {WEIGHTS_NAME: hashlib.file_digest(f, "sha256").hexdigest()}
        tmp_config.write_text(json.dumps(config, indent=2) + "\n")
        tmp_weights.replace(out / WEIGHTS_NAME)
        tmp_config.replace(out / CONFIG_NAME)
    except Exception as err:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"could not write the export {out}: {io_failure(err)}. Removed its temporary files; an "
                          f"earlier export there is as it was. Free space (or fix the disk / permissions) and "
                          "export again") from err
    _verify(module, out, img_size)
    return out


@torch.no_grad()
def _verify(module: nn.Module, out: Path, img_size: int) -> None:
    """Reload the export and compare outputs on one random batch: catches wrong keys or model arguments."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    reloaded = load_backbone(out).to(device)
    was_training = module.training
    module.eval()
    try:
        x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
        expected, got = module(x).float(), reloaded(x).float()
    finally:
        module.train(was_training)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise RuntimeError(
            f"export check failed: {out} reloaded with timm gives different outputs "
            f"(max abs diff {(expected - got).abs().max().item():.3g}); model_args in {out / CONFIG_NAME} are wrong"
        )


def _export_paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    config = weights.parent / CONFIG_NAME
    for p in (weights, config):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: pass an export folder written by `sslpipe export`")
    return weights, config


def read_export_config(path: str | Path) -> dict[str, Any]:
    """`config.json` of an export folder (or of the folder holding `model.safetensors`)."""
    return json.loads(_export_paths(path)[1].read_text())


def load_backbone(path: str | Path) -> nn.Module:
    """Re-create the timm model from `config.json` and load `model.safetensors` strictly; eval mode.

    The data config (mean, std, input size, interpolation) is written into `model.pretrained_cfg`, so
    `timm.data.resolve_data_config(model=...)` gives the normalisation the backbone was trained with.
    """
    weights, config_path = _export_paths(path)
    cfg = json.loads(config_path.read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{weights} does not match {cfg['architecture']} with {config_path} model_args: {err}")
    size = cfg["img_size"]
    model.pretrained_cfg = {
        **model.pretrained_cfg, "file": str(weights), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
        "input_size": (3, size, size), "interpolation": cfg.get("interpolation", "bicubic"), "num_classes": 0,
    }
    return model.eval()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tensor_digest(path: Path) -> str:
    """sha256 over the tensors (name, dtype, shape, bytes) of a safetensors file: equal for equal weights, which the
    file's own sha256 is not (safetensors writes its metadata map in no fixed order)."""
    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name)
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_model_card(out_dir: str | Path, *, title: str, tags: Sequence[str], provenance: Sequence[tuple[str, str]],
                     results: Sequence[tuple[str, str]] = ()) -> Path:
    """Write `README.md` beside an export: the Hugging Face model-card header (`library_name: timm`, tags), how to
    load the folder, where the weights came from (`provenance` rows) and the probe results measured on exactly these
    weights (`results` rows). Everything else is read from its config.json: nothing is guessed. Returns the path."""
    out = Path(out_dir)
    cfg = read_export_config(out)
    header = yaml.safe_dump({"library_name": "timm", "pipeline_tag": "image-feature-extraction",
                             "tags": list(dict.fromkeys(["timm", "sslpipe", *tags]))}, sort_keys=False)
    args = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
    size, sha = cfg["img_size"], (cfg.get("sha256") or {}).get(WEIGHTS_NAME, "not recorded")
    rows = [("architecture", f"`{cfg['architecture']}`, model_args `{json.dumps(cfg['model_args'])}`"),
            *provenance, ("weights", f"`{WEIGHTS_NAME}`, sha256 `{sha}`"),
            ("exported", f"{cfg.get('created_at', '?')} by sslpipe {cfg.get('sslpipe_version', '?')}")]
    lines = [
        "---", header.strip(), "---", "", f"# {title}", "",
        f"A `{cfg['architecture']}` image backbone ({cfg.get('num_features')}-d features) exported by sslpipe: "
        f"`{WEIGHTS_NAME}` holds the weights (no classifier), `{CONFIG_NAME}` the architecture, its model "
        "arguments, the input size and the normalisation.", "",
        "## Use", "", "```python", "import timm", "",
        f"model = timm.create_model({cfg['architecture']!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={WEIGHTS_NAME!r}, custom_load=False), {args}).eval()", "```", "",
        f"Inputs: RGB at {size}x{size} px ({cfg.get('interpolation', 'bicubic')} resize), normalised with mean "
        f"{cfg['mean']} and std {cfg['std']}; `model(x)` gives the image feature. With sslpipe: "
        "`sslpipe.load_backbone(FOLDER)`, `sslpipe knn FOLDER --data SHARDS`, "
        "`sslpipe finetune RECIPE.yaml finetune.backbone=FOLDER`.", "",
        "## Provenance", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Probe results", "",
        *(["| probe | result |", "|---|---|", *(f"| {k} | {v} |" for k, v in results)] if results else
          ["None recorded for these weights."]), "",
    ]
    card, tmp = out / CARD_NAME, out / (CARD_NAME + ".tmp")
    try:
        tmp.write_text("\n".join(lines))
        tmp.replace(card)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if io_failure(err) is None:
            raise
        raise WriteFailed(f"could not write the model card {card}: {io_failure(err)}. The weights and config.json "
                          "beside it are complete; free space (or fix the disk / permissions) and export "
                          "again") from err
    return card


def _manifest_row(spec: Any) -> str:
    """data.train and the sha256 of its shard manifest, when it has one."""
    path = Path(str(spec))
    manifest = path / "manifest.json" if path.is_dir() else path if path.suffix == ".json" else None
    if manifest is None or not manifest.is_file():
        return f"`{spec}` (no manifest.json there: the shards are not identified)"
    return f"`{spec}`, manifest.json sha256 `{_sha256(manifest)}`"


def _probe_rows(run: Path, out: Path, step: int | None, periodic: bool,
                same_weights_since: float | None) -> list[tuple[str, str]]:
    """Probe results of exactly the exported weights: the run's periodic kNN at the exported step (`periodic`: the
    exported network is the one the run probes), and kNN result files (`sslpipe knn --out`, the demo's
    knn_*.json) in the export folder, the run or its parent whose `backbone` is this export folder -- only when the
    folder held these same weights before and the file was written since (`same_weights_since`)."""
    rows = []
    metrics = run / "metrics.jsonl"
    if periodic and step is not None and metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            rows += [(f"kNN {k.split('/', 1)[1]}, data.val, measured during training at step {step}", f"{v:.4f}")
                     for k, v in rec.items() if rec.get("step") == step and k.startswith("knn/")]
    if same_weights_since is None:
        return rows
    for folder in dict.fromkeys((out, run, run.parent)):
        for file in sorted(folder.glob("*.json")):
            if file.name == CONFIG_NAME or file.stat().st_mtime < same_weights_since:
                continue
            try:
                result = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            if not (isinstance(result, dict) and isinstance(result.get("k"), dict) and result.get("backbone")
                    and Path(str(result["backbone"])).resolve() == out.resolve()):
                continue
            rows += [(f"kNN k={k}, T={result.get('T')}, {result.get('n_train')} train / {result.get('n_test')} "
                      f"val samples (`{file.name}`)", ", ".join(f"{m} {v:.4f}" for m, v in acc.items()))
                     for k, acc in result["k"].items()]
    return rows


def _find_checkpoint(run_dir: Path, checkpoint: str | Path | int | None) -> Path:
    if checkpoint is not None and not isinstance(checkpoint, int):
        ckpt = Path(checkpoint)
        ckpt = ckpt if ckpt.is_absolute() or ckpt.exists() else run_dir / "checkpoints" / ckpt
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint folder {ckpt} not found")
        return ckpt
    found = ((re.fullmatch(r"step_(\d+)", p.name), p) for p in (run_dir / "checkpoints").glob("step_*"))
    steps = sorted((int(m.group(1)), p) for m, p in found if m)
    if not steps:
        raise FileNotFoundError(f"no checkpoints/step_N folders in {run_dir}: train first or pass checkpoint=")
    if checkpoint is None:
        return steps[-1][1]
    for step, path in steps:
        if step == checkpoint:
            return path
    raise FileNotFoundError(f"no checkpoint for step {checkpoint} in {run_dir}; have {[s for s, _ in steps]}")


def _cfg_get(cfg: Mapping[str, Any], dotted: str, path: Path, default: Any = ...) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is ...:
                raise KeyError(f"{path} has no key `{dotted}` needed to re-create the backbone")
            return default
        node = node[part]
    return node


def export_run(
    run_dir: str | Path,
    which: str | None = "teacher",
    out: str | Path | None = None,
    checkpoint: str | Path | int | None = None,
) -> Path:
    """Export the teacher or student backbone of a run (latest checkpoint unless `checkpoint` is a step or folder).

    Reads `RUN/config.yaml` (`model.arch`, `model.patch_size`, `model.kwargs`, `crops.global_size`, `crops.mean`,
    `crops.std`) and `checkpoints/step_N/`: the teacher from `extra_state.safetensors` (keys `teacher.*`), the
    student from `model.safetensors`. `which=None`: the teacher when the run has one (DINO, iBOT), else the student
    (SimCLR). Default output `RUN/export/{which}`, with a model card (`write_model_card`: method, config and manifest
    sha256, probe results of these weights).
    """
    if which not in ("teacher", "student", None):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run} is not an sslpipe run directory")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    ckpt = _find_checkpoint(run, checkpoint)
    extra = ckpt / "extra_state.safetensors"
    has_teacher = extra.is_file() and any(k.startswith("teacher.") for k in load_file(str(extra)))
    if which is None:
        which = "teacher" if has_teacher else "student"
    elif which == "teacher" and extra.is_file() and not has_teacher:
        raise ValueError(f"{run} has no teacher (method {_cfg_get(cfg, 'method', cfg_path, '?')}): export the "
                         "student (`sslpipe export RUN --which student`)")
    weights = ckpt / ("extra_state.safetensors" if which == "teacher" else "model.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found; {ckpt} holds {sorted(p.name for p in ckpt.iterdir())}")
    state = strip_prefix(load_file(str(weights)), "teacher" if which == "teacher" else "")
    state = {k: v for k, v in state.items() if k.split(".")[-1] not in _TRAINING_ONLY_KEYS}

    arch = _cfg_get(cfg, "model.arch", cfg_path)
    img_size = int(_cfg_get(cfg, "crops.global_size", cfg_path))
    module, model_args = _timm_args(
        arch, img_size, _cfg_get(cfg, "model.patch_size", cfg_path, None),
        _cfg_get(cfg, "model.kwargs", cfg_path, None) or {},
    )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{weights} does not match model.arch={arch!r} of {cfg_path}: {err}")
    match = re.fullmatch(r"step_(\d+)", ckpt.name)
    step = int(match.group(1)) if match else None
    source = {"run_dir": str(run.resolve()), "checkpoint": str(ckpt.resolve()), "step": step, "which": which}
    out_dir = Path(out) if out is not None else run / "export" / which
    previous = out_dir / WEIGHTS_NAME
    before = (_tensor_digest(previous), previous.stat().st_mtime) if previous.is_file() else None
    out_dir = export_backbone(
        module.eval(), out_dir, arch=arch, model_args=model_args,
        img_size=img_size, mean=_cfg_get(cfg, "crops.mean", cfg_path, (0.485, 0.456, 0.406)),
        std=_cfg_get(cfg, "crops.std", cfg_path, (0.229, 0.224, 0.225)), source=source,
    )
    method = str(_cfg_get(cfg, "method", cfg_path, "unknown"))
    unchanged = before is not None and before[0] == _tensor_digest(out_dir / WEIGHTS_NAME)
    probed = "teacher" if has_teacher else "student"  # the network a run's periodic kNN probes
    write_model_card(
        out_dir, title=f"{arch} pretrained with {method} (sslpipe)", tags=[method],
        provenance=[("method", f"`{method}`; the resolved recipe is the run's `config.yaml`, sha256 "
                               f"`{_sha256(cfg_path)}`"),
                    ("checkpoint", f"`{ckpt.name}`, the {which}"),
                    *([("training data", _manifest_row(data))] if (data := _cfg_get(cfg, "data.train", cfg_path,
                                                                                    None)) else [])],
        results=_probe_rows(run, out_dir, step, which == probed, before[1] if unchanged else None))
    return out_dir


def _some(keys: Sequence[str], n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_export_into(module: nn.Module, path: str | Path) -> nn.Module:
    """Copy the weights of an export folder into an existing plain timm backbone, strictly (fine-tuning init,
    `model.init_from`). Every key must exist on both sides with the same shape; otherwise a ValueError names the
    export, its architecture and the missing / unexpected / mis-shaped keys. Returns `module`."""
    weights, config_path = _export_paths(path)
    cfg = json.loads(config_path.read_text())
    state = load_file(str(weights))
    target = module.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                    for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or shapes:
        problems = [f"missing in the export: {_some(missing)}" if missing else "",
                    f"not in the backbone: {_some(unexpected)}" if unexpected else "",
                    f"shape export vs backbone: {_some(shapes)}" if shapes else ""]
        raise ValueError(
            f"export {path} ({cfg.get('architecture')} with model_args {cfg.get('model_args')}) does not fit the "
            f"{type(module).__name__} backbone to initialise: " + "; ".join(p for p in problems if p)
            + ". Build the backbone with the export's architecture and model arguments (model.arch, "
            "model.patch_size, model.kwargs, crops.global_size)"
        )
    module.load_state_dict(state, strict=True)
    return module

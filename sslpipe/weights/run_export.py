"""`sslpipe export RUN`: the teacher or student backbone of a training run as an export folder with its model card.

The run is read as files, not through the recipes: `RUN/config.yaml` as a plain dict (the model and crop keys that
re-create the timm backbone) and a complete checkpoint (`find_checkpoint`: the newest unless one is named), whose
recipe keys are mapped onto the plain timm model's (`strip_prefix`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from sslpipe.weights.card import write_model_card
from sslpipe.weights.checkpoint import (
    EXTRA_STATE,
    FILES,
    MODEL,
    TRAINER_STATE,
    CheckpointInvalid,
    find_checkpoint,
    step_of,
)
from sslpipe.weights.export import (
    CONFIG_NAME,
    TRAINING_ONLY_KEYS,
    WEIGHTS_NAME,
    create_timm_backbone,
    export_backbone,
    weights_digest,
)
from sslpipe.weights.hashing import sha256_file
from sslpipe.weights.heads import MASK_TOKEN, heads_of, write_heads
from sslpipe.weights.verify import file_problems

# Where the backbone sits inside a recipe's network: MaskedViT wrapper first (its `.vit` is the timm model), then
# DINO/iBOT/SimCLR's plain `backbone`, then the CNN encoder of U2PL / supervised_seg (a ViT encoder there is ViTDet-
# modified: not a plain timm ViT).
_BACKBONE_PREFIXES = ("backbone.vit.", "backbone.", "encoder.model.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile


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


def _manifest_row(spec: Any) -> str:
    """data.train and the sha256 of its shard manifest, when it has one."""
    path = Path(str(spec))
    manifest = path / "manifest.json" if path.is_dir() else path if path.suffix == ".json" else None
    if manifest is None or not manifest.is_file():
        return f"`{spec}` (no manifest.json there: the shards are not identified)"
    return f"`{spec}`, manifest.json sha256 `{sha256_file(manifest)}`"


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


def _cfg_get(cfg: Mapping[str, Any], dotted: str, path: Path, default: Any = ...) -> Any:
    """`a.b.c` of the run's config; without a `default`, a missing key is a KeyError naming it and the file."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is ...:
                raise KeyError(f"{path} has no key `{dotted}` needed to re-create the backbone")
            return default
        node = node[part]
    return node


def _teacher_rows(run: Path) -> list[tuple[str, str]]:
    """The frozen teacher a distillation run learned from (`distill_teacher.json`), for the model card."""
    record = run / "distill_teacher.json"
    if not record.is_file():
        return []
    teacher = json.loads(record.read_text())
    return [("distilled from", f"`{teacher['teacher']}` ({teacher.get('architecture')}), model.safetensors sha256 "
                               f"`{teacher['sha256']}`")]


def _check_read_files(ckpt: Path, names: set[str]) -> None:
    """The checkpoint files the export reads against the sha256s its trainer_state.json records (a flipped bit would
    otherwise be exported as if it were the trained weights); a checkpoint without checksums is read as it is."""
    table = (json.loads((ckpt / TRAINER_STATE).read_text()).get(FILES) or {})
    problems = file_problems(ckpt, {name: entry for name, entry in table.items() if name in names})
    if problems:
        raise CheckpointInvalid(f"{ckpt} is damaged ({'; '.join(problems)}): export another checkpoint "
                                f"(--checkpoint step_N; `sslpipe check {ckpt.parent.parent}` lists them)")


# the dense methods train a whole network on a backbone that came from an export (or timm): nothing new to export
DENSE_RUNS = {"u2pl": ("segmentation", "sslpipe eval-seg RUN"),
              "supervised_seg": ("segmentation", "sslpipe eval-seg RUN"),
              "finetune_mask2former": ("Mask2Former", "sslpipe predict RUN"),
              "finetune_vitdet": ("ViTDet", "sslpipe predict RUN")}


def export_run(
    run_dir: str | Path,
    which: str | None = "teacher",
    out: str | Path | None = None,
    checkpoint: str | Path | int | None = None,
    with_heads: bool = False,
) -> Path:
    """Export the teacher or student backbone of a run (the newest complete checkpoint unless `checkpoint` is a step
    or folder: `find_checkpoint`).

    Reads `RUN/config.yaml` (`model.arch`, `model.patch_size`, `model.kwargs`, `crops.global_size`, `crops.mean`,
    `crops.std`) and `checkpoints/step_N/`: the teacher from `extra_state.safetensors` (keys `teacher.*`), the
    student from `model.safetensors`. `which=None`: the teacher when the run has one (DINO, iBOT), else the student
    (SimCLR). Default output `RUN/export/{which}`, with a model card (`write_model_card`: method, config and manifest
    sha256, probe results of these weights). `with_heads`: also the network's projection heads (`heads.safetensors`,
    `sslpipe.weights.heads`), so `model.init_from` continues the run exactly.
    """
    if which not in ("teacher", "student", None):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run} is not an sslpipe run directory")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    method = cfg.get("method") if isinstance(cfg, dict) else None
    if method in DENSE_RUNS:
        raise ValueError(f"{run} is a {method} run: its network is a whole {DENSE_RUNS[method][0]} network, not a "
                         f"backbone, so `sslpipe export` does not write it; evaluate it with "
                         f"`{DENSE_RUNS[method][1]}`")
    ckpt = find_checkpoint(run, checkpoint)
    extra = ckpt / EXTRA_STATE
    has_teacher = extra.is_file() and any(k.startswith("teacher.") for k in load_file(str(extra)))
    if which is None:
        which = "teacher" if has_teacher else "student"
    elif which == "teacher" and extra.is_file() and not has_teacher:
        raise ValueError(f"{run} has no teacher (method {_cfg_get(cfg, 'method', cfg_path, '?')}): export the "
                         "student (`sslpipe export RUN --which student`)")
    weights = ckpt / (EXTRA_STATE if which == "teacher" else MODEL)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found; {ckpt} holds {sorted(p.name for p in ckpt.iterdir())}")
    _check_read_files(ckpt, {weights.name, MODEL} if with_heads else {weights.name})
    state = strip_prefix(load_file(str(weights)), "teacher" if which == "teacher" else "")
    state = {k: v for k, v in state.items() if k.split(".")[-1] not in TRAINING_ONLY_KEYS}

    arch = _cfg_get(cfg, "model.arch", cfg_path)
    img_size = int(_cfg_get(cfg, "crops.global_size", cfg_path))
    module, model_args = create_timm_backbone(
        arch, img_size, _cfg_get(cfg, "model.patch_size", cfg_path, None),
        _cfg_get(cfg, "model.kwargs", cfg_path, None) or {},
    )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"{weights} does not match model.arch={arch!r} of {cfg_path}: {err}")
    step = step_of(ckpt)
    source = {"run_dir": str(run.resolve()), "checkpoint": str(ckpt.resolve()), "step": step, "which": which}
    out_dir = Path(out) if out is not None else run / "export" / which
    previous = out_dir / WEIGHTS_NAME
    before = (weights_digest(out_dir), previous.stat().st_mtime) if previous.is_file() else None
    out_dir = export_backbone(
        module.eval(), out_dir, arch=arch, model_args=model_args,
        img_size=img_size, mean=_cfg_get(cfg, "crops.mean", cfg_path, (0.485, 0.456, 0.406)),
        std=_cfg_get(cfg, "crops.std", cfg_path, (0.229, 0.224, 0.225)), source=source,
    )
    method = str(_cfg_get(cfg, "method", cfg_path, "unknown"))
    if with_heads:
        raw = load_file(str(weights))
        network = {k.removeprefix("teacher."): v for k, v in raw.items()
                   if which == "student" or k.startswith("teacher.")}
        with safe_open(str(ckpt / MODEL), "pt") as student:  # the teacher takes no mask: the student's, which
            if MASK_TOKEN in student.keys():  # continued training starts from (one tensor, not the whole file)
                network[MASK_TOKEN] = student.get_tensor(MASK_TOKEN)
        write_heads(out_dir, heads_of(network, method), method)
    unchanged = before is not None and before[0] == weights_digest(out_dir)  # recorded by export_backbone
    probed = "teacher" if has_teacher else "student"  # the network a run's periodic kNN probes
    write_model_card(
        out_dir, title=f"{arch} pretrained with {method} (sslpipe)", tags=[method],
        provenance=[("method", f"`{method}`; the resolved recipe is the run's `config.yaml`, sha256 "
                               f"`{sha256_file(cfg_path)}`"),
                    ("checkpoint", f"`{ckpt.name}`, the {which}"),
                    *([("training data", _manifest_row(data))] if (data := _cfg_get(cfg, "data.train", cfg_path,
                                                                                    None)) else []),
                    *_teacher_rows(run)],
        results=_probe_rows(run, out_dir, step, which == probed, before[1] if unchanged else None))
    return out_dir

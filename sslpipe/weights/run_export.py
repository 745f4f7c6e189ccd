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
from safetensors import safe_open
from safetensors.torch import load_file

from sslpipe.config.loading import load_yaml
from sslpipe.files import digest_matches
from sslpipe.metrics_log import current_trajectory, read_records
from sslpipe.metrics_log import step_of as step_of_record
from sslpipe.weights.card import model_card
from sslpipe.weights.checkpoint import (
    EXTRA_STATE,
    FILES,
    MODEL,
    STATE_DIGEST,
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
    staged_export,
)
from sslpipe.weights.hashing import sha256_file
from sslpipe.weights.heads import MASK_TOKEN, heads_of, stage_heads
from sslpipe.weights.training_data import training_data_row
from sslpipe.weights.verify import file_problems, own_digest_problem

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


def _periodic_rows(run: Path, step: int | None) -> list[tuple[str, str]]:
    """The run's periodic kNN at the exported step, on the trajectory that reached these weights
    (`current_trajectory`: a roll-back to an older checkpoint drops what the abandoned trajectory logged after it; a
    line cut by a crash is skipped)."""
    metrics = run / "metrics.jsonl"
    if step is None or not metrics.is_file():
        return []
    found: dict[str, float] = {}
    for rec in current_trajectory(read_records(metrics)):
        if step_of_record(rec) == step:
            found.update({k: v for k, v in rec.items() if k.startswith("knn/") and isinstance(v, (int, float))})
    return [(f"kNN {k.split('/', 1)[1]}, data.val, measured during training at step {step}", f"{v:.4f}")
            for k, v in found.items()]


def _result_rows(run: Path, out: Path, same_weights_since: float | None) -> list[tuple[str, str]]:
    """kNN result files (`sslpipe knn --out`, the demo's knn_*.json) in the export folder, the run or its parent
    whose `backbone` is this export folder -- only when the folder held these same weights before and the file was
    written since (`same_weights_since`)."""
    rows: list[tuple[str, str]] = []
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
    try:
        teacher = json.loads(record.read_text())
        return [("distilled from", f"`{teacher['teacher']}` ({teacher.get('architecture')}), model.safetensors "
                                   f"sha256 `{teacher['sha256']}`")]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{record} is unreadable ({type(err).__name__}: {err}): it names the teacher the model "
                         "card credits; resume the run once (it writes the file again) or delete it to export "
                         "without that row") from err


def _trainer_state(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, checked against the digest of its own content when it has one."""
    path = ckpt / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointInvalid(f"{path} is unreadable ({err}): export another checkpoint (--checkpoint step_N; "
                                f"`sslpipe check {ckpt.parent.parent}` lists them)") from err
    if not isinstance(state, dict):
        raise CheckpointInvalid(f"{path} is not a trainer state (a JSON object): export another checkpoint")
    if digest_matches(state, STATE_DIGEST) is False:
        _damaged(ckpt, [own_digest_problem(TRAINER_STATE)])
    return state


def _damaged(ckpt: Path, problems: list[str]) -> None:
    raise CheckpointInvalid(f"{ckpt} is damaged ({'; '.join(problems)}): export another checkpoint "
                            f"(--checkpoint step_N; `sslpipe check {ckpt.parent.parent}` lists them)")


def _check_read_files(ckpt: Path, state: Mapping[str, Any], names: set[str]) -> None:
    """The checkpoint files the export reads against the sizes and sha256s its trainer_state.json records, before
    any is opened (a flipped bit would otherwise be exported as if it were the trained weights, a cut file fail
    inside safetensors); a checkpoint without checksums is read as it is."""
    table = state.get(FILES) or {}
    problems = file_problems(ckpt, {name: entry for name, entry in table.items() if name in names})
    if problems:
        _damaged(ckpt, problems)


def _has_teacher(extra: Path, required: bool) -> bool | None:
    """Whether the checkpoint's extra state holds a `teacher.*` network (its header only). Unreadable: a one-line
    `CheckpointInvalid` when the export needs the file (`required`), else None (not known)."""
    if not extra.is_file():
        return False
    try:
        with safe_open(str(extra), "pt") as f:
            return any(k.startswith("teacher.") for k in f.keys())
    except Exception as err:  # noqa: BLE001 -- safetensors raises its own error type for any unreadable file
        if required:
            _damaged(extra.parent, [f"{extra.name} is unreadable: {err}"])
        return None


# the dense methods train a whole network on a backbone that came from an export (or timm): nothing new to export
DENSE_RUNS = {"u2pl": ("segmentation", "sslpipe eval-seg RUN"),
              "supervised_seg": ("segmentation", "sslpipe eval-seg RUN"),
              "finetune_mask2former": ("Mask2Former", "sslpipe predict RUN"),
              "finetune_vitdet": ("ViTDet", "sslpipe predict RUN")}


def _heads(ckpt: Path, weights: Path, which: str, method: str) -> dict[str, torch.Tensor]:
    """The projection heads of the exported network, with the student's mask token (the teacher takes no mask: the
    student's is the one continued training starts from)."""
    raw = load_file(str(weights))
    network = {k.removeprefix("teacher."): v for k, v in raw.items() if which == "student" or k.startswith("teacher.")}
    with safe_open(str(ckpt / MODEL), "pt") as student:  # one tensor, not the whole file
        if MASK_TOKEN in student.keys():
            network[MASK_TOKEN] = student.get_tensor(MASK_TOKEN)
    return heads_of(network, method)


def export_run(
    run_dir: str | Path,
    which: str | None = "teacher",
    out: str | Path | None = None,
    checkpoint: str | Path | int | None = None,
    with_heads: bool = False,
    force: bool = False,
) -> Path:
    """Export the teacher or student backbone of a run (the newest complete checkpoint unless `checkpoint` is a step
    or folder: `find_checkpoint`).

    Reads `RUN/config.yaml` (`model.arch`, `model.patch_size`, `model.kwargs`, `crops.global_size`, `crops.mean`,
    `crops.std`) and `checkpoints/step_N/`: the teacher from `extra_state.safetensors` (keys `teacher.*`), the
    student from `model.safetensors`, each checked against its checkpoint's sha256 first. `which=None`: the teacher
    when the run has one (DINO, iBOT), else the student (SimCLR). Default output `RUN/export/{which}`, with a model
    card (`model_card`: method, config and training-data manifest sha256, probe results of these weights).
    `with_heads`: also the network's projection heads (`heads.safetensors`, `sslpipe.weights.heads`), so
    `model.init_from` continues the run exactly. Everything that can fail is read before the folder is touched, and
    its files are replaced together (`staged_export`): an error leaves an earlier export there as it was. `force`:
    write into a non-empty `out` that holds no sslpipe export.
    """
    if which not in ("teacher", "student", None):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run} is not an sslpipe run directory")
    cfg = load_yaml(cfg_path.read_text()) or {}  # YAML 1.2, as save_config wrote it (`run_name: 0.5_1` a string)
    method = cfg.get("method") if isinstance(cfg, dict) else None
    if method in DENSE_RUNS:
        raise ValueError(f"{run} is a {method} run: its network is a whole {DENSE_RUNS[method][0]} network, not a "
                         f"backbone, so `sslpipe export` does not write it; evaluate it with "
                         f"`{DENSE_RUNS[method][1]}`")
    ckpt = find_checkpoint(run, checkpoint)
    trainer_state = _trainer_state(ckpt)
    extra = ckpt / EXTRA_STATE
    if which != "student":
        _check_read_files(ckpt, trainer_state, {EXTRA_STATE})
    has_teacher = _has_teacher(extra, required=which != "student")
    if which is None:
        which = "teacher" if has_teacher else "student"
    elif which == "teacher" and extra.is_file() and not has_teacher:
        raise ValueError(f"{run} has no teacher (method {_cfg_get(cfg, 'method', cfg_path, '?')}): export the "
                         "student (`sslpipe export RUN --which student`)")
    weights = ckpt / (EXTRA_STATE if which == "teacher" else MODEL)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found; {ckpt} holds {sorted(p.name for p in ckpt.iterdir())}")
    _check_read_files(ckpt, trainer_state, {weights.name, MODEL} if with_heads else {weights.name})
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
    method = str(_cfg_get(cfg, "method", cfg_path, "unknown"))
    heads = _heads(ckpt, weights, which, method) if with_heads else None
    step = step_of(ckpt)
    data = _cfg_get(cfg, "data.train", cfg_path, None)
    provenance = [("method", f"`{method}`; the resolved recipe is the run's `config.yaml`, sha256 "
                             f"`{sha256_file(cfg_path)}`"),
                  ("checkpoint", f"`{ckpt.name}`, the {which}"),
                  *([("training data", training_data_row(run, data))] if data else []),
                  *_teacher_rows(run)]
    probed = {True: "teacher", False: "student", None: None}[has_teacher]  # the network a run's periodic kNN probes
    periodic = _periodic_rows(run, step) if which == probed else []
    source = {"run_dir": str(run.resolve()), "checkpoint": str(ckpt.resolve()), "step": step, "which": which}
    out_dir = Path(out) if out is not None else run / "export" / which
    previous = out_dir / WEIGHTS_NAME
    since = previous.stat().st_mtime if previous.is_file() else None
    with staged_export(module.eval(), out_dir, arch=arch, model_args=model_args, img_size=img_size,
                       mean=_cfg_get(cfg, "crops.mean", cfg_path, (0.485, 0.456, 0.406)),
                       std=_cfg_get(cfg, "crops.std", cfg_path, (0.229, 0.224, 0.225)), source=source,
                       force=force, exclusive=True) as staged:
        if heads is not None:
            stage_heads(staged, heads, method)
        results = [*periodic, *_result_rows(run, out_dir, since if staged.same_weights else None)]
        staged.card = lambda config: model_card(config, title=f"{arch} pretrained with {method} (sslpipe)",
                                                tags=[method], provenance=provenance, results=results)
    return out_dir

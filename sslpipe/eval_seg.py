"""`sslpipe eval-seg`: evaluate a U2PL / supervised segmentation run directory (its newest or a named checkpoint,
teacher or student) with `sslpipe.eval.seg_eval.evaluate_segmentation`; the result JSON goes to RUN/eval/."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sslpipe.config.loading import read_yaml
from sslpipe.eval.seg_eval import evaluate_segmentation
from sslpipe.recipes import config_from_dict, get_recipe
from sslpipe.weights.checkpoint import find_checkpoint


def eval_seg_run(run: str | Path, *, checkpoint: str | None = None, which: str = "teacher", data: str | None = None,
                 split: str | None = None, mode: str | None = None, crop: int | None = None,
                 max_images: int | None = None, out: str | Path | None = None,
                 device: str | None = None) -> dict[str, Any]:
    """Evaluate a segmentation run (`method: u2pl` or `supervised_seg`): its newest (or the given) checkpoint, the
    teacher (U2PL; the student for a supervised run, or a checkpoint from before the teacher started) or the student,
    on the run's data.val or `data`.
    Writes the result JSON to `out` (default RUN/eval/eval_seg.json)."""
    run = Path(run)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {run} is not an sslpipe run directory")
    cfg = config_from_dict(read_yaml(cfg_path), where=str(cfg_path), saved=True)  # YAML 1.2, as it was written
    recipe = get_recipe(cfg.method)(cfg)
    if not hasattr(recipe, "build_model"):
        raise ValueError(f"{run}: method {cfg.method!r} is not a segmentation recipe (u2pl, supervised_seg)")
    recipe.run_dir = run  # the normalisation the run recorded (`sslpipe.recipes.init_record`)
    model = recipe.build_model(from_checkpoint=True)
    ckpt = find_checkpoint(run, int(checkpoint) if checkpoint and checkpoint.isdigit() else checkpoint)
    extra = load_file(str(ckpt / "extra_state.safetensors")) if (ckpt / "extra_state.safetensors").is_file() else {}
    teacher = {k[len("teacher."):]: v for k, v in extra.items() if k.startswith("teacher.")}
    if teacher and not int(extra.get("teacher_ready", 1)):  # saved during the supervised-only epochs: untrained
        print(f"{ckpt.name}: the teacher has not started (u2pl.sup_only_epoch): the student is evaluated, as in "
              "training", file=sys.stderr)
        teacher = {}
    if which == "teacher" and teacher:
        state, used = teacher, "teacher"
    elif which in ("teacher", "student"):
        state, used = load_file(str(ckpt / "model.safetensors")), "student"
    else:
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    model.load_state_dict(state, strict=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    e, section = cfg.eval, recipe.section
    mode = mode or e.mode or "whole"
    if crop is not None and mode != "slide":
        raise ValueError(f"--crop {crop} is read only by the sliding-window evaluation: add --mode slide, or drop it")
    result = evaluate_segmentation(
        model, recipe.eval_batches(data, split), recipe.num_classes, class_names=recipe.class_names,
        ignore_index=section.ignore_index, mode=mode, crop=crop or e.window or section.crop_size,
        stride_rate=e.stride_rate, device=dev, max_images=max_images, progress=True)
    result.update(checkpoint=str(ckpt), model=used, data=data or cfg.data.val, split=split or cfg.data.val_split,
                  mode=mode)
    out = Path(out) if out else run / "eval" / "eval_seg.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    result["json"] = str(out)
    return result

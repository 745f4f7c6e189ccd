"""`sslpipe predict`: the predictions of a fine-tuned run next to the ground truth, as a PNG of overlays (drawn by
`sslpipe.viz.overlays`), with the metrics over the images drawn."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def predict_run(run: str | Path, *, checkpoint: str | Path | None = None, data: str | None = None,
                split: str | None = None, n: int = 8, out: str | Path | None = None) -> dict[str, Any]:
    """Rebuild a fine-tuning run's network from `RUN/config.yaml`, load a checkpoint (default: the newest) and
    write the overlays of the first `n` images of `data` (default: the run's data.val) to `out` (default:
    `RUN/predictions/predict.png`). Returns {"png": path, "metrics": metrics over those n images}."""
    from safetensors.torch import load_file

    from sslpipe.recipes import get_recipe, load_config
    from sslpipe.recipes.finetune import DenseFinetuneRecipe
    from sslpipe.weights.checkpoint import find_checkpoint

    run = Path(run)
    if (run / "trainer_state.json").is_file() and checkpoint is None:  # a checkpoint folder was given
        run, checkpoint = run.parent.parent, run
    cfg = load_config(run / "config.yaml", saved=True)
    recipe = get_recipe(cfg.method)(cfg)
    if not isinstance(recipe, DenseFinetuneRecipe):
        raise ValueError(f"{run} was trained with method {cfg.method!r}: `sslpipe predict` needs a fine-tuning run "
                         "(finetune_mask2former or finetune_vitdet)")
    ckpt = find_checkpoint(run, checkpoint)
    if not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"no checkpoint with model.safetensors under {run / 'checkpoints'}: train first, "
                                "or pass --checkpoint")
    recipe.run_dir = run  # the network and normalisation the run recorded (`sslpipe.recipes.init_record`)
    model = recipe.build_model(from_checkpoint=True)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    png = Path(out) if out is not None else run / "predictions" / "predict.png"
    metrics = recipe.run_evaluation(max_images=n, png=png, n_png=n, spec=data, split=split, progress=True)
    return {"png": png, "metrics": metrics, "checkpoint": ckpt}

"""`<method>.qscore.features` inside DINO and iBOT: the regulariser receives the matrix the key names, the backbone
CLS of the student's global crops or their head outputs, and the loss grows by its term on exactly that matrix.

tests/recipes/test_recipes.py checks that the loss grows by the reported term, which holds whichever matrix the term
is computed on; a recipe that ignored `features` passed it. Here the regulariser's input is recorded and checked
against the student's own outputs (forward hooks on its backbone and head)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from sslpipe.recipes import load_config
from sslpipe.recipes.dino import DINORecipe
from sslpipe.recipes.ibot import IBOTRecipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SCHED = {"teacher_temp": 0.04, "teacher_patch_temp": 0.04, "it": 0}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)


def _step(recipe_cls, m: str, shards: Path, features: str) -> dict:
    """One step with the regulariser on: its recorded input, the student's backbone and head outputs (every call),
    the reported term and the regulariser."""
    cfg = load_config(RECIPES / f"demo_{m}.yaml", [
        f"data.train={shards}", "data.batch_size=4", "data.num_workers=0", "crops.n_local=2",
        "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", f"{m}.qscore.enabled=true",
        f"{m}.qscore.features={features}", f"{m}.qscore.lambda1=0.1", f"{m}.qscore.lambda2=0.01"])
    torch.manual_seed(0)
    recipe = recipe_cls(cfg)
    recipe.build(Accelerator(cpu=True))
    torch.manual_seed(1)
    batch = next(iter(recipe.train_loader(0, 0, 1)))
    regulariser, seen, outputs = recipe.qscore, {}, {"backbone": [], "head": []}
    recipe.qscore = lambda h: (seen.setdefault("input", h.detach().clone()), regulariser(h))[1]
    hooks = [getattr(recipe.student, part).register_forward_hook(
        lambda mod, args, out, part=part: outputs[part].append(out)) for part in ("backbone", "head")]
    torch.manual_seed(2)
    _, metrics = recipe.step(batch, SCHED)
    for hook in hooks:
        hook.remove()
    return {"input": seen["input"], "term": metrics["qscore/term"],
            "regulariser": regulariser, "backbone": outputs["backbone"], "head": outputs["head"]}


def _first_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else _first_tensor(out[0])


@pytest.mark.parametrize("recipe_cls, m", [(IBOTRecipe, "ibot"), (DINORecipe, "dino")])
def test_qscore_features_selects_the_matrix_the_regulariser_sees(digits_shards: Path, recipe_cls, m: str) -> None:
    runs = {f: _step(recipe_cls, m, digits_shards, f) for f in ("backbone", "projection")}
    backbone, projection = runs["backbone"]["input"], runs["projection"]["input"]
    rows = backbone.shape[0]  # the global crops of the batch: 2 x 4
    assert rows == 8 and projection.shape[0] == rows
    assert backbone.shape[1] == 32  # the ViT's width
    assert projection.shape[1] == load_config(RECIPES / f"demo_{m}.yaml").model_dump()[m]["head"]["out_dim"]
    # the backbone run's matrix is the student's backbone CLS of the global crops (its first call: (8, 1 + 64, 32)
    # tokens), the projection run's the head's output on them (DINO: global then local rows; iBOT: (CLS, patches))
    torch.testing.assert_close(backbone, runs["backbone"]["backbone"][0].detach()[:, 0])
    torch.testing.assert_close(projection, _first_tensor(runs["projection"]["head"][0]).detach()[:rows])
    for run in runs.values():  # the reported term is the regulariser's on that matrix
        term, _ = run["regulariser"](run["input"])
        assert run["term"].item() == pytest.approx(term.item(), rel=1e-5)
    assert runs["backbone"]["term"].item() != pytest.approx(runs["projection"]["term"].item(), rel=1e-3)


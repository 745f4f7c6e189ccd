"""`sslpipe bench step`: the trainer's step vs the bare network, on each available device."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sslpipe.bench.step import format_table, run_step_bench

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def tiny(method: str) -> list[str]:
    """Overrides that shrink a demo recipe of `method` to a few-second step."""
    head = [f"{method}.head.{k}={v}" for k, v in (("out_dim", 64), ("hidden_dim", 32), ("bottleneck_dim", 16))]
    patch = [f"{method}.head.patch_out_dim=64"] if method != "dino" else []
    return ["model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", *head, *patch, "crops.n_local=2"]


@pytest.mark.parametrize("method", ["ibot", "dino"])
def test_step_bench_times_both_and_counts_flops(method: str, device: str) -> None:
    torch.set_num_threads(1)
    r = run_step_bench(str(RECIPES / f"demo_{method}.yaml"), device=device, batch_size=4, steps=1, warmup=1,
                       overrides=tiny(method))
    assert r["ours_ms"] > 0 and r["bare_ms"] > 0 and r["ratio_ours_over_bare"] > 0
    # the trainer's step does the bare network's work plus heads and loss: never fewer FLOPs
    assert r["gflop_per_image_ours"] > r["gflop_per_image_bare"] > 0
    assert r["crops"] == "2x32 + 2x16" and r["batch_size"] == 4
    assert (r["mfu_ours"] is None) == (r["peak_tflops"] is None)
    assert "ratio ours / bare" in format_table(r)


def test_step_bench_refuses_other_recipes(tmp_path: Path) -> None:
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("method: tests.workers.toy_recipe:ToyRecipe\ndata: {train: synthetic}\n")
    with pytest.raises(ValueError, match="multi-crop recipes"):
        run_step_bench(str(recipe), device="cpu")

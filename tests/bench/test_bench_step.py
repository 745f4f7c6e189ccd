"""`sslpipe bench step`: the trainer's step vs the bare network; `bench loaded-step`: fed by the loader vs a synthetic
batch; on each available device."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sslpipe.bench.loaded_step import run_loaded_step_bench
from sslpipe.bench.step import format_table, run_step_bench
from sslpipe.cli import main

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


def test_loaded_step_bench_feeds_the_step_from_shards(digits_shards: Path, device: str) -> None:
    """Both rates come from whole timed stretches, the fed side from the recipe's loader, which re-reads a set too
    small for warmup + steps (here 2 batches of 1024 from 1438 digits for 1 + 3 steps)."""
    torch.set_num_threads(1)
    r = run_loaded_step_bench(str(RECIPES / "demo_dino.yaml"), str(digits_shards), device=device, batch_size=4,
                              steps=2, warmup=1, overrides=[*tiny("dino"), "data.num_workers=1"])
    assert r["synthetic_img_s"] > 0 and r["loaded_img_s"] > 0 and r["loaded_steps"] == 2
    assert r["ratio_loaded_over_synthetic"] == pytest.approx(r["loaded_img_s"] / r["synthetic_img_s"])
    assert r["num_workers"] == 1 and r["crops_backend"] == "fast" and "fed from shards" in r["table"]
    big = run_loaded_step_bench(str(RECIPES / "demo_dino.yaml"), str(digits_shards), device=device, batch_size=1024,
                                steps=3, warmup=1, overrides=[*tiny("dino"), "data.num_workers=0"])
    assert big["loaded_img_s"] > 0 and big["loaded_steps"] == 3


def test_cli_loaded_step_writes_its_json(digits_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "loaded.json"
    assert main(["bench", "loaded-step", str(digits_shards), "--recipe", str(RECIPES / "demo_dino.yaml"),
                 "--device", "cpu", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--out", str(out),
                 *tiny("dino"), "data.num_workers=0"]) == 0
    assert json.loads(out.read_text())["ratio_loaded_over_synthetic"] > 0


def test_cli_loaded_step_as_the_readme_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: `bench loaded-step --photos N --recipe R data.num_workers=W`, no folder: the override is an override
    (not the shards folder), and the photos go to runs/bench_photos."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "loaded.json"
    assert main(["bench", "loaded-step", "--photos", "16", "--recipe", str(RECIPES / "demo_dino.yaml"), "--device",
                 "cpu", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--out", str(out), "data.num_workers=1",
                 *tiny("dino")]) == 0
    assert json.loads(out.read_text())["num_workers_asked"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loaded.json", "runs"]
    assert (tmp_path / "runs" / "bench_photos" / "manifest.json").is_file()


def test_compile_bench_sides_load_with_a_recipes_own_backend(tmp_path: Path, monkeypatch) -> None:
    """A recipe that compiles with its own train.compile_backend: every side's overrides load (the eager side's
    train.compile=false used to be refused beside the recipe's backend, a key eager never reads)."""
    import yaml

    import sslpipe.bench.step as step_module
    from sslpipe.recipes import load_config

    data = yaml.safe_load((RECIPES / "demo_dinov2.yaml").read_text())
    data["train"].update(compile=True, compile_backend="aot_eager")
    recipe = tmp_path / "compiled.yaml"
    recipe.write_text(yaml.safe_dump(data))
    seen = {}
    monkeypatch.setattr(step_module, "run_step_bench", lambda path, *, overrides, **kw: seen.setdefault(
        len(seen), load_config(path, overrides)) and {"ours_ms": 1.0, "table": ""})
    step_module.run_compile_bench(str(recipe), overrides=["data.train=unused"])
    assert [(c.train.compile, c.train.compile_backend) for c in seen.values()] == [
        (False, "inductor"), (True, "aot_eager"), (True, "aot_eager")]


def test_compile_bench_times_eager_blocks_and_whole_step(tmp_path: Path) -> None:
    """`bench step --compile` as the CLI runs it (backend aot_eager: inductor's graphs without its code generation):
    three runs side by side, the whole-step one for DINOv2 only, the same FLOPs in each."""
    out = tmp_path / "compile.json"
    assert main(["bench", "step", "--recipe", str(RECIPES / "demo_dinov2.yaml"), "--device", "cpu", "--compile",
                 "--batch-size", "4", "--steps", "1", "--warmup", "1", "--out", str(out),
                 "train.compile_backend=aot_eager", *tiny("dinov2")]) == 0
    r = json.loads(out.read_text())
    assert {"eager", "blocks", "step", "blocks_over_eager", "step_over_eager"} <= set(r)
    assert r["step_over_eager"] == r["step"]["ours_ms"] / r["eager"]["ours_ms"] > 0
    assert r["eager"]["gflop_per_image_ours"] == r["blocks"]["gflop_per_image_ours"] == r["step"][
        "gflop_per_image_ours"] > r["eager"]["gflop_per_image_bare"]
    assert main(["bench", "step", "--recipe", str(RECIPES / "demo_simclr.yaml"), "--compile"]) == 2
    assert main(["bench", "step", "--recipe", str(RECIPES / "demo_dinov2.yaml"), "--compile", "--packing"]) == 2

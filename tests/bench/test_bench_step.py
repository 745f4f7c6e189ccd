"""`sslpipe bench step`: the trainer's step vs the bare network; `bench loaded-step`: fed by the loader vs a synthetic
batch; on each available device."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sslpipe.bench.step as step_module
from sslpipe.bench.loaded_step import run_loaded_step_bench
from sslpipe.bench.step import format_table, matmul_precision, peak_tflops, run_step_bench
from sslpipe.cli import main
from tests.bench.vit_count import vit_flops

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def tiny(method: str) -> list[str]:
    """Overrides that shrink a demo recipe of `method` to a few-second step."""
    head = [f"{method}.head.{k}={v}" for k, v in (("out_dim", 64), ("hidden_dim", 32), ("bottleneck_dim", 16))]
    patch = [f"{method}.head.patch_out_dim=64"] if method != "dino" else []
    local = ["crops.local_size=12"] if method in ("dinov2", "dinov3") else []  # 28-px globals: smaller locals
    return ["model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", *head, *patch, "crops.n_local=2", *local]


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


def test_bare_step_flops_match_a_hand_count_and_mfu_uses_the_precisions_peak(monkeypatch) -> None:
    """The bare network of the tiny demo iBOT (d 32, 1 block, 2 heads, patch 4): teacher forward on 2 global crops of
    32 px (65 tokens), student forward+backward on them and on 2 local crops of 16 px (17 tokens); hand count as in
    tests/bench/vit_count.py. On an "H100 PCIe" in fp32 (mixed_precision no), MFU is against its fp32 peak, 51.2
    TFLOP/s, not the bf16 tensor-core 989 of the SXM card."""
    torch.set_num_threads(1)
    monkeypatch.setattr(step_module, "device_name", lambda device: "NVIDIA H100 PCIe")
    r = run_step_bench(str(RECIPES / "demo_ibot.yaml"), device="cpu", batch_size=4, steps=1, warmup=1,
                       mixed_precision="no", overrides=tiny("ibot"))
    patch_in = 3 * 4 * 4
    hand = 2 * vit_flops(65, 32, 1, patch_in, False) + 2 * vit_flops(65, 32, 1, patch_in, True) + \
        2 * vit_flops(17, 32, 1, patch_in, True)
    assert r["gflop_per_image_bare"] == pytest.approx(hand / 1e9)
    assert r["peak_precision"] == "fp32" and r["peak_tflops"] == 51.2
    assert r["mfu_ours"] == pytest.approx(r["tflops_ours"] / 51.2) and "fp32 peak: 51.2" in r["table"]


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
    ("NVIDIA H100 80GB HBM3", "fp32", 67.0), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H100 PCIe", "fp32", 51.2),
    ("NVIDIA H100 NVL", "fp16", 835.0), ("NVIDIA H200", "bf16", 989.0), ("NVIDIA H200 NVL", "bf16", 835.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA A10G", "bf16", None), ("NVIDIA L40S", "tf32", 183.0), ("NVIDIA L4", "bf16", 121.0), ("cpu", "fp32", None)])
def test_peak_is_the_cards_at_the_precision(name: str, precision: str, peak: float | None) -> None:
    assert peak_tflops(name, precision) == peak


def test_matmul_precision_follows_autocast_and_tf32() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [matmul_precision(p, cpu) for p in ("no", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    flag = torch.backends.cuda.matmul.allow_tf32  # a module-level switch that monkeypatch cannot restore
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert matmul_precision("no", cuda) == "fp32" and matmul_precision("bf16", cuda) == "bf16"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert matmul_precision("no", cuda) == "tf32" and matmul_precision("no", cpu) == "fp32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


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

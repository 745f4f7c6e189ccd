"""`sslpipe demo`, the README's first command, end to end: its default recipe (DINOv2), every stage and what it
writes. The bundled Fashion-MNIST shards take minutes to write and train on, so the test places the digits shards
where the demo looks for its shards (it reuses shards it finds) and stops training after 3 steps."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from sslpipe.cli import main
from sslpipe.engine.trainer import train
from sslpipe.recipes import load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_sslpipe_demo_runs_every_stage_and_writes_the_teacher_export_the_docs_start_from(
        digits_shards: Path, tmp_path: Path, trainer_device: str, fresh_accelerate_state, capsys) -> None:
    out = tmp_path / "demo"
    shutil.copytree(digits_shards, out / "shards")
    code = main(["demo", "--out", str(out), "train.max_steps=3", "data.batch_size=8", "data.num_workers=0",
                 "train.log_every=1", "train.health_every=0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and "sslpipe train" in printed and "demo_dinov2.yaml" in printed
    assert "1/4" in printed and "4/4 kNN probe" in printed

    run = out / "pretrain"
    config = (run / "config.yaml").read_text()
    assert "method: dinov2" in config and "train.max_steps=3" in config
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss_koleo" in r] == [1, 2, 3]

    teacher = run / "export" / "teacher"  # the path docs/finetune.md and the fine-tuning recipes use
    weights = load_file(str(teacher / "model.safetensors"))
    assert weights["pos_embed"].shape == (1, 50, 128) and "blocks.0.ls1.gamma" in weights  # 7x7 patches (28 px) + CLS
    result = json.loads((out / "demo_result.json").read_text())["knn_top1_k20"]
    assert set(result) == {"pretrained", "random init", "raw pixels"}
    assert all(0.0 <= v <= 1.0 for v in result.values())
    assert result["raw pixels"] > 0.9  # 8x8 digits: pixel distance is already a good metric (docs/recipe_table.md)
    # each row of the table probed its own backbone: the trained teacher's export, the random-init export
    for name, row, backbone in (("knn_pretrained.json", "pretrained", teacher),
                                ("knn_random_init.json", "random init", out / "random-init")):
        probe = json.loads((out / name).read_text())
        assert probe["backbone"] == str(backbone) and probe["k"]["20"]["top1"] == result[row]
        assert probe["n_train"] == 1438 and probe["n_test"] == 359
    assert (run / "demo.png").stat().st_size > 0 and (run / "report" / "index.html").is_file()
    assert not torch.equal(weights["pos_embed"], load_file(str(out / "random-init" / "model.safetensors"))["pos_embed"])

    # the Q-score recipe starts from this export as its docs say (its backbone must match the export's, LayerScale)
    qscore_run = train(load_config(RECIPES / "demo_simclr_qscore.yaml", [
        f"data.train={out / 'shards'}", f"data.val={out / 'shards'}", f"model.init_from={teacher}",
        "data.batch_size=8", "data.num_workers=0", "train.max_steps=1", f"output_dir={tmp_path}", "run_name=q"]))
    assert (qscore_run / "metrics.jsonl").read_text().count('"loss"') == 1


def test_demo_force_removes_only_what_the_demo_wrote(tmp_path: Path, monkeypatch) -> None:
    """`--out` may be a shared folder: --force starts the demo over without touching anything else in it (the
    missing Fashion-MNIST stops the demo right after the clean-up)."""
    out = tmp_path / "runs"
    for name in ("shards/train-000000.tar", "pretrain/checkpoints/last.pt", "random-init/model.safetensors",
                 "knn_pretrained.json", "knn_random_init.json", "demo_result.json", "other_run/checkpoint.pt",
                 "notes.md"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    monkeypatch.setenv("SSLPIPE_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    assert main(["demo", "--out", str(out), "--force"]) == 2
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["notes.md", "other_run",
                                                                      "other_run/checkpoint.pt"]

"""README section 2b (continued pretraining, distillation): its commands run as written, from a demo directory, with
size overrides appended so each trains for 2 steps (the demo's own shards replaced by the digits, as in
tests/cli/test_demo.py)."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from helpers import REPO
from safetensors.torch import load_file

from sslpipe.cli import main

SHRINK = ["train.max_steps=2", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=8", "train.log_every=1"]


def readme_commands(section: str) -> list[str]:
    """The command lines of the first code block under README heading `section`."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(section):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("sslpipe ")]


def test_foundation_commands_run_as_the_readme_writes_them(digits_shards: Path, tmp_path: Path, monkeypatch,
                                                            fresh_accelerate_state) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    shutil.copytree(digits_shards, "runs/demo/shards")
    assert main(["train", str(REPO / "recipes/demo_dinov2.yaml"), "output_dir=runs/demo", "run_name=pretrain",
                 *SHRINK]) == 0
    assert main(["export", "runs/demo/pretrain"]) == 0  # what `sslpipe demo` leaves behind
    commands = readme_commands("### 2b.")
    assert len(commands) == 5
    for i, line in enumerate(commands):  # run where the README runs them: a checkout holding runs/demo
        args = [str(REPO / a) if a.startswith("recipes/") else a for a in shlex.split(line)[1:]]
        if args[0] == "train":
            args += [*SHRINK, f"run_name=readme{i}"]
            if "demo_distill" in args[1]:  # the recipe reads the demo's shards, runs/demo/shards
                args += ["data.train=runs/demo/shards", "data.val=runs/demo/shards"]
        assert main(args) == 0, line
    heads = load_file(str(tmp_path / "runs/demo/pretrain/export/teacher_heads/heads.safetensors"))
    assert any(k.startswith("dino_head.") for k in heads)
    adapted = (tmp_path / "runs/readme2/config.yaml").read_text()
    assert "method: dinov2" in adapted and "init_from: runs/demo/pretrain/export/teacher_heads" in adapted
    for i, arch in ((3, "vit_tiny_patch16_224"), (4, "resnet10t")):
        assert f"arch: {arch}" in (tmp_path / f"runs/readme{i}/config.yaml").read_text()
        assert json.loads((tmp_path / f"runs/readme{i}/distill_teacher.json").read_text())["sha256"]

"""`sslpipe train`: train a YAML recipe, on one process or under `accelerate launch -m sslpipe train`, through the one
training entry point (`sslpipe.engine.trainer.run_recipe`) that `sslpipe finetune` shares."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path


def add_recipe_command(sub: argparse._SubParsersAction, name: str, help: str, example: str) -> None:
    """A command that trains a recipe: RECIPE [key.sub=value ...] [--resume auto|RUN|CKPT]."""
    p = sub.add_parser(name, help=help)
    p.add_argument("recipe", help=f"a YAML recipe, e.g. {example}")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3 train.epochs=10")
    p.add_argument("--resume", default=None,
                   help="`auto` (newest run in output_dir with a checkpoint), a run directory or a checkpoint")


def resume_arg(resume: str | None) -> str | None:
    """`--resume` as the trainer takes it. An empty value (`--resume "$RUN"` with RUN unset) is refused: taken as no
    `--resume`, it would start a new run from scratch. `RUN/checkpoints` (the folder of a run's checkpoints) is read
    as its run, which continues from its newest good checkpoint."""
    if resume is None:
        return None
    if not resume.strip():
        raise ValueError("--resume is empty (an unset shell variable?): give auto, a run directory or a checkpoint "
                         "folder (RUN/checkpoints/step_N), or leave --resume out to start a new run")
    path = Path(resume)
    if path.name == "checkpoints" and path.is_dir():
        return str(path.parent)
    return resume


def train_recipe(args: argparse.Namespace, methods: Sequence[str] | None = None) -> int:
    from sslpipe.engine.trainer import run_recipe

    resume = resume_arg(args.resume)
    run_dir = run_recipe(args.recipe, args.overrides, resume=resume, methods=methods, command=args.command)
    if int(os.environ.get("RANK", "0")) == 0:  # once per job, not once per process
        print(f"run directory: {run_dir}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    add_recipe_command(sub, "train", "train a YAML recipe (works under `accelerate launch -m sslpipe train`)",
                       "recipes/demo_dinov2.yaml")


def run(args: argparse.Namespace) -> int:
    return train_recipe(args)

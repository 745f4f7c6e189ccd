"""`sslpipe finetune`: fine-tune an exported backbone with a dense head; refuses a recipe of another method."""
from __future__ import annotations

import argparse

from sslpipe.cli.train import add_recipe_command, train_recipe

FINETUNE_METHODS = ("finetune_mask2former", "finetune_vitdet")


def add(sub: argparse._SubParsersAction) -> None:
    add_recipe_command(sub, "finetune", "fine-tune an exported backbone with a dense head (Mask2Former, ViTDet Mask "
                                        "R-CNN) from a YAML recipe; evaluates mIoU or mask/box AP",
                       "recipes/demo_finetune_m2f.yaml")


def run(args: argparse.Namespace) -> int:
    return train_recipe(args, FINETUNE_METHODS)

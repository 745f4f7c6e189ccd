"""Test helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def child_env(**extra: str) -> dict[str, str]:
    """The parent's environment for a child process (`accelerate launch`, `python -m sslpipe`), with the repository
    prepended to PYTHONPATH (never replacing it: a machine may need its own entries there) and `extra` set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env

"""The Accelerate training engine: loop, schedules and tracking (docs/internals.md §5); its checkpoints are
`sslpipe.weights`.

`train` and `TrainingDiverged` are imported lazily so that `python -m sslpipe.engine.trainer` runs cleanly.
"""
from typing import Any

from sslpipe.engine.schedules import Schedules

__all__ = ["Schedules", "TrainingDiverged", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainingDiverged"):
        from sslpipe.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'sslpipe.engine' has no attribute {name!r}")

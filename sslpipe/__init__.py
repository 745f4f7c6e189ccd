"""sslpipe: WebDataset shards -> iBOT / DINO pretraining on Accelerate -> exported timm backbone -> kNN probes."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_backbone", "__version__"]


def load_backbone(path: str) -> Any:
    """Load an exported backbone (an export folder or its model.safetensors) as an eval-mode timm model."""
    from sslpipe.weights.export import load_backbone as _load

    return _load(path)

"""The sha256s that identify weights: of a file's bytes (checkpoint tables, export configs, model cards, imported
sources) and of a safetensors file's tensors (whether a re-export wrote the same weights)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open


def sha256_file(path: Path, sync: bool = False) -> str:
    """Hex sha256 of the file's bytes; `sync`: fsync it first, so that the digest describes what is on disk."""
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def tensor_digest(path: Path) -> str:
    """sha256 over the tensors (name, dtype, shape, bytes) of a safetensors file: equal for equal weights, which the
    file's own sha256 is not (safetensors writes its metadata map in no fixed order)."""
    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name)
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

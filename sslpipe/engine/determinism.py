"""`train.deterministic`: run with deterministic kernels so that a resumed GPU run is bit-exact.

On the CPU the trainer is deterministic already: a run killed and resumed ends with the same bits as an uninterrupted
one. On a GPU several kernels are not (atomic adds in cuBLAS split-K GEMMs, cuDNN algorithm search, the fused
attention backwards), so without this mode a resumed run matches the uninterrupted one only to float rounding (about
4 significant digits on the iBOT centres after a few steps were measured on an H100). This mode sets:

- ``torch.use_deterministic_algorithms(True)``: an op without a deterministic kernel raises instead of drifting;
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (required by cuBLAS for reproducible GEMMs; set it in the environment before
  the process first uses CUDA to be sure it takes effect, e.g. ``CUBLAS_WORKSPACE_CONFIG=:4096:8 sslpipe train ...``);
- cuDNN ``deterministic=True``, ``benchmark=False``;
- scaled-dot-product attention on its math kernel (the flash / memory-efficient / cuDNN backwards accumulate
  with atomics).

It costs speed (the math attention kernel above all), so it is off by default. Everything is restored on exit, so a
library caller's global torch settings are left as they were.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CUBLAS_CONFIG = ":4096:8"
_SDP_BACKENDS = ("flash", "mem_efficient", "cudnn")


def _sdp_flags() -> dict[str, bool]:
    cuda = torch.backends.cuda
    return {name: getattr(cuda, f"{name}_sdp_enabled")() for name in _SDP_BACKENDS
            if hasattr(cuda, f"{name}_sdp_enabled")}


def _set_sdp_flags(flags: dict[str, bool]) -> None:
    for name, value in flags.items():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(value)


@contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic kernels inside the block when `enabled` (see the module docstring); a no-op otherwise."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, _sdp_flags(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_CONFIG)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    _set_sdp_flags({name: False for name in saved[4]})
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        _set_sdp_flags(saved[4])
        if saved[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)

"""Shared test fixtures: a small shard set of scikit-learn's digits (written once per test session), the devices a
device-dependent test runs on (the CPU always, CUDA when present), and the environment of child processes."""

from __future__ import annotations

import os
from pathlib import Path

# cuBLAS reads its workspace setting when CUDA is first used; deterministic-mode tests need it (harmless otherwise).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from helpers import DEVICES  # noqa: E402

from sslpipe.ingest.options import ShardOptions  # noqa: E402
from sslpipe.ingest.shards import write_shards  # noqa: E402

DIGITS_SAMPLES_PER_SHARD = 128  # 1438 train -> 12 train shards, 359 val -> 3 val shards


def make_digits_shards(out_dir: Path, samples_per_shard: int = DIGITS_SAMPLES_PER_SHARD) -> Path:
    """Write the digits data set (8x8 grayscale png, labels 0..9) as shards into ``out_dir``; return it."""
    write_shards(out_dir, source="digits", options=ShardOptions(samples_per_shard=samples_per_shard), progress=False,
                 created_by="pytest digits_shards fixture")
    return Path(out_dir)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with ``train-*.tar`` (12 shards, 1438 samples), ``val-*.tar`` (3 shards, 359) and manifest.json.

    Read-only: copy it before modifying anything, other tests share it.
    """
    return make_digits_shards(tmp_path_factory.mktemp("digits_shards"))


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each available device in turn: "cpu" everywhere, "cuda" where a GPU is present."""
    return request.param


@pytest.fixture
def trainer_device(device: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the in-process trainer on `device`: ACCELERATE_USE_CPU=1 keeps it on the CPU when a GPU exists."""
    if device == "cpu":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    else:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    return device


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide singletons. One torch thread
    (two busy processes on two cores oversubscribe otherwise)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt of timm to fetch weights fails the test."""
    from timm.models import _builder

    def refuse(*args, **kwargs):
        raise AssertionError("timm tried to download weights")

    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(_builder, name, refuse)

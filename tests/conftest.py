"""Shared test fixtures: a small shard set of scikit-learn's digits (written once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sslpipe.data.shards import write_shards

DIGITS_SAMPLES_PER_SHARD = 128  # 1438 train -> 12 train shards, 359 val -> 3 val shards


def make_digits_shards(out_dir: Path, samples_per_shard: int = DIGITS_SAMPLES_PER_SHARD) -> Path:
    """Write the digits data set (8x8 grayscale png, labels 0..9) as shards into ``out_dir``; return it."""
    write_shards(out_dir, source="digits", samples_per_shard=samples_per_shard, progress=False,
                 created_by="pytest digits_shards fixture")
    return Path(out_dir)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with ``train-*.tar`` (12 shards, 1438 samples), ``val-*.tar`` (3 shards, 359) and manifest.json.

    Read-only: copy it before modifying anything, other tests share it.
    """
    return make_digits_shards(tmp_path_factory.mktemp("digits_shards"))

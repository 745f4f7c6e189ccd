"""`--photos N` of `sslpipe bench loader / loaded-step`: the photo set is written only where no other data is, after
the other arguments are checked, with the shard count asked for; the loaded-step bench reports the workers that ran."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sslpipe.bench.photos import make_photo_shards
from sslpipe.data.manifest import read_manifest, verify_shards

SMALL = (40, 30)  # photo size: the tests need the set's layout, not ImageNet-sized images


def test_photos_never_replace_another_shard_set(digits_shards: Path, tmp_path: Path, capsys) -> None:
    from sslpipe.cli import main

    out = shutil.copytree(digits_shards, tmp_path / "user")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="drop --photos"):
        make_photo_shards(out, 8, size=SMALL)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="drop --photos"):
        make_photo_shards(tmp_path / "other", 8, size=SMALL)
    assert main(["bench", "loader", str(out), "--photos", "8"]) == 2
    assert "drop --photos" in capsys.readouterr().err
    assert verify_shards(out) == [] and read_manifest(out)["splits"]["train"]["samples"] == 1438
    assert (out / "notes.txt").read_text() == (tmp_path / "other" / "notes.txt").read_text() == "keep"


def test_photos_wait_for_the_other_arguments(tmp_path: Path) -> None:
    from sslpipe.bench.loaded_step import run_loaded_step_bench
    from sslpipe.bench.loader import run_loader_bench_from_recipe

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config file not found"):
        run_loader_bench_from_recipe(str(tmp_path / "empty"), str(tmp_path / "no.yaml"), photos=8)
    assert list((tmp_path / "empty").iterdir()) == []
    with pytest.raises(ValueError, match="config file not found"):
        run_loaded_step_bench(str(tmp_path / "no.yaml"), str(tmp_path / "empty"), photos=8)
    assert list((tmp_path / "empty").iterdir()) == []


def test_photo_set_is_reused_only_with_enough_shards(tmp_path: Path) -> None:
    out = tmp_path / "photos"
    make_photo_shards(out, 8, size=SMALL, samples_per_shard=8)  # the loader bench's layout: 1 shard
    first = read_manifest(out)
    assert len(first["splits"]["train"]["shards"]) == 1
    make_photo_shards(out, 8, size=SMALL, samples_per_shard=2)  # the loaded-step bench's: 4 shards
    assert len(read_manifest(out)["splits"]["train"]["shards"]) == 4
    again = read_manifest(out)
    make_photo_shards(out, 8, size=SMALL, samples_per_shard=8)  # 4 shards are enough for 1: reused, not rewritten
    assert read_manifest(out)["created_at"] == again["created_at"] and len(again["splits"]["train"]["shards"]) == 4
    make_photo_shards(out, 6, size=SMALL, samples_per_shard=8)  # another count: its own photo set, rewritten
    assert read_manifest(out)["splits"]["train"]["samples"] == 6


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_loaded_step_counts_the_workers_the_loader_starts(digits_shards: Path) -> None:
    """`build_loader` starts no more workers than the rank has shards (3 val shards here): that is what ran."""
    from sslpipe.bench.loaded_step import _workers_started
    from sslpipe.data.stream import build_loader

    loader = build_loader(str(digits_shards), split="val", sample_fn=lambda s: s, collate_fn=list, batch_size=4,
                          num_workers=8)
    assert _workers_started(loader, 8) == 3
    assert _workers_started(object(), 8) == 8

"""Segmentation layouts written as U2PL's shard sets (`write_source` with --voc / --ade20k): reruns into the same
OUT, with and without --force, never mix old and new data."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslpipe.data.manifest import read_manifest
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.route import ShardSource, write_source

OPTIONS = ShardOptions(samples_per_shard=2)


def make_voc(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """A VOC-style folder of 8x8 images; label = the image's index (all pixels)."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = [f"img{i}" for i in range(n_train + n_val)]
    for i, name in enumerate(ids):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(root / "JPEGImages" / f"{name}.png")
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def make_ade(root: Path, value: int) -> Path:
    """An ADEChallengeData2016 folder, 2 images per split; object pixels labelled `value` (-> value - 1), one pixel
    0 ("other" -> 255), the rest 150 (-> 149)."""
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(root / "images" / split / f"ADE_{i}.jpg")
            label = np.full((8, 8), 150, np.uint8)
            label[:4, :4] = value
            label[7, 7] = 0
            Image.fromarray(label).save(root / "annotations" / split / f"ADE_{i}.png")
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ade20k_converted_labels_follow_their_source(tmp_path: Path) -> None:
    """Another ADE root written into the same OUT with --force gets its own labels (both roots name their files
    alike), and a corrected annotation of the same root is converted again."""
    out = tmp_path / "out"
    write_source(out, ShardSource(ade20k=str(make_ade(tmp_path / "ade1", 1))), OPTIONS, progress=False)
    assert read_manifest(out / "labeled")["seg_values"] == [0, 149, 255]
    ade2 = make_ade(tmp_path / "ade2", 13)
    write_source(out, ShardSource(ade20k=str(ade2)), OPTIONS, force=True, progress=False)
    assert read_manifest(out / "labeled")["seg_values"] == [12, 149, 255]

    fixed = ade2 / "annotations" / "training" / "ADE_0.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(fixed)
    stat = fixed.stat()
    os.utime(fixed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later edit, whatever the clock's grain
    write_source(out, ShardSource(ade20k=str(ade2)), OPTIONS, force=True, progress=False)
    assert read_manifest(out / "labeled")["seg_values"] == [6, 12, 149, 255]


def test_force_without_unlabelled_subset_removes_the_old_unlabeled_set(tmp_path: Path) -> None:
    voc, out = make_voc(tmp_path / "voc"), tmp_path / "out"
    write_source(out, ShardSource(voc=str(voc)), OPTIONS, labeled="1", progress=False)
    assert read_manifest(out / "unlabeled")["splits"]["train"]["samples"] == 3
    lines = write_source(out, ShardSource(voc=str(voc)), OPTIONS, force=True, progress=False)
    assert [line.split(":")[0] for line in lines] == [f"{out}/labeled", f"{out}/val"]
    assert sorted(p.name for p in out.iterdir()) == ["labeled", "lists", "split.json", "val"]
    assert sorted(p.name for p in (out / "lists").iterdir()) == ["labeled.txt", "val.txt"]
    assert read_manifest(out / "labeled")["splits"]["train"]["samples"] == 4
    assert json.loads((out / "split.json").read_text())["unlabeled"] == []


def test_refused_rerun_writes_nothing_into_out(tmp_path: Path) -> None:
    voc, out = make_voc(tmp_path / "voc"), tmp_path / "out"
    write_source(out, ShardSource(voc=str(voc)), OPTIONS, labeled="2", progress=False)
    before = {p: digest(p) for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="--force"):
        write_source(out, ShardSource(voc=str(voc)), OPTIONS, labeled="3", progress=False)
    with pytest.raises(FileExistsError, match="--force"):  # ADE would convert its labels into OUT/source first
        write_source(out, ShardSource(ade20k=str(make_ade(tmp_path / "ade", 1))), OPTIONS, progress=False)
    assert {p: digest(p) for p in out.rglob("*") if p.is_file()} == before


def test_voc_train_and_val_splits_must_not_share_ids(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "voc")
    (voc / "ImageSets" / "Segmentation" / "trainval.txt").write_text("\n".join(f"img{i}" for i in range(6)) + "\n")
    with pytest.raises(ValueError, match=r"share 2 ids, e.g. \['img4', 'img5'\]"):
        write_source(tmp_path / "out", ShardSource(voc=str(voc), voc_splits=("trainval", "val")), OPTIONS,
                     progress=False)
    assert not (tmp_path / "out").exists()

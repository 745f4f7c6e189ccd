"""Segmentation layouts written as U2PL's shard sets (`write_source` with --voc / --ade20k): reruns into the same
OUT, with and without --force, never mix old and new data."""
from __future__ import annotations

import hashlib
import io
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


def test_a_failed_layout_run_publishes_no_set(tmp_path: Path) -> None:
    """One unreadable val image: the error names split `val`, and no set of the run reads as complete (fresh run),
    or the sets of the earlier run stay as they were (--force)."""
    voc, out = make_voc(tmp_path / "voc"), tmp_path / "out"
    good = (voc / "JPEGImages" / "img5.png").read_bytes()
    (voc / "JPEGImages" / "img5.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"out/val: 1 of 2 images could not be read, e.g. \{'source': '.*img5.png', "
                                         r"'split': 'val'.*no shard set of this run was written"):
        write_source(out, ShardSource(voc=str(voc)), OPTIONS, labeled="2", progress=False)
    for name in ("labeled", "unlabeled", "val"):
        with pytest.raises(FileNotFoundError):
            read_manifest(out / name)
    assert not list(out.rglob("*.tar*")) and not (out / "split.json").exists() and not (out / "lists").exists()

    (voc / "JPEGImages" / "img5.png").write_bytes(good)
    write_source(out, ShardSource(voc=str(voc)), OPTIONS, labeled="2", progress=False)  # no --force needed
    assert read_manifest(out / "val")["splits"]["val"]["samples"] == 2
    before = {p: digest(p) for p in out.rglob("*") if p.is_file()}
    (voc / "JPEGImages" / "img5.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="could not be read"):
        write_source(out, ShardSource(voc=str(voc)), OPTIONS, labeled="3", force=True, progress=False)
    assert {p: digest(p) for p in out.rglob("*") if p.is_file()} == before


def test_a_disk_that_fills_while_publishing_leaves_no_mix_of_two_runs(tmp_path: Path, monkeypatch) -> None:
    """The second set's manifest cannot be written (ENOSPC) after the first set of a --force rerun was published:
    the sets of the earlier run that were not replaced yet are removed with split.json (they drew another labelled
    subset: an image would be labelled in one set and unlabelled in the other), and no file of the run is left."""
    import errno

    from sslpipe.errors import WriteFailed
    from sslpipe.ingest import tar_writer

    voc, out = make_voc(tmp_path / "voc"), tmp_path / "out"
    write_source(out, ShardSource(voc=str(voc)), OPTIONS, labeled="2", progress=False)
    publish, calls = tar_writer.ShardSetWriter.publish, []

    def full_at_the_second(self, manifest: dict) -> None:
        calls.append(self.out.name)
        if len(calls) == 2:
            raise WriteFailed(errno.ENOSPC, f"could not write {self.out / 'manifest.json'}: No space left on device")
        publish(self, manifest)

    monkeypatch.setattr(tar_writer.ShardSetWriter, "publish", full_at_the_second)
    with pytest.raises(WriteFailed, match="No space left"):
        write_source(out, ShardSource(voc=str(voc)), OPTIONS, labeled="3", force=True, progress=False)
    assert calls == ["labeled", "unlabeled"]
    assert read_manifest(out / "labeled")["splits"]["train"]["samples"] == 3  # this run's, published
    assert not (out / "split.json").exists() and not (out / "unlabeled").exists() and not (out / "val").exists()
    assert sorted(p.name for p in (out / "lists").iterdir()) == ["labeled.txt"]
    assert not [p for p in out.rglob("*") if p.name.endswith((".partial", ".pending"))]


def test_layout_label_values_are_checked_against_its_classes(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "voc")
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(voc / "SegmentationClass" / "img1.png")  # VOC has 21
    with pytest.raises(ValueError, match=r"label map .*SegmentationClass/img1.png holds class value\(s\) \[40\], but "
                                         r"the classes name only 21"):
        write_source(tmp_path / "out", ShardSource(voc=str(voc)), OPTIONS, progress=False)
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_layout_reads_the_encoding_options_and_refuses_the_others(tmp_path: Path) -> None:
    from helpers import read_split

    from sslpipe.ingest.layouts import VOC_CLASSES

    voc, out = make_voc(tmp_path / "voc"), tmp_path / "out"
    write_source(out, ShardSource(voc=str(voc)), ShardOptions(samples_per_shard=2, reencode="jpg", max_side=4),
                 progress=False)
    assert read_manifest(out / "labeled")["classes"] == VOC_CLASSES
    assert read_manifest(out / "val")["source"] == str((out / "lists" / "val.txt").resolve())
    samples = read_split(out / "val", "val")
    assert sorted(samples) == ["val_00000000", "val_00000001"]
    for sample in samples.values():
        assert Image.open(io.BytesIO(sample["jpg"])).size == Image.open(io.BytesIO(sample["seg.png"])).size == (4, 4)
    for options, flag in ((ShardOptions(val_fraction=0.2), "val_fraction"), (ShardOptions(limit=1), "limit")):
        with pytest.raises(ValueError, match=rf"{flag} \(--{flag.replace('_', '-')}\) not read by a layout"):
            write_source(tmp_path / "refused", ShardSource(voc=str(voc)), options, progress=False)
    assert not (tmp_path / "refused").exists()


def test_a_layout_id_listed_twice_is_refused(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "voc")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("img0\nimg1\nimg2\nimg0\n")
    with pytest.raises(ValueError, match="the train list names id 'img0' twice"):
        write_source(tmp_path / "out", ShardSource(voc=str(voc)), OPTIONS, labeled="2", progress=False)
    assert not (tmp_path / "out").exists()

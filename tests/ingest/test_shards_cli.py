"""`sslpipe shards` refuses a flag its source does not read, naming the flag, instead of dropping it."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from helpers import read_split
from PIL import Image

from sslpipe.cli import main


@pytest.mark.parametrize(("source", "flags", "named"), [
    (["--dataset", "scenes", "--semi", "--scene-train", "4", "--scene-val", "2"], ["--val-fraction", "0.5"],
     "--val-fraction is not read by a --dataset scenes --semi source"),
    (["--dataset", "scenes", "--semi"], ["--limit", "2", "--max-side", "16"], "--limit is not read by"),
    (["--folder", "FOLDER"], ["--scene-size", "128", "--coco-images", "/nowhere", "--voc-train", "trainaug"],
     "--coco-images, --scene-size, --voc-train are not read by a --folder source"),
    (["--folder", "FOLDER"], ["--semi"], "--semi is not read by a --folder source"),
    (["--dataset", "digits"], ["--seed", "3"], "--seed is not read by a --dataset digits source"),
    (["--voc", "FOLDER"], ["--scene-val", "9"], "--scene-val is not read by a --voc source"),
    (["--voc", "FOLDER"], ["--labeled", "2", "--labeled-list", "ids.txt"],
     "--labeled and --labeled-list both choose the labelled subset"),
])
def test_flags_the_source_does_not_read_are_refused(tmp_path: Path, capsys, source: list[str], flags: list[str],
                                                    named: str) -> None:
    (tmp_path / "f" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "f" / "c" / "x.png")
    source = [str(tmp_path / "f") if a == "FOLDER" else a for a in source]
    assert main(["shards", str(tmp_path / "out"), *source, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_layout_reads_max_side(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["shards", str(out), "--dataset", "scenes", "--semi", "--scene-train", "4", "--scene-val", "2",
                 "--scene-size", "32", "--labeled", "1/2", "--max-side", "16", "--reencode", "jpg"]) == 0
    for name, split in (("labeled", "train"), ("unlabeled", "train"), ("val", "val")):
        for sample in read_split(out / name, split).values():
            assert Image.open(io.BytesIO(sample["jpg"])).size == (16, 16)
            assert Image.open(io.BytesIO(sample["seg.png"])).size == (16, 16)


def test_the_library_refuses_source_details_its_source_does_not_read(tmp_path: Path) -> None:
    from sslpipe.ingest.route import ShardSource

    with pytest.raises(ValueError, match=r"coco_images \(--coco-images\) not read by a folder source"):
        ShardSource(folder=str(tmp_path), coco_images=str(tmp_path))
    with pytest.raises(ValueError, match=r"scenes \(--scene-\*\), voc_splits .* not read by a ade20k source"):
        ShardSource(ade20k=str(tmp_path), scenes={"train": 4}, voc_splits=("trainaug", "val"))

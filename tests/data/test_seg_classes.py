"""The classes of a segmentation task read from shard manifests (sslpipe/data/seg_classes.py): named, counted, or
inferred from the label values; every mismatch a message naming the key, before anything trains."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslpipe.data.seg_classes import segmentation_classes
from sslpipe.ingest.shards import write_shards


def seg_list(tmp_path: Path, labels: list[np.ndarray], name: str = "seg.txt") -> Path:
    lines = []
    for i, lab in enumerate(labels):
        Image.fromarray(np.full((*lab.shape, 3), 40 * i, np.uint8)).save(tmp_path / f"{name}_i{i}.png")
        Image.fromarray(lab).save(tmp_path / f"{name}_l{i}.png")
        lines.append(f"{name}_i{i}.png {name}_l{i}.png")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def unnamed(tmp_path: Path) -> Path:
    """A seg-list without --classes whose label maps hold 0, 1, 5 and 255."""
    labels = [np.array([[0, 1], [5, 255]], np.uint8), np.array([[0, 0], [1, 1]], np.uint8)]
    out = tmp_path / "unnamed"
    write_shards(out, source=str(seg_list(tmp_path, labels)), progress=False)
    return out


def test_unnamed_classes_are_inferred_from_the_label_values(unnamed: Path, capsys) -> None:
    assert segmentation_classes(str(unnamed), None, "finetune.num_classes") == [str(i) for i in range(6)]
    assert "6 classes from its label values 0..5" in capsys.readouterr().out
    assert segmentation_classes(str(unnamed), 11, "finetune.num_classes") == [str(i) for i in range(11)]


def test_a_class_count_below_the_label_values_is_refused(unnamed: Path) -> None:
    with pytest.raises(ValueError, match=r"hold class value 5, but there are only 3 classes.*finetune.num_classes=6"):
        segmentation_classes(str(unnamed), 3, "finetune.num_classes")


def test_named_classes_are_checked_against_the_count_and_the_val_labels(tmp_path: Path, unnamed: Path) -> None:
    named = tmp_path / "named"
    write_shards(named, source=str(seg_list(tmp_path, [np.array([[0, 2]], np.uint8)], "n.txt")),
                 classes=["bg", "a", "b"], progress=False)
    assert segmentation_classes(str(named), None, "u2pl.num_classes") == ["bg", "a", "b"]
    with pytest.raises(ValueError, match="u2pl.num_classes=4 but the manifest .* lists 3 classes"):
        segmentation_classes(str(named), 4, "u2pl.num_classes")
    with pytest.raises(ValueError, match="hold class value 5, but there are only 3 classes"):
        segmentation_classes(str(named), None, "u2pl.num_classes", val=str(unnamed))


def test_classification_shards_and_unknown_sources_are_refused(digits_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no label maps"):
        segmentation_classes(str(digits_shards), 10, "finetune.num_classes")
    with pytest.raises(ValueError, match="has no manifest.json.*set finetune.num_classes"):
        segmentation_classes(str(tmp_path / "x-{000000..000003}.tar"), None, "finetune.num_classes")
    assert segmentation_classes(str(tmp_path / "x.tar"), 2, "finetune.num_classes") == ["0", "1"]

"""COCO-format instance annotations -> instance shards (sslpipe/ingest/coco.py)."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, child_env, read_split
from PIL import Image
from pycocotools import mask as mask_utils

from sslpipe.data.manifest import read_manifest
from sslpipe.data.targets import masks_to_targets
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.scenes import SCENE_CLASSES, SceneGenerator, skimage_data_dir
from sslpipe.ingest.shards import write_shards


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, by hand: run lengths of the column-major flattening, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], edges])).tolist()}


def rect(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[rows, cols] = True
    return mask


def real_photo(path: Path, w: int, h: int) -> None:
    Image.open(skimage_data_dir() / "astronaut.png").convert("RGB").crop((100, 50, 100 + w, 50 + h)).save(path)


def maps(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(Image.open(io.BytesIO(sample["seg.png"]))),
            np.asarray(Image.open(io.BytesIO(sample["inst.png"]))).astype(np.int64))


@pytest.fixture()
def coco_json(tmp_path: Path) -> tuple[Path, dict]:
    """One annotated real photo (40x32: a car, a person on it, a zebra polygon, a crowd region under the car) and
    one image without annotations; category ids out of order and not contiguous."""
    (tmp_path / "images").mkdir()
    real_photo(tmp_path / "images" / "a.jpg", 40, 32)
    real_photo(tmp_path / "images" / "b.png", 24, 20)
    h, w = 32, 40
    car, person, crowd = rect(h, w, slice(2, 20), slice(2, 30)), rect(h, w, slice(10, 16), slice(20, 26)), \
        rect(h, w, slice(16, 24), slice(26, 38))
    zebra_polygon = [[1.0, 22.0, 12.0, 22.0, 1.0, 31.0]]
    zebra = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(zebra_polygon, h, w))).astype(bool)
    car_rle = mask_utils.encode(np.asfortranarray(car.astype(np.uint8)))
    car_rle["counts"] = car_rle["counts"].decode("ascii")  # as in a json file
    annotations = [
        {"id": 11, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": uncompressed_rle(person)},
        {"id": 12, "image_id": 7, "category_id": 5, "iscrowd": 0, "segmentation": car_rle},
        {"id": 13, "image_id": 7, "category_id": 90, "iscrowd": 0, "segmentation": zebra_polygon},
        {"id": 14, "image_id": 7, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(crowd)},
    ]
    data = {"images": [{"id": 7, "file_name": "a.jpg", "width": w, "height": h},
                       {"id": 8, "file_name": "b.png", "width": 24, "height": 20}],
            "annotations": annotations,
            "categories": [{"id": 90, "name": "zebra"}, {"id": 5, "name": "car"}, {"id": 1, "name": "person"}]}
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return path, {"car": car, "person": person, "zebra": zebra, "crowd": crowd}


def test_coco_json_renders_classes_crowd_and_overlaps(coco_json, tmp_path: Path) -> None:
    path, m = coco_json
    manifest = write_shards(tmp_path / "out", source=str(path), options=ShardOptions(shuffle=False), progress=False)
    assert manifest["source_kind"] == "coco" and manifest["has_seg"] and manifest["has_inst"]
    assert manifest["classes"] == ["background", "person", "car", "zebra"]
    assert manifest["coco"]["category_ids"] == [1, 5, 90]
    assert manifest["coco"]["files"]["train"]["crowd"] == 1 and manifest["coco"]["files"]["train"]["instances"] == 3
    samples = list(read_split(tmp_path / "out", "train").values())
    assert len(samples) == 2 and not manifest["skipped"]
    assert manifest["seg_values"] == [0, 1, 2, 3, 255]
    seg, inst = maps(next(s for s in samples if "jpg" in s))

    expected = np.zeros((32, 40), np.uint8)
    expected[m["crowd"]] = 255
    expected[m["car"]] = 2  # over the crowd region: instances are painted after crowds
    expected[m["zebra"]] = 3
    expected[m["person"]] = 1  # the smaller instance stays on top of the car
    np.testing.assert_array_equal(seg, expected)
    # ids by decreasing area: car (504 px), then zebra (> 36 px), then person (36 px); the crowd region after them,
    # under the instances, its class in crowd.json
    assert m["zebra"].sum() > m["person"].sum()
    expected_inst = np.zeros((32, 40), np.int64)
    expected_inst[m["crowd"]] = 4
    expected_inst[m["car"]], expected_inst[m["zebra"]], expected_inst[m["person"]] = 1, 2, 3
    np.testing.assert_array_equal(inst, expected_inst)
    sample_a = next(s for s in samples if "jpg" in s)
    assert json.loads(sample_a["crowd.json"]) == {"4": 1}  # the crowd region is a person crowd (class 1)

    targets = masks_to_targets(torch.from_numpy(inst), torch.from_numpy(seg.astype(np.int64)))
    assert targets["labels"].tolist() == [2, 3, 1] and targets["iscrowd"].tolist() == [0, 0, 0]  # training
    assert targets["boxes"][0].tolist() == [2, 2, 30, 20] and targets["boxes"][2].tolist() == [20, 10, 26, 16]
    with_crowd = masks_to_targets(torch.from_numpy(inst), torch.from_numpy(seg.astype(np.int64)), crowd={4: 1})
    assert with_crowd["labels"].tolist() == [2, 3, 1, 1] and with_crowd["iscrowd"].tolist() == [0, 0, 0, 1]
    assert with_crowd["boxes"][3].tolist() == [26, 16, 38, 24]  # the crowd rectangle (its part under the car hidden)

    seg_b, inst_b = maps(next(s for s in samples if "png" in s))  # no annotations: all background, no instance
    assert seg_b.shape == (20, 24) and not seg_b.any() and not inst_b.any()


def test_perfect_prediction_with_a_crowd_region_has_ap_one(coco_json, tmp_path: Path) -> None:
    """COCOeval's crowd rule through our metric: a detection on a crowd region of its class is matched to it and
    counts neither way, so the perfect prediction plus one on the crowd keeps AP 1.0; with the crowd region dropped
    (the old reading) the same detection is a false positive."""
    from sslpipe.data.stream import decode_sample
    from sslpipe.eval.detection import DetectionMetric

    path, _ = coco_json
    write_shards(tmp_path / "out", source=str(path), options=ShardOptions(shuffle=False), progress=False)
    raw = next(s for s in read_split(tmp_path / "out", "train").values() if "jpg" in s)
    sample = decode_sample({**raw, "__key__": "a", "__url__": "x"})
    inst = torch.from_numpy(np.asarray(sample["inst"], dtype=np.int64))
    seg = torch.from_numpy(np.asarray(sample["seg"], dtype=np.int64))
    target = masks_to_targets(inst, seg, crowd=sample["crowd"])
    things = target["iscrowd"] == 0
    perfect = {k: target[k][things] for k in ("boxes", "labels", "masks")}
    on_crowd = {k: target[k][~things] for k in ("boxes", "labels", "masks")}
    pred = {k: torch.cat([perfect[k], on_crowd[k]]) for k in perfect}
    pred["scores"] = torch.tensor([0.9, 0.8, 0.7, 0.95])  # the crowd detection scores highest

    results = {}
    for name, tgt in (("crowd kept", target), ("crowd dropped", {k: v[things] for k, v in target.items()})):
        metric = DetectionMetric(("bbox", "segm"))
        metric.update([pred], [tgt])
        results[name] = metric.compute()
    assert results["crowd kept"]["bbox/AP"] == pytest.approx(1.0)
    assert results["crowd kept"]["segm/AP"] == pytest.approx(1.0)
    assert results["crowd dropped"]["bbox/AP"] < 0.99


def test_coco_json_val_fraction_and_image_folder(coco_json, tmp_path: Path) -> None:
    path, _ = coco_json
    moved = tmp_path / "elsewhere"
    (tmp_path / "images").rename(moved)
    with pytest.raises(FileNotFoundError, match="a.jpg.*--coco-images"):
        write_shards(tmp_path / "out", source=str(path), progress=False)
    manifest = write_shards(tmp_path / "out", source=str(path), coco_images=moved,
                            options=ShardOptions(val_fraction=0.5), progress=False)
    assert {s: i["samples"] for s, i in manifest["splits"].items()} == {"train": 1, "val": 1}


def test_coco_errors_name_the_annotation_and_the_image(coco_json, tmp_path: Path) -> None:
    path, _ = coco_json
    data = json.loads(path.read_text())
    bad = dict(data, annotations=[*data["annotations"], {"id": 99, "image_id": 7, "category_id": 3,
                                                          "segmentation": []}])
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="annotation 99 has category_id 3"):
        write_shards(tmp_path / "out", source=str(path), progress=False)
    boxes_only = dict(data, annotations=[{"id": 5, "image_id": 7, "category_id": 1, "bbox": [0, 0, 4, 4]}])
    path.write_text(json.dumps(boxes_only))
    with pytest.raises(ValueError, match="annotation 5 has no segmentation"):
        write_shards(tmp_path / "out", source=str(path), progress=False)
    wrong_size = dict(data, images=[dict(data["images"][0], width=41), data["images"][1]])
    path.write_text(json.dumps(wrong_size))
    manifest = write_shards(tmp_path / "out", source=str(path), progress=False, force=True)
    assert manifest["splits"]["train"]["samples"] == 1
    assert len(manifest["skipped"]) == 1 and "a.jpg is 40x32 but its COCO record says 41x32" in str(
        manifest["skipped"][0])


def scenes_as_coco(root: Path, split: str, n: int) -> tuple[list, list[int]]:
    """Write generated scenes as a COCO split (images in ROOT/<split>2017, compressed RLE, remnants as crowd)."""
    gen = SceneGenerator(split, size=48, seed=3)
    (root / f"{split}2017").mkdir(parents=True)
    images, annotations, scenes = [], [], []
    for i in range(n):
        scene = gen[i]
        scenes.append(scene)
        scene.image.save(root / f"{split}2017" / f"{i:04d}.png")
        images.append({"id": i, "file_name": f"{i:04d}.png", "width": 48, "height": 48})
        for k, cls in enumerate(scene.classes, 1):
            mask = scene.instances == k
            if mask.any():
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append({"id": len(annotations), "image_id": i, "category_id": cls * 10 + 1,
                                    "iscrowd": 0, "segmentation": dict(rle, counts=rle["counts"].decode())})
        ignored = scene.semantic == 255
        if ignored.any():
            annotations.append({"id": len(annotations), "image_id": i, "category_id": 11, "iscrowd": 1,
                                "segmentation": uncompressed_rle(ignored)})
    categories = [{"id": c * 10 + 1, "name": name} for c, name in enumerate(SCENE_CLASSES[1:], 1)]
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return scenes


def test_coco_folder_round_trips_scene_instances(tmp_path: Path) -> None:
    """Scenes -> COCO json (RLE) -> `sslpipe shards --coco` -> the scene's own class map, and the same instance
    partition (ids renumbered by area)."""
    root = tmp_path / "coco"
    scenes = {split: scenes_as_coco(root, split, n) for split, n in (("train", 5), ("val", 3))}
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, "-m", "sslpipe", "shards", "--coco", str(root), str(out)],
                          env=child_env(), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    assert manifest["classes"] == SCENE_CLASSES and set(manifest["splits"]) == {"train", "val"}
    for split, split_scenes in scenes.items():
        samples = read_split(out, split)
        assert len(samples) == len(split_scenes)
        by_bytes = {(root / f"{split}2017" / f"{i:04d}.png").read_bytes(): scene
                    for i, scene in enumerate(split_scenes)}
        for sample in samples.values():
            scene = by_bytes[sample["png"]]  # the train split is written in a seeded shuffled order
            seg, inst = maps(sample)
            np.testing.assert_array_equal(seg, scene.semantic)
            crowd = {int(k) for k in json.loads(sample.get("crowd.json", b"{}"))}  # the remnants, as crowd regions
            assert set(np.unique(inst[seg == 255])) <= crowd | {0}
            inst = np.where(np.isin(inst, list(crowd)), 0, inst)
            pairs = {(int(a), int(b)) for a, b in zip(np.where(scene.semantic == 255, 0, scene.instances).ravel(),
                                                        inst.ravel())}
            assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})  # a bijection of ids
            assert (0, 0) in pairs


def test_annotations_without_a_mask_are_left_out_not_their_image(tmp_path: Path) -> None:
    """A box-only annotation (`segmentation: []`) and a 2-point polygon are counted and left out; their images and
    the other instances are written."""
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        real_photo(tmp_path / "images" / f"{name}.jpg", 40, 32)
    square = [[2, 2, 20, 2, 20, 20, 2, 20]]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": square},
            {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": [], "bbox": [25, 5, 5, 5]},
            {"id": 3, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": [[2, 2, 20, 20]]}]
    data = {"images": [{"id": k, "file_name": f"{n}.jpg", "width": 40, "height": 32} for k, n in ((1, "a"), (2, "b"))],
            "annotations": anns, "categories": [{"id": 3, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    manifest = write_shards(tmp_path / "out", source=str(tmp_path / "ann.json"), options=ShardOptions(shuffle=False),
                            progress=False)
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["skipped"] == []
    counts = manifest["coco"]["files"]["train"]
    assert counts["annotations_without_mask"] == 2 and counts["instances"] == 1
    (seg_a, inst_a), (seg_b, inst_b) = (maps(s) for s in read_split(tmp_path / "out", "train").values())
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(square, 32, 40))).astype(bool)
    assert np.array_equal(seg_a == 1, expected) and set(np.unique(inst_a).tolist()) == {0, 1}
    assert not seg_b.any() and not inst_b.any()


@pytest.mark.parametrize("record, message", [
    ("images", r"ann.json: image #0 has no 'width'"),
    ("categories", r"ann.json: category #0 has no 'id'"),
])
def test_coco_records_missing_a_key_give_one_line_errors(tmp_path: Path, capsys, record: str, message: str) -> None:
    from sslpipe.cli import main

    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 32}], "annotations": [],
            "categories": [{"id": 3, "name": "thing"}]}
    del data[record][0]["width" if record == "images" else "id"]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    assert main(["shards", "--coco", str(tmp_path / "ann.json"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(message, err)

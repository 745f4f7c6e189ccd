"""Shard writer and bundled data sets: round trips, sources, skipping, limits, manifest and errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import read_split
from PIL import Image

from sslpipe.data.manifest import read_manifest, verify_shards
from sslpipe.ingest import datasets
from sslpipe.ingest.datasets import dataset_len, iter_dataset
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.shards import write_shards


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def save(path: Path, array: np.ndarray, fmt: str, **kw) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kw)
    return path.read_bytes()


def rand_image(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def class_folder(tmp_path: Path) -> tuple[Path, dict[bytes, int]]:
    """ImageFolder tree: 'cat' (3 png), 'dog' (2 jpg, one in a nested folder); returns root and {bytes: label}."""
    root = tmp_path / "imgs"
    expected = {}
    for i in range(3):
        expected[save(root / "cat" / f"c{i}.png", rand_image(i), "PNG")] = 0
    expected[save(root / "dog" / "d0.jpg", rand_image(10), "JPEG")] = 1
    expected[save(root / "dog" / "deep" / "d1.jpeg", rand_image(11), "JPEG")] = 1
    (root / "dog" / "notes.txt").write_text("not an image")
    return root, expected


def test_digits_round_trip(digits_shards: Path) -> None:
    manifest = read_manifest(digits_shards)
    assert manifest["format"] == "sslpipe-shards/1" and manifest["source"] == "digits"
    assert manifest["classes"] == [str(d) for d in range(10)] and manifest["image_key"] == "png"
    assert manifest["has_seg"] is False and manifest["skipped"] == []
    assert manifest["created_by"] == "pytest digits_shards fixture"
    for split, n in (("train", 1438), ("val", 359)):  # every 5th sample (i % 5 == 4) is val: 1797 = 1438 + 359
        info = manifest["splits"][split]
        assert info["samples"] == n == sum(s["samples"] for s in info["shards"])
        assert [s["name"] for s in info["shards"]] == [f"{split}-{i:06d}.tar" for i in range(len(info["shards"]))]
        for shard in info["shards"]:
            data = (digits_shards / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        samples = read_split(digits_shards, split)
        assert list(samples) == [f"{split}_{i:08d}" for i in range(n)]
        for (image, label), fields in zip(iter_dataset("digits", split), samples.values(), strict=True):
            assert set(fields) == {"png", "cls"}
            assert np.array_equal(decode(fields["png"]), np.asarray(image))
            assert int(fields["cls"].decode("ascii")) == label
    assert len(manifest["splits"]["train"]["shards"]) == 12  # ceil(1438 / 128)
    assert verify_shards(digits_shards) == []


def test_digits_reader_scaling_and_split() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    val = list(iter_dataset("digits", "val", limit=2))
    # val = samples 4 and 9; 16 -> 255, 8 -> round(127.5) = 128 (numpy rounds half to even: 128)
    for (image, label), i in zip(val, (4, 9)):
        assert image.mode == "L" and image.size == (8, 8) and label == raw.target[i]
        assert np.array_equal(np.asarray(image), np.round(raw.images[i] * 255 / 16).astype(np.uint8))
    assert dataset_len("digits", "train") == 1438 and dataset_len("digits", "val", limit=7) == 7


def test_verify_detects_changed_and_missing_shard(digits_shards: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(digits_shards, tmp_path / "copy")
    with open(copy / "train-000003.tar", "r+b") as f:
        f.seek(600)
        f.write(b"X")
    (copy / "val-000001.tar").unlink()
    problems = verify_shards(copy / "manifest.json")
    assert len(problems) == 2
    assert "train-000003.tar differs" in problems[0] and "val-000001.tar is missing" in problems[1]


def test_folder_source_keeps_bytes_labels_and_splits(class_folder, tmp_path: Path) -> None:
    root, expected = class_folder
    manifest = write_shards(tmp_path / "out", source=str(root),
                            options=ShardOptions(val_fraction=0.4, samples_per_shard=2), progress=False,
                            created_by="test")
    assert manifest["source_kind"] == "folder" and manifest["classes"] == ["cat", "dog"]
    assert manifest["image_key"] == "jpg;png"
    assert {s: manifest["splits"][s]["samples"] for s in ("train", "val")} == {"train": 3, "val": 2}  # round(5*0.4)
    assert len(manifest["splits"]["train"]["shards"]) == 2
    seen = {}
    for split in ("train", "val"):
        for fields in read_split(tmp_path / "out", split).values():
            (ext,) = set(fields) - {"cls"}
            image = fields[ext]
            assert ext == ("png" if image.startswith(b"\x89PNG") else "jpg")
            seen[image] = int(fields["cls"])
    assert seen == expected  # original bytes, right labels, every image exactly once


def test_shards_are_deterministic_for_any_worker_count(class_folder, tmp_path: Path) -> None:
    root, _ = class_folder
    kw = dict(source=str(root), options=ShardOptions(val_fraction=0.2, seed=3), progress=False, created_by="t")
    a = write_shards(tmp_path / "a", num_workers=0, **kw)
    b = write_shards(tmp_path / "b", num_workers=2, **kw)
    c = write_shards(tmp_path / "c", num_workers=0, **{**kw, "options": ShardOptions(val_fraction=0.2, seed=4)})
    assert a["splits"] == b["splits"]
    assert a["splits"] != c["splits"]  # another seed, another split/order


def test_list_source_relative_paths_names_and_comments(tmp_path: Path) -> None:
    a = save(tmp_path / "data" / "a.png", rand_image(1), "PNG")
    b = save(tmp_path / "elsewhere" / "b b.png", rand_image(2), "PNG")
    listing = tmp_path / "data" / "list.txt"
    listing.write_text(f"# comment\na.png\tzebra\n\n{tmp_path / 'elsewhere' / 'b b.png'}\tant\n")
    manifest = write_shards(tmp_path / "out", source=str(listing), options=ShardOptions(shuffle=False), progress=False)
    assert manifest["source_kind"] == "list" and manifest["classes"] == ["ant", "zebra"]
    samples = list(read_split(tmp_path / "out", "train").values())
    assert [(s["png"], s["cls"]) for s in samples] == [(a, b"1"), (b, b"0")]

    unlabelled = tmp_path / "data" / "unlabelled.txt"
    unlabelled.write_text("a.png\n")
    write_shards(tmp_path / "out2", source=str(unlabelled), progress=False)
    assert list(read_split(tmp_path / "out2", "train").values()) == [{"png": a}]

    mixed = tmp_path / "data" / "mixed.txt"
    mixed.write_text("a.png 3\na.png\n")
    with pytest.raises(ValueError, match="label every line or none"):
        write_shards(tmp_path / "out3", source=str(mixed), progress=False)


def test_corrupt_images_are_skipped_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    good = save(root / "x" / "good.png", rand_image(0), "PNG")
    (root / "x" / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    truncated = save(root / "x" / "trunc.png", rand_image(5, 40, 40), "PNG")
    (root / "x" / "trunc.png").write_bytes(truncated[: len(truncated) // 2])
    manifest = write_shards(tmp_path / "out", source=str(root), progress=False)
    assert manifest["splits"]["train"]["samples"] == 1
    assert sorted(Path(s["source"]).name for s in manifest["skipped"]) == ["garbage.jpg", "trunc.png"]
    assert all(s["error"] and s["split"] == "train" for s in manifest["skipped"])
    assert list(read_split(tmp_path / "out", "train").values()) == [{"png": good, "cls": b"0"}]


def test_existing_output_needs_force(digits_shards: Path, tmp_path: Path) -> None:
    out = shutil.copytree(digits_shards, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--force"):
        write_shards(out, source="digits", options=ShardOptions(limit=10), progress=False)
    assert verify_shards(out) == []  # untouched
    manifest = write_shards(out, source="digits", options=ShardOptions(limit=10), force=True, progress=False)
    assert manifest["splits"]["train"]["samples"] == 10
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar", "val-000000.tar"]


def test_max_shard_bytes_splits_shards(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for i in range(12):  # incompressible 48x48 RGB: ~7 KB png each, 3 tar blocks of overhead at most
        save(root / "a" / f"{i:02d}.png", rand_image(i, 48, 48), "PNG")
    limit = 28000  # 3 samples (~26 KB of tar members) fit only if the 10 KB tar record padding is ignored
    manifest = write_shards(tmp_path / "out", source=str(root), options=ShardOptions(max_shard_bytes=limit),
                            progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert [s["samples"] for s in shards] == [2] * 6
    for s in shards:
        assert s["bytes"] == (tmp_path / "out" / s["name"]).stat().st_size <= limit
    assert verify_shards(tmp_path / "out") == []


def test_seg_list_carries_label_map_and_resizes_jointly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    label_l = rng.integers(0, 5, (20, 30), dtype=np.uint8)
    label_l[0, :] = 255
    label_p = Image.fromarray(rng.integers(0, 21, (20, 30), dtype=np.uint8), mode="P")
    label_p.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img0 = save(tmp_path / "img" / "0.jpg", rand_image(0, 20, 30), "JPEG")
    save(tmp_path / "img" / "1.png", rand_image(1, 20, 30), "PNG")
    save(tmp_path / "lbl" / "0.png", label_l, "PNG")
    label_p.save(tmp_path / "lbl" / "1.png")
    listing = tmp_path / "seg.txt"
    listing.write_text("img/0.jpg lbl/0.png\nimg/1.png lbl/1.png\n")

    manifest = write_shards(tmp_path / "out", source=str(listing), options=ShardOptions(shuffle=False), progress=False)
    assert manifest["source_kind"] == "seg-list" and manifest["has_seg"] is True
    s0, s1 = read_split(tmp_path / "out", "train").values()
    assert set(s0) == {"jpg", "seg.png"} and s0["jpg"] == img0
    assert Image.open(io.BytesIO(s0["seg.png"])).mode == "L"
    assert np.array_equal(decode(s0["seg.png"]), label_l)
    assert np.array_equal(decode(s1["seg.png"]), np.asarray(label_p))  # palette indices, not colours

    manifest = write_shards(tmp_path / "small", source=str(listing),
                            options=ShardOptions(shuffle=False, reencode="jpg", max_side=15), progress=False)
    assert manifest["image_key"] == "jpg"
    s0, _ = read_split(tmp_path / "small", "train").values()
    assert Image.open(io.BytesIO(s0["jpg"])).size == (15, 10)  # 30x20 -> longer side 15, aspect kept
    expected = np.asarray(Image.fromarray(label_l).resize((15, 10), Image.Resampling.NEAREST))
    assert np.array_equal(decode(s0["seg.png"]), expected)  # nearest: same size as the image, no invented classes


def test_seg_list_classes_named_and_label_values_checked(tmp_path: Path) -> None:
    """A seg-list names no classes unless --classes does; its label values are recorded (`seg_values`), and a value
    beyond the named classes stops the writing with the label map named and no shard left behind."""
    from sslpipe.ingest.sources import parse_classes

    labels = [np.array([[0, 1], [2, 255]], np.uint8), np.array([[0, 0], [1, 3]], np.uint8)]
    lines = []
    for i, lab in enumerate(labels):
        save(tmp_path / f"i{i}.png", rand_image(i, 2, 2), "PNG")
        save(tmp_path / f"l{i}.png", lab, "PNG")
        lines.append(f"i{i}.png l{i}.png")
    listing = tmp_path / "seg.txt"
    listing.write_text("\n".join(lines) + "\n")
    unnamed = write_shards(tmp_path / "a", source=str(listing), progress=False)
    assert unnamed["classes"] == [] and unnamed["seg_values"] == [0, 1, 2, 3, 255]
    (tmp_path / "names.txt").write_text("# my classes\nbackground\ncat\ndog\nbird\n")
    named = write_shards(tmp_path / "b", source=str(listing), classes=parse_classes(str(tmp_path / "names.txt")),
                         progress=False)
    assert named["classes"] == ["background", "cat", "dog", "bird"]
    with pytest.raises(ValueError, match=r"l1.png holds class value\(s\) \[3\].*name only 3"):
        write_shards(tmp_path / "c", source=str(listing), classes=parse_classes("background,cat,dog"),
                     options=ShardOptions(shuffle=False), progress=False)
    assert not list((tmp_path / "c").iterdir())  # the partial shard is removed, no manifest written
    with pytest.raises(ValueError, match="twice"):
        parse_classes("a,b,a")


def test_list_classes_order_the_names(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / f"{i}.png", rand_image(i), "PNG")
    (tmp_path / "names.txt").write_text("0.png dog\n1.png cat\n2.png dog\n")
    (tmp_path / "ints.txt").write_text("0.png 0\n1.png 2\n2.png 1\n")
    m = write_shards(tmp_path / "a", source=str(tmp_path / "names.txt"), classes=["dog", "cat", "fish"],
                     options=ShardOptions(shuffle=False), progress=False)
    assert m["classes"] == ["dog", "cat", "fish"]
    assert [int(s["cls"]) for s in read_split(tmp_path / "a", "train").values()] == [0, 1, 0]
    m = write_shards(tmp_path / "b", source=str(tmp_path / "ints.txt"), classes=["x", "y", "z"], progress=False)
    assert m["classes"] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="labels go up to 2"):
        write_shards(tmp_path / "c", source=str(tmp_path / "ints.txt"), classes=["x", "y"], progress=False)
    with pytest.raises(ValueError, match=r"\['dog'\] are not among"):
        write_shards(tmp_path / "d", source=str(tmp_path / "names.txt"), classes=["cat"], progress=False)
    with pytest.raises(ValueError, match="--list and --seg-list"):
        write_shards(tmp_path / "e", source="digits", classes=["a"], progress=False)


def test_fashion_mnist_reader_counts_and_pixels() -> None:
    assert dataset_len("fashion-mnist", "train") == 60000 and dataset_len("fashion-mnist", "val") == 10000
    for split, prefix, first_labels in (("train", "train", [9, 0, 0]), ("val", "t10k", [9, 2, 1])):
        samples = list(iter_dataset("fashion-mnist", split, limit=3))
        with gzip.open(datasets.fashion_mnist_dir() / f"{prefix}-images-idx3-ubyte.gz") as f:
            raw = np.frombuffer(f.read(16 + 3 * 784)[16:], dtype=np.uint8).reshape(3, 28, 28)
        assert [label for _, label in samples] == first_labels  # published first labels of the idx files
        for (image, _), ref in zip(samples, raw, strict=True):
            assert image.mode == "L" and image.size == (28, 28)
            assert np.array_equal(np.asarray(image), ref)
    assert datasets.dataset_classes("fashion-mnist")[9] == "Ankle boot"


def test_fashion_mnist_shards_with_limit(tmp_path: Path) -> None:
    manifest = write_shards(tmp_path / "out", source="fashion-mnist",
                            options=ShardOptions(limit=30, samples_per_shard=20), progress=False)
    assert manifest["classes"][0] == "T-shirt/top" and manifest["image_key"] == "png"
    assert [(s, i["samples"], len(i["shards"])) for s, i in manifest["splits"].items()] == [
        ("train", 30, 2), ("val", 30, 2)]
    labels = [int(f["cls"]) for f in read_split(tmp_path / "out", "val").values()]
    assert labels == [label for _, label in iter_dataset("fashion-mnist", "val", limit=30)]


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SSLPIPE_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    fix = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
    with pytest.raises(FileNotFoundError, match=f"train-images-idx3-ubyte.gz.*{fix}"):
        next(iter_dataset("fashion-mnist", "train"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        write_shards(tmp_path / "out", source="fashion-mnist", progress=False)
    assert not (tmp_path / "out").exists()


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="sslpipe shards"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="sslpipe-shards/1"):
        read_manifest(tmp_path / "manifest.json")
    good = {"samples": 3, "shards": [{"name": "train-000000.tar", "samples": 3}]}
    damaged = {  # each crashed a loader with a KeyError / AttributeError before
        "split 'train' has no integer `samples`": {"shards": good["shards"]},
        "split 'train' is a list, not a mapping": good["shards"],
        "split 'train': shard entry 0 lacks a `name`": {"samples": 3, "shards": [{"samples": 3}]},
    }
    for message, split in damaged.items():
        (tmp_path / "manifest.json").write_text(json.dumps({"format": "sslpipe-shards/1", "splits": {"train": split}}))
        with pytest.raises(ValueError, match=rf"manifest.json: {message}.*sslpipe shards --force"):
            read_manifest(tmp_path)


def test_colour_coded_label_maps_stop_the_writing(tmp_path: Path) -> None:
    """RGB label maps are a wrong input, not unreadable samples: one error naming the file and the fix, no shard
    set; a source none of whose samples can be read is refused too."""
    lines = []
    for i in range(2):
        save(tmp_path / f"i{i}.png", rand_image(i, 4, 4), "PNG")
        save(tmp_path / f"l{i}.png", rand_image(10 + i, 4, 4), "PNG")  # colour-coded classes
        lines.append(f"i{i}.png l{i}.png")
    listing = tmp_path / "seg.txt"
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"l0.png has mode RGB.*convert colour-coded masks to class-index PNGs"):
        write_shards(tmp_path / "a", source=str(listing), options=ShardOptions(shuffle=False), progress=False)
    assert list((tmp_path / "a").iterdir()) == []

    (tmp_path / "imgs" / "x").mkdir(parents=True)
    (tmp_path / "imgs" / "x" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="none of the 1 samples of split 'train' could be read, e.g. .*bad.jpg"):
        write_shards(tmp_path / "b", source=str(tmp_path / "imgs"), progress=False)
    assert list((tmp_path / "b").iterdir()) == []


def test_source_of_the_wrong_type_gives_one_line_errors(tmp_path: Path, capsys) -> None:
    from sslpipe.cli import main

    (tmp_path / "afile.txt").write_text("x.png\n")
    (tmp_path / "imgs").mkdir()
    assert main(["shards", "--folder", str(tmp_path / "afile.txt"), str(tmp_path / "o1")]) == 2
    assert main(["shards", "--list", str(tmp_path / "imgs"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"sslpipe shards: error: --folder {tmp_path / 'afile.txt'} is a file, not a directory: give the "
                   "folder of images (one sub-folder per class), or pass a list file with --list",
                   f"sslpipe shards: error: --list {tmp_path / 'imgs'} is a directory, not a list file: give the text "
                   "file of paths, or pass an image folder with --folder"]


def test_classes_given_as_a_missing_file_is_an_error(tmp_path: Path) -> None:
    from sslpipe.ingest.sources import parse_classes

    for spec in (str(tmp_path / "nmes.txt"), "seg/names", "names.txt", str(tmp_path)):
        with pytest.raises(FileNotFoundError, match=f"--classes file {spec} not found"):
            parse_classes(spec)
    assert parse_classes("background,T-shirt/top") == ["background", "T-shirt/top"]
    assert parse_classes("background") == ["background"]


def test_failed_forced_rewrite_keeps_the_old_set(tmp_path: Path) -> None:
    """--force replaces the old set only once the new one is complete: a rewrite that fails leaves it whole, and
    a finished one leaves none of its shards behind."""
    from sslpipe.data.manifest import read_manifest

    for i in range(3):
        save(tmp_path / f"i{i}.png", rand_image(i, 2, 2), "PNG")
        save(tmp_path / f"l{i}.png", np.full((2, 2), i, np.uint8), "PNG")
    listing = tmp_path / "seg.txt"
    listing.write_text("".join(f"i{i}.png l{i}.png\n" for i in range(3)))
    out = tmp_path / "out"
    write_shards(out, source=str(listing), options=ShardOptions(samples_per_shard=1), progress=False)
    with pytest.raises(ValueError, match="holds class value"):
        write_shards(out, source=str(listing), classes=["a", "b"], force=True, progress=False)
    assert verify_shards(out) == [] and read_manifest(out)["splits"]["train"]["samples"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *(f"train-00000{i}.tar" for i in range(3))]
    write_shards(out, source=str(listing), options=ShardOptions(samples_per_shard=2), force=True, progress=False)
    assert verify_shards(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar", "train-000001.tar"]


def test_folder_with_images_beside_its_class_folders_is_refused(tmp_path: Path) -> None:
    save(tmp_path / "mixed" / "root.png", rand_image(0), "PNG")
    save(tmp_path / "mixed" / "cls" / "1.png", rand_image(1), "PNG")
    with pytest.raises(ValueError, match=r"1 image\(s\) directly in it, e.g. \['root.png'\]"):
        write_shards(tmp_path / "out", source=str(tmp_path / "mixed"), progress=False)


def test_a_refused_source_leaves_no_empty_out(tmp_path: Path) -> None:
    """A label above the classes is refused once writing has begun: the OUT this run made is removed again."""
    from sslpipe.cli import main

    save(tmp_path / "img.png", rand_image(0), "PNG")
    Image.fromarray(np.full((8, 8), 5, dtype=np.uint8)).save(tmp_path / "lbl.png")
    (tmp_path / "pairs.txt").write_text(f"{tmp_path / 'img.png'} {tmp_path / 'lbl.png'}\n")
    assert main(["shards", "--seg-list", str(tmp_path / "pairs.txt"), "--classes", "a,b", str(tmp_path / "out")]) != 0
    assert not (tmp_path / "out").exists()


def test_an_image_listed_twice_is_refused(tmp_path: Path) -> None:
    """Two lists concatenated: the repeat would be written twice, with --val-fraction once into train and once into
    val. Also when the same file is spelled another way, and in a seg-list."""
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / f"{i}.png")
    lst = tmp_path / "list.txt"
    lst.write_text("0.png 0\n1.png 1\n# a comment\n2.png 0\n./sub/../0.png 1\n")
    with pytest.raises(ValueError, match=rf"^{lst}:5 repeats {lst}:1 \(\./sub/\.\./0\.png\): list each image once"):
        write_shards(tmp_path / "out", source=str(lst), options=ShardOptions(val_fraction=0.3), progress=False)
    lst.write_text("0.png 1.png\n2.png 1.png\n0.png 2.png\n")
    with pytest.raises(ValueError, match=rf"{lst}:3 repeats {lst}:1 \(0\.png\)"):
        write_shards(tmp_path / "out", source=str(lst), kind="seg-list", progress=False)
    assert not (tmp_path / "out").exists()

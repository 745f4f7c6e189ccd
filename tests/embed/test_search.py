"""`sslpipe search`: key queries come back first, an image file finds its own sample, JSON and PNG outputs, the
stored IVF index above the crossover, and one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, read_tar, tiny_export

from sslpipe.cli import main
from sslpipe.embed import index as index_module
from sslpipe.embed.embed import embed_shards
from sslpipe.embed.search import IVF_FILE, search

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("search") / "vit")


@pytest.fixture(scope="module")
def embedded(export: Path, digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embed_shards(export, digits_shards, tmp_path_factory.mktemp("search") / "emb", progress=False)


def test_key_queries_find_themselves_first(embedded: Path, tmp_path: Path) -> None:
    keys = ["train_00000000", "train_00000700", "train_00001437"]
    results = search(embedded, [f"key:{k}" for k in keys], k=5, png=tmp_path / "n.png", json_out=tmp_path / "n.json")
    for key, result in zip(keys, results):
        first = result["neighbours"][0]
        assert first["key"] == key and first["score"] == pytest.approx(1.0, abs=1e-5)
        assert len(result["neighbours"]) == 5 and Path(first["source"]).name.startswith("train-")
        scores = [n["score"] for n in result["neighbours"]]
        assert scores == sorted(scores, reverse=True)
    assert json.loads((tmp_path / "n.json").read_text()) == results
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_image_file_finds_its_own_sample(embedded: Path, digits_shards: Path, tmp_path: Path) -> None:
    """The file holds the bytes of a sample, so it is embedded to the same vector (up to float16) as the sample."""
    samples = read_tar(digits_shards / "train-000003.tar")
    key = list(samples)[7]
    (tmp_path / "q.png").write_bytes(samples[key]["png"])
    (result,) = search(embedded, [str(tmp_path / "q.png")], k=3)
    assert result["neighbours"][0]["key"] == key and result["neighbours"][0]["score"] > 0.999


def test_above_the_crossover_the_ivf_index_is_stored_and_reused(embedded: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    folder = tmp_path / "emb"
    shutil.copytree(embedded, folder)
    monkeypatch.setattr(index_module, "EXACT_MAX", 100)
    first = search(folder, ["key:train_00000042"], k=4)
    stored = (folder / IVF_FILE).stat().st_mtime_ns
    again = search(folder, ["key:train_00000042"], k=4)
    assert (folder / IVF_FILE).stat().st_mtime_ns == stored and again == first
    assert first[0]["neighbours"][0]["key"] == "train_00000042"


def test_refusals_are_one_line(embedded: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    for query, expected in ((str(broken), f"query image {broken} cannot be read"),
                            (str(tmp_path / "none.png"), "no such image file"),
                            ("key:nope", "key:nope: no sample with that key")):
        assert expected in one_line_error(["search", str(embedded), query], capsys)
    assert main(["search", str(embedded), "key:train_00000001", "-k", "2"]) == 0
    assert "train_00000001" in capsys.readouterr().out


def test_a_missing_damaged_or_miscounted_part_is_refused_in_one_line(embedded: Path, export: Path,
                                                                    digits_shards: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A complete folder lost part 3 (an interrupted copy): search refuses, naming it, rather than search 1310 of
    the 1438 rows; rerunning embed as the message says embeds that shard alone and search works again. A truncated
    part, and parts that hold another row count than embed.json's, are refused the same way."""
    import shutil

    from sslpipe.embed.store import INDEX, part_name, read_part

    folder = tmp_path / "emb"
    shutil.copytree(embedded, folder)
    part = folder / part_name(3)
    whole = part.read_bytes()
    part.unlink()
    err = one_line_error(["search", str(folder), "key:train_00000001"], capsys)
    assert f"{part} is missing: {folder} is damaged" in err and "run the `sslpipe embed` that wrote" in err
    embed_shards(export, digits_shards, folder, progress=False)
    again, first = read_part(part), read_part(embedded / part_name(3))
    assert again.keys == first.keys and (again.features == first.features).all()
    assert main(["search", str(folder), "key:train_00000001", "-k", "1"]) == 0

    part.write_bytes(whole[:300])
    err = one_line_error(["search", str(folder), "key:train_00000001"], capsys)
    assert f"{part} cannot be read" in err and "delete it" in err
    part.write_bytes(whole)
    index = json.loads((folder / INDEX).read_text())
    (folder / INDEX).write_text(json.dumps({**index, "count": 1437}))
    err = one_line_error(["search", str(folder), "key:train_00000001"], capsys)
    assert "its parts hold 1438 samples and embed.json counts 1437" in err


def test_search_names_the_files_of_an_embedded_folder_from_any_directory(export: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """embed ran with a relative --data and --out; search runs from another directory with the folder's absolute
    path: every neighbour still has its image file, by absolute path."""
    import numpy as np
    from PIL import Image

    work = tmp_path / "work"
    (work / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(work / "imgs" / f"img{i}.png")
    monkeypatch.chdir(work)
    assert main(["embed", str(export), "--data", "imgs", "--out", "emb"]) == 0
    monkeypatch.chdir(tmp_path)
    (result,) = search(work / "emb", ["key:train_00000001"], k=3)
    by_key = {n["key"]: n.get("file") for n in result["neighbours"]}
    assert by_key == {f"train_{i:08d}": str(work / "imgs" / f"img{i}.png") for i in range(3)}


def test_search_compares_the_backbone_by_its_tensors_and_reads_an_older_record(
        embedded: Path, export: Path, digits_shards: Path, tmp_path: Path) -> None:
    """An image query needs the backbone the set was embedded with: the same weights written again (other file
    bytes) still are; an embed.json of an older sslpipe, which recorded the file's sha256, is still read; other
    weights are refused in one line."""
    import shutil

    from test_embed import written_again

    from sslpipe.embed.store import INDEX
    from sslpipe.weights.hashing import sha256_file

    backbone, folder = tmp_path / "vit", tmp_path / "emb"
    shutil.copytree(export, backbone)
    shutil.copytree(embedded, folder)
    index = json.loads((folder / INDEX).read_text())
    samples = read_tar(digits_shards / "train-000003.tar")
    key = list(samples)[7]
    (tmp_path / "q.png").write_bytes(samples[key]["png"])

    def found(record: str) -> str:
        (folder / INDEX).write_text(json.dumps({**index, "backbone": str(backbone), "backbone_sha256": record}))
        return search(folder, [str(tmp_path / "q.png")], k=1)[0]["neighbours"][0]["key"]

    assert found(sha256_file(backbone / "model.safetensors")) == key  # an older sslpipe's record
    written_again(backbone)
    assert found(index["backbone_sha256"]) == key
    with pytest.raises(ValueError, match=rf"the backbone {backbone} changed since {folder} was embedded"):
        found("0" * 64)

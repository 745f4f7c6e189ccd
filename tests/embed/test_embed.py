"""`sslpipe embed`: parts of float16 unit vectors with keys and source shards, resume after a kill, two processes
over gloo, a folder of images, and the refusals (one line each)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import one_line_error, read_tar, tiny_export
from PIL import Image

from sslpipe.cli import main
from sslpipe.embed.embed import embed_shards
from sslpipe.embed.store import INDEX, part_name, read_index, read_part
from sslpipe.weights.hashing import sha256_file, tensor_digest

torch.set_num_threads(1)
TRAIN_SHARDS, TRAIN_SAMPLES = 12, 1438


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("export") / "vit")


@pytest.fixture(scope="module")
def embedded(export: Path, digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embed_shards(export, digits_shards, tmp_path_factory.mktemp("emb") / "digits", progress=False)


def _parts(folder: Path) -> list:
    return [read_part(folder / part_name(i)) for i in range(len(read_index(folder)["shards"]))]


def test_parts_hold_unit_float16_features_keys_and_source_shards(embedded: Path, export: Path,
                                                                 digits_shards: Path) -> None:
    index = read_index(embedded)
    assert index["complete"] and index["count"] == TRAIN_SAMPLES and index["dim"] == 32 and index["split"] == "train"
    assert index["backbone_sha256"] == tensor_digest(export / "model.safetensors")
    assert index["data"] == str(digits_shards.resolve()) and len(index["shards"]) == TRAIN_SHARDS
    assert index["spec"]["crop"] == 16 and index["spec"]["resize"] == 18 and index["spec"]["pooling"] == "cls"
    for part, url in zip(_parts(embedded), index["shards"]):
        assert part.features.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(part.features.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert part.keys == list(read_tar(Path(url))) and set(part.sources) == {url}


def test_a_killed_run_resumes_with_the_same_features(embedded: Path, export: Path, digits_shards: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last part deleted and the complete flag cleared (a run killed before its last shard): the rerun embeds
    that shard alone and ends with the features and keys of the uninterrupted run."""
    import shutil

    import sslpipe.embed.embed as embed_module

    folder = tmp_path / "emb"
    shutil.copytree(embedded, folder)
    index = read_index(folder)
    (folder / part_name(TRAIN_SHARDS - 1)).unlink()
    index.update(complete=False, count=None)
    (folder / INDEX).write_text(json.dumps(index))
    written = []
    real = embed_module.write_part
    monkeypatch.setattr(embed_module, "write_part", lambda out, i, *a: written.append(i) or real(out, i, *a))
    embed_shards(export, digits_shards, folder, progress=False)
    assert written == [TRAIN_SHARDS - 1]
    assert read_index(folder)["complete"] and read_index(folder)["count"] == TRAIN_SAMPLES
    for again, first in zip(_parts(folder), _parts(embedded)):
        assert again.keys == first.keys and np.array_equal(again.features, first.features)


def test_loader_workers_write_the_same_parts(embedded: Path, export: Path, digits_shards: Path,
                                             tmp_path: Path) -> None:
    """Two loader workers interleave their shards batch by batch; each part is still written whole."""
    from sslpipe.eval.spec import FeatureSpec

    spec = FeatureSpec.from_export(export, num_workers=2, batch_size=50)
    out = embed_shards(export, digits_shards, tmp_path / "emb", spec=spec, progress=False)
    for got, first in zip(_parts(out), _parts(embedded)):
        assert got.keys == first.keys and np.allclose(got.features, first.features, atol=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, export: str, shards: str, out: str) -> None:
    """One of two processes, set up as `accelerate launch` sets them up (the CLI's PartialState over gloo)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from accelerate import PartialState

    import sslpipe.embed.embed as embed_module

    real, mine = embed_module.write_part, []
    embed_module.write_part = lambda folder, i, *a: mine.append(i) or real(folder, i, *a)
    state = PartialState(cpu=True)
    embed_shards(export, shards, out, accelerator=state, progress=False)
    Path(out, f"rank{rank}.json").write_text(json.dumps(mine))


def test_two_processes_write_disjoint_parts_that_cover_the_set(embedded: Path, export: Path, digits_shards: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "emb2"
    mp.spawn(_worker, args=(_free_port(), str(export), str(digits_shards), str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [list(range(0, TRAIN_SHARDS, 2)), list(range(1, TRAIN_SHARDS, 2))]  # rank r: shards r, r+2, ...
    assert read_index(out)["complete"] and read_index(out)["count"] == TRAIN_SAMPLES
    for two, one in zip(_parts(out), _parts(embedded)):
        assert two.keys == one.keys and np.array_equal(two.features, one.features)


def test_a_folder_of_images_is_embedded_through_shards(export: Path, tmp_path: Path, capsys) -> None:
    """5 images and a broken one: 5 rows, files.tsv maps each key to its image by absolute path, embed.json names
    it relative to the folder, and the broken image is named on stderr (not only in the manifest)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = embed_shards(export, folder, tmp_path / "emb", progress=False)
    index = read_index(out)
    assert index["count"] == 5 and index["data"] == str(folder.resolve()) and index["files"] == "shards/files.tsv"
    files = dict(line.split("\t") for line in (out / index["files"]).read_text().splitlines())
    assert sorted(files.values()) == [str(folder / f"img{i}.png") for i in range(5)]
    assert _parts(out)[0].keys == sorted(files)
    err = capsys.readouterr().err
    assert f"skipped 1 unreadable image(s) of {folder}, e.g. {folder / 'broken.png'}: UnidentifiedImageError" in err
    assert str(out / "shards" / "manifest.json") in err


def test_refusals_are_one_line(embedded: Path, export: Path, digits_shards: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    gray = tiny_export(tmp_path / "gray", in_chans=1)
    err = one_line_error(["embed", str(gray), "--data", str(digits_shards), "--out", str(tmp_path / "g")], capsys)
    assert "1-channel" in err and "in_channels=1" in err and str(gray) in err
    other = tiny_export(tmp_path / "other", seed=1)
    err = one_line_error(["embed", str(other), "--data", str(digits_shards), "--out", str(embedded)], capsys)
    assert str(export.resolve()) in err and str(other.resolve()) in err and "--force" in err
    err = one_line_error(["embed", str(export), "--data", str(digits_shards), "--split", "val", "--out",
                           str(embedded)], capsys)
    assert "'train'" in err and "'val'" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    err = one_line_error(["embed", str(export), "--data", str(digits_shards), "--out", str(busy)], capsys)
    assert "holds no embed.json" in err
    assert main(["embed", str(other), "--data", str(digits_shards), "--split", "val", "--out", str(busy),
                 "--force"]) == 0
    assert read_index(busy)["split"] == "val" and (busy / "notes.txt").is_file()


def _images(folder: Path, names: range, seed: int = 0) -> None:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in names:
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")


def test_a_folder_changed_since_its_embedding_is_refused_and_force_embeds_it_again(
        export: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """4 images embedded; a rerun on the same folder resumes (nothing changed); 2 images added: refused with one
    line naming the folder and --force, the old embeddings kept; --force embeds all 6."""
    folder, out = tmp_path / "images", tmp_path / "emb"
    _images(folder, range(4))
    embed_shards(export, folder, out, progress=False)
    embed_shards(export, folder, out, progress=False)
    assert read_index(out)["count"] == 4
    _images(folder, range(4, 6), seed=1)
    argv = ["embed", str(export), "--data", str(folder), "--out", str(out)]
    err = one_line_error(argv, capsys)
    assert f"the folder {folder} changed since {out} was written" in err and "pass --force" in err
    assert read_index(out)["count"] == 4 and read_index(out)["complete"]
    assert main([*argv, "--force"]) == 0
    assert read_index(out)["count"] == 6 and read_index(out)["complete"]


def test_a_shard_set_rewritten_in_place_is_refused_by_embed_and_curate(export: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """The same shard names and keys with other images (`sslpipe shards --force` into the same folder): resuming the
    embedding, or curating with it, would pair the new images with the old vectors. Both are refused naming the
    change; --force embeds the new shards."""
    from sslpipe.curate.curate import curate
    from sslpipe.ingest.shards import write_shards

    pool, out = tmp_path / "pool", tmp_path / "emb"
    _images(tmp_path / "a", range(6))
    write_shards(pool, source=str(tmp_path / "a"), progress=False)
    embed_shards(export, pool, out, progress=False)
    before = _parts(out)[0].features.copy()
    _images(tmp_path / "b", range(6), seed=5)
    write_shards(pool, source=str(tmp_path / "b"), force=True, progress=False)
    argv = ["embed", str(export), "--data", str(pool), "--out", str(out)]
    err = one_line_error(argv, capsys)
    assert "1 shard(s) were rewritten in place since they were embedded" in err and "--force" in err
    with pytest.raises(ValueError, match=r"--embeddings .* no longer matches .*1 shard\(s\) were rewritten in place"):
        curate(pool, tmp_path / "curated", 2, embeddings=out, progress=False)
    assert main([*argv, "--force"]) == 0
    assert not np.array_equal(_parts(out)[0].features, before)
    assert curate(pool, tmp_path / "curated", 2, embeddings=out, dup_threshold=0.999, progress=False)


def test_a_truncated_shard_is_named_and_embedded_again_once_repaired(export: Path, digits_shards: Path,
                                                                    tmp_path: Path, capsys) -> None:
    """Shard 0 cut right before its 5th sample: the run ends with one line naming it, '4 of N samples readable'
    (N from its manifest), writes no part for it and leaves embed.json incomplete; repaired, the rerun embeds shard 0
    alone and completes with every sample."""
    import shutil
    import tarfile

    shards, out = tmp_path / "shards", tmp_path / "emb"
    shutil.copytree(digits_shards, shards)
    shard = shards / "train-000000.tar"
    whole = shard.read_bytes()
    with tarfile.open(shard) as tar:
        starts = {}
        for member in tar:
            starts.setdefault(member.name.split(".", 1)[0], member.offset)
    shard.write_bytes(whole[:list(starts.values())[4]])
    expected = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]["samples"]
    assert expected == len(starts)
    assert main(["embed", str(export), "--data", str(shards), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"shard {shard}: 4 of {expected} samples readable" in err and "run the same command" in err
    assert not read_index(out)["complete"] and not (out / part_name(0)).exists()
    kept = {i: (out / part_name(i)).stat().st_mtime_ns for i in range(1, TRAIN_SHARDS)}
    shard.write_bytes(whole)
    embed_shards(export, shards, out, progress=False)
    assert read_index(out)["complete"] and read_index(out)["count"] == TRAIN_SAMPLES
    assert len(read_part(out / part_name(0)).keys) == expected and not list(out.glob("short-*"))
    assert {i: (out / part_name(i)).stat().st_mtime_ns for i in range(1, TRAIN_SHARDS)} == kept


def written_again(export: Path) -> None:
    """The export's model.safetensors written again, same tensors, other header bytes, its sha256 recorded in
    config.json: what `sslpipe export RUN --onnx` or a second `sslpipe import` of the same weights did half the time
    (an older sslpipe wrote the file's metadata map in a per-process order)."""
    from safetensors.torch import load_file, save_file

    from sslpipe.weights.export import read_export_config, rewrite_config

    weights = export / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"architecture": "vit_tiny_patch16_224", "format": "pt"})
    config = read_export_config(export)
    config["sha256"]["model.safetensors"] = sha256_file(weights)
    rewrite_config(export / "config.json", config)


def test_the_same_backbone_exported_again_is_still_the_backbone_of_its_embeddings(
        export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """embed.json names the backbone by its tensors' sha256: after the same weights are written again, `embed` adds
    to its --out and `curate` reuses OUT.embeddings without embedding anything again (both refused it as "another
    backbone" when the file's sha256 named it)."""
    import shutil

    import sslpipe.embed.embed as embed_module
    from sslpipe.curate.curate import curate
    from sslpipe.ingest.shards import write_shards

    backbone, pool, out = tmp_path / "vit", tmp_path / "pool", tmp_path / "cur"
    shutil.copytree(export, backbone)
    _images(tmp_path / "a", range(6))
    write_shards(pool, source=str(tmp_path / "a"), progress=False)
    with pytest.raises(ValueError, match="--size 100, but 6 samples are left"):
        curate(pool, out, 100, backbone=backbone, dup_threshold=0.999, progress=False)  # after embedding the pool
    before = sha256_file(backbone / "model.safetensors")
    written_again(backbone)
    assert sha256_file(backbone / "model.safetensors") != before
    written = []
    monkeypatch.setattr(embed_module, "write_part", lambda *a: written.append(a))
    assert embed_shards(backbone, pool, tmp_path / "cur.embeddings", progress=False) == tmp_path / "cur.embeddings"
    manifest = curate(pool, out, 2, backbone=backbone, dup_threshold=0.999, progress=False)
    assert written == [] and manifest["curation"]["pool_samples"] == 6
    assert read_index(tmp_path / "cur.embeddings")["backbone_sha256"] == tensor_digest(backbone / "model.safetensors")
    index_file = tmp_path / "cur.embeddings" / "embed.json"  # as an older sslpipe wrote it: the file's sha256
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "backbone_sha256": sha256_file(backbone / "model.safetensors")}))
    assert embed_shards(backbone, pool, tmp_path / "cur.embeddings", progress=False) == tmp_path / "cur.embeddings"
    assert written == []

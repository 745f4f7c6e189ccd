"""`sslpipe embed` never loses what it did not write (--force next to a shard set of the user's), and never marks a
folder complete with rows missing (a damaged shard of a pattern input, which has no manifest count)."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line_error, tiny_export
from PIL import Image

from sslpipe.cli import main
from sslpipe.embed.embed import embed_shards
from sslpipe.embed.store import part_name, read_index, read_part
from sslpipe.ingest.shards import write_shards

torch.set_num_threads(1)
TRAIN_SHARDS, TRAIN_SAMPLES = 12, 1438


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("export") / "vit")


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_force_keeps_a_shards_folder_embed_did_not_write(export: Path, tmp_path: Path, capsys) -> None:
    """OUT/shards of the user's: as the input itself (twice: into a new and into an embedded --out), and as another
    set beside a shard-set input, --force keeps every byte of it. A folder of images, whose shards would go there,
    is refused in one line; so is --force where the input lies in the shards embed wrote (it would remove them)."""
    pool = tmp_path / "pool"
    write_shards(pool, source=str(_images(tmp_path / "a", 6)), progress=False)
    proj = tmp_path / "proj"
    shutil.copytree(pool, proj / "shards")
    (proj / "notes.txt").write_text("mine")
    (proj / "search-hits.json").write_text("mine too")  # a name like the search index's, not one of its two
    before = _snapshot(proj / "shards")
    for _ in range(2):
        assert main(["embed", str(export), "--data", str(proj / "shards"), "--out", str(proj), "--force"]) == 0
        assert _snapshot(proj / "shards") == before and (proj / "notes.txt").read_text() == "mine"
        assert (proj / "search-hits.json").read_text() == "mine too"
        assert read_index(proj)["count"] == 6 and read_index(proj)["complete"]

    other = tmp_path / "proj2"
    shutil.copytree(pool, other / "shards")
    write_shards(tmp_path / "pool_b", source=str(_images(tmp_path / "b", 4, seed=1)), progress=False)
    assert main(["embed", str(export), "--data", str(tmp_path / "pool_b"), "--out", str(other), "--force"]) == 0
    assert _snapshot(other / "shards") == before and read_index(other)["count"] == 4

    err = one_line_error(["embed", str(export), "--data", str(tmp_path / "b"), "--out", str(other), "--force"], capsys)
    assert f"{other / 'shards'} holds files sslpipe embed did not write" in err and "choose another --out" in err
    assert _snapshot(other / "shards") == before and read_index(other)["count"] == 4

    emb = embed_shards(export, tmp_path / "b", tmp_path / "emb", progress=False)  # embed writes emb/shards
    own = _snapshot(emb / "shards")
    err = one_line_error(["embed", str(export), "--data", str(emb / "shards"), "--out", str(emb), "--force"], capsys)
    assert f"lies in {emb / 'shards'}, which --force removes" in err
    assert _snapshot(emb / "shards") == own and read_index(emb)["complete"]


def test_force_refuses_files_named_like_parts_without_an_embed_json(export: Path, tmp_path: Path, capsys) -> None:
    pool = tmp_path / "pool"
    write_shards(pool, source=str(_images(tmp_path / "a", 3)), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-000000.safetensors").write_text("someone else's")
    err = one_line_error(["embed", str(export), "--data", str(pool), "--out", str(out), "--force"], capsys)
    assert "part-000000.safetensors but no embed.json" in err
    assert (out / "part-000000.safetensors").read_text() == "someone else's"


def _cut_inside_fifth_sample(shard: Path) -> None:
    with tarfile.open(shard) as tar:
        starts: dict[str, int] = {}
        for member in tar:
            starts.setdefault(member.name.split(".", 1)[0], member.offset)
    shard.write_bytes(shard.read_bytes()[:list(starts.values())[4] + 700])


def test_a_damaged_shard_of_a_pattern_input_is_named_and_embedded_again_once_repaired(
        export: Path, digits_shards: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """No manifest, so no counts: shard 0 cut inside its 5th sample, shard 5 replaced by junk (a failed download).
    The run ends with one line naming both, writes no part for them and leaves embed.json incomplete; repaired, the
    rerun embeds those two alone and completes with every sample."""
    import sslpipe.embed.embed as embed_module

    shards, out = tmp_path / "shards", tmp_path / "emb"
    shutil.copytree(digits_shards, shards)
    (shards / "manifest.json").unlink()
    whole = {i: (shards / f"train-{i:06d}.tar").read_bytes() for i in (0, 5)}
    _cut_inside_fifth_sample(shards / "train-000000.tar")
    (shards / "train-000005.tar").write_bytes(b"\0garbage" * 100)
    pattern = str(shards / "train-{000000..000011}.tar")
    with pytest.warns(UserWarning, match="skipping rest of shard"):
        assert main(["embed", str(export), "--data", pattern, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 shard(s) read short" in err and "run the same command" in err
    assert f"shard {shards / 'train-000000.tar'}: 4 samples readable, then ReadError" in err
    assert f"shard {shards / 'train-000005.tar'}: 0 samples readable, then ReadError" in err
    assert not read_index(out)["complete"]
    assert not (out / part_name(0)).exists() and not (out / part_name(5)).exists()
    for i, data in whole.items():
        (shards / f"train-{i:06d}.tar").write_bytes(data)
    written = []
    real = embed_module.write_part
    monkeypatch.setattr(embed_module, "write_part", lambda folder, i, *a: written.append(i) or real(folder, i, *a))
    embed_shards(export, pattern, out, progress=False)
    assert sorted(written) == [0, 5] and not list(out.glob("short-*"))
    assert read_index(out)["complete"] and read_index(out)["count"] == TRAIN_SAMPLES
    with tarfile.open(shards / "train-000000.tar") as tar:
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar))
    assert read_part(out / part_name(0)).keys == keys and len(keys) == 128

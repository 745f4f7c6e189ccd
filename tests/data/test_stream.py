"""Tests for sslpipe.data.stream (shard resolution, split/seeding, error handling) and the loader benchmark."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sslpipe.data.remote import Reading
from sslpipe.data.stream import (
    CorruptSampleWarning,
    ShardReadError,
    build_loader,
    count_samples,
    derive_seed,
    rank_shares,
    resolve_shards,
    to_8bit,
)


def _png(value: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), value if mode == "L" else (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(root, sizes: list[int], split: str = "train", manifest: bool = True) -> list[str]:
    """Shards per docs/internals.md §1: `{split}-{i:06d}.tar`, png + cls, and a manifest; returns all keys."""
    os.makedirs(root, exist_ok=True)
    keys, entries, n = [], [], 0
    for i, size in enumerate(sizes):
        name = f"{split}-{i:06d}.tar"
        with wds.TarWriter(os.path.join(root, name)) as sink:
            for _ in range(size):
                key = f"{split}_{n:08d}"
                sink.write({"__key__": key, "png": _png(n % 256), "cls": str(n % 10).encode()})
                keys.append(key)
                n += 1
        entries.append({"name": name, "samples": size})
    if manifest:
        with open(os.path.join(root, "manifest.json"), "w") as f:
            json.dump({"format": "sslpipe-shards/1", "image_key": "png",
                       "splits": {split: {"samples": n, "shards": entries}}}, f)
    return keys


def _key(raw: dict) -> str:
    return raw["key"]


def _key_and_rng(raw: dict) -> tuple:
    return raw["key"], random.random(), float(np.random.rand()), float(torch.rand(()))


def _keys(loader) -> list:
    return [item for batch in loader for item in batch]


def _loader(spec, **kw):
    args = dict(sample_fn=_key, collate_fn=list, batch_size=3, drop_last=False, shuffle_buffer=8)
    args.update(kw)
    return build_loader(spec, **args)


def test_two_ranks_two_workers_cover_epoch_exactly_once(tmp_path):
    keys = _write_shards(tmp_path, [5] * 8)
    seen = []
    for rank in range(2):
        got = _keys(_loader(str(tmp_path), num_workers=2, rank=rank, world_size=2, epoch=3))
        assert len(got) == 20  # 4 shards x 5 samples per rank
        seen += got
    assert sorted(seen) == keys  # every sample once, no overlap


def test_same_epoch_reproducible_other_epoch_differs(tmp_path):
    _write_shards(tmp_path, [6] * 4)

    def run(epoch, workers):
        return _keys(_loader(str(tmp_path), sample_fn=_key_and_rng, num_workers=workers, epoch=epoch, seed=7))

    first = run(0, 2)
    assert run(0, 2) == first  # same keys in the same order and the same augmentation randomness
    other = run(1, 2)
    assert sorted(k for k, *_ in other) == sorted(k for k, *_ in first)
    assert [k for k, *_ in other] != [k for k, *_ in first]
    assert run(0, 0) == run(0, 0)


def test_workers_seed_from_seed_epoch_rank_worker(tmp_path):
    _write_shards(tmp_path, [2])
    torch.manual_seed(1)  # the caller's global state must not matter
    (first, *_), = _loader(str(tmp_path), sample_fn=_key_and_rng, shuffle=False, batch_size=1, seed=5, epoch=2,
                           rank=1, world_size=2, num_batches=1, resampled=True)
    s = derive_seed(5, 2, 1, 0)  # (seed, epoch, rank, worker 0)
    assert first[1] == random.Random(s).random()
    assert first[2] == np.random.RandomState(s).rand()
    assert first[3] == float(torch.rand((), generator=torch.Generator().manual_seed(s)))


def test_in_process_stream_leaves_global_rng_alone(tmp_path):
    _write_shards(tmp_path, [4, 4])
    torch.manual_seed(123)
    random.seed(123)
    expected = (float(torch.rand(())), random.random())
    torch.manual_seed(123)
    random.seed(123)
    _keys(_loader(str(tmp_path), sample_fn=_key_and_rng))
    assert (float(torch.rand(())), random.random()) == expected


def test_num_batches_equalises_ranks_by_rereading(tmp_path):
    keys = _write_shards(tmp_path, [5, 5, 2])
    # shards split over 2 ranks: one rank holds 7 or 10 samples, the other the rest; both must give 6 batches of 3
    per_rank = [_loader(str(tmp_path), rank=r, world_size=2, num_batches=6, batch_size=3, num_workers=w)
                for r, w in ((0, 0), (1, 2))]
    for loader in per_rank:
        assert len(loader) == 6
        batches = list(loader)
        assert len(batches) == 6 and all(len(b) == 3 for b in batches)
    share = [set(_keys(_loader(str(tmp_path), rank=r, world_size=2))) for r in range(2)]
    assert share[0].isdisjoint(share[1]) and sorted(share[0] | share[1]) == keys
    short = min(share, key=len)
    rank = share.index(short)
    got = _keys(_loader(str(tmp_path), rank=rank, world_size=2, num_batches=6, batch_size=3))
    assert set(got) == short and len(got) == 18  # a short rank re-reads its own shards, never another rank's


def test_rank_shares_count_each_ranks_share_and_the_start_names_what_an_epoch_repeats(tmp_path):
    """Shards of 5, 5 and 2 samples over 2 ranks: each epoch's shares (7 and 5, or 10 and 2) are what the ranks'
    loaders read in a pass; with 3 batches of 2 per rank, the start-up notice names what an epoch reads twice and
    leaves unread (the engine review: the docs said every sample was read once)."""
    from sslpipe.engine.trainer import uneven_shares
    from sslpipe.recipes import config_from_dict

    _write_shards(tmp_path, [5, 5, 2])
    for epoch in range(3):
        shares = rank_shares(str(tmp_path), "train", 2, 0, epoch)
        read = [len(_keys(_loader(str(tmp_path), rank=r, world_size=2, epoch=epoch))) for r in range(2)]
        assert shares == read and sum(shares) == 12
    cfg = config_from_dict({"method": "dino", "data": {"train": str(tmp_path), "batch_size": 2}})
    shares = rank_shares(str(tmp_path), "train", 2, 0, 0)
    notice = uneven_shares(cfg, 3, 2)  # 12 // (2 x 2) = 3 batches of 2 per rank: 6 samples each
    twice, unread = sum(max(0, 6 - s) for s in shares), sum(max(0, s - 6) for s in shares)
    assert twice > 0 and notice.startswith(
        f"data: the first epoch's shard split gives the 2 processes {min(shares)} to {max(shares)} samples for 6 "
        f"each, so about {twice} samples are read twice and {unread} not at all")
    assert uneven_shares(cfg, 3, 1) is None  # one process: nothing to balance
    _write_shards(tmp_path / "even", [6, 6])
    even = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": str(tmp_path / "even")})})
    assert uneven_shares(even, 3, 2) is None


@pytest.mark.parametrize("world,workers", [(1, 3), (2, 2)])
def test_an_epoch_with_a_batch_count_reads_every_sample_before_any_twice(tmp_path, world, workers):
    """Workers holding unequal shares (shards of 9 to 2 samples): each rank's epoch reads its whole share, bar each
    worker's partial last batch, before it reads any sample twice (endless workers, taken in turn by the DataLoader,
    re-read the short shares while the long ones were never finished: ~10 % unread per epoch)."""
    keys = _write_shards(tmp_path, [9, 2, 7, 3, 8, 2])
    batch = 2
    steps = len(keys) // (batch * world)
    seen: set[str] = set()
    for rank in range(world):
        share = _keys(_loader(str(tmp_path), rank=rank, world_size=world, epoch=1))
        got = _keys(_loader(str(tmp_path), rank=rank, world_size=world, epoch=1, num_batches=steps,
                            batch_size=batch, num_workers=workers, drop_last=True))
        assert len(got) == steps * batch
        first_pass = min(len(got), len(share) - workers * (batch - 1))
        assert len(set(got[:first_pass])) == first_pass and set(got) <= set(share)
        seen |= set(got)
    assert len(seen) >= len(keys) - world * workers * (batch - 1)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_transform_error_names_the_shard_and_the_sample(tmp_path, workers):
    """A sample_fn that refuses a sample (a label of another size, a missing key) stops the loader naming where."""
    _write_shards(tmp_path, [3])

    def refuse(raw):
        if raw["key"] == "train_00000001":
            raise ValueError("label size differs")
        return raw["key"]

    with pytest.raises(ShardReadError, match=r"train-000000.tar, sample 'train_00000001': ValueError: label size"):
        _keys(_loader(str(tmp_path), sample_fn=refuse, num_workers=workers, shuffle=False))


def test_no_more_workers_than_the_share_fills_with_batches(tmp_path):
    """8 shards of 5 and batches of 16: 4 workers would each hold 10 samples and give no batch at all (each worker
    batches its own shards); the loader starts 2 (40 // 16), and every pass gives full batches."""
    keys = _write_shards(tmp_path, [5] * 8)
    loader = _loader(str(tmp_path), batch_size=16, num_workers=4, num_batches=4, drop_last=True)
    batches = list(loader)
    assert loader.loader.num_workers == 2 and [len(b) for b in batches] == [16] * 4
    assert set(k for b in batches for k in b) <= set(keys)


def test_resampled_mode(tmp_path):
    keys = _write_shards(tmp_path, [3, 3])
    batches = list(_loader(str(tmp_path), resampled=True, num_batches=5, batch_size=4, num_workers=2))
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert set(k for b in batches for k in b) <= set(keys)
    with pytest.raises(ValueError, match="num_batches"):
        _loader(str(tmp_path), resampled=True)


def test_corrupt_jpeg_and_truncated_shard_skipped_and_counted(tmp_path):
    good = _write_shards(tmp_path, [4], manifest=False)  # train-000000.tar
    with wds.TarWriter(str(tmp_path / "train-000001.tar")) as sink:
        sink.write({"__key__": "bad_jpeg", "jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "cls": b"1"})
        sink.write({"__key__": "fine", "png": _png(9, mode="L")})  # grayscale, unlabelled
    cut = tmp_path / "train-000002.tar"
    with wds.TarWriter(str(cut)) as sink:
        for i in range(4):
            sink.write({"__key__": f"cut_{i}", "png": _png(i), "cls": b"0"})
    with tarfile.open(cut) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("cut_2"))
    with open(cut, "r+b") as f:
        f.truncate(member.offset_data + 10)  # in the middle of sample cut_2
    spec = str(tmp_path / "train-{000000..000002}.tar")

    with pytest.warns(CorruptSampleWarning) as record:
        loader = _loader(spec, shuffle=False)
        got = _keys(loader)
    assert sorted(got) == sorted(good + ["fine", "cut_0", "cut_1"])
    assert loader.stats == {"corrupt_samples": 1, "shard_errors": 1}
    messages = " | ".join(str(w.message) for w in record)
    assert "bad_jpeg" in messages and "train-000001.tar" in messages
    assert "cut_2" in messages and "train-000002.tar" in messages

    in_workers = _loader(spec, num_workers=2)  # worker processes add to the same shared counters
    assert sorted(_keys(in_workers)) == sorted(got) and in_workers.stats == loader.stats

    with pytest.raises(ShardReadError, match=r"train-000001\.tar.*bad_jpeg"):
        _keys(_loader(str(tmp_path / "train-000001.tar"), reading=Reading(on_error="raise")))
    with pytest.raises(ShardReadError, match=r"train-000002\.tar.*cut_2"):
        _keys(_loader(str(cut), reading=Reading(on_error="raise")))


def test_decoded_fields(tmp_path):
    seg = io.BytesIO()
    Image.new("L", (8, 8), 255).save(seg, format="PNG")
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a", "png": _png(3, mode="L"), "seg.png": seg.getvalue()})
    (raw,) = _keys(_loader(str(tmp_path / "s.tar"), sample_fn=lambda r: r))
    assert raw["key"] == "a" and raw["label"] == -1 and raw["url"].endswith("s.tar")
    assert raw["image"].mode == "RGB" and raw["image"].getpixel((0, 0)) == (3, 3, 3)
    assert raw["seg"].mode == "L" and raw["seg"].getpixel((0, 0)) == 255


def test_16_bit_png_from_another_tool_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG in a shard another tool wrote: convert("RGB") alone would clip it to white (all 255 here); the
    decoder scales it by >> 8. A float image (no fixed range) is refused, never clipped."""
    ramp = (np.arange(8 * 8, dtype=np.uint16).reshape(8, 8) * 1000 + 500).astype(np.uint16)  # 500 .. 63500
    png = io.BytesIO()
    Image.fromarray(ramp).save(png, format="PNG")
    assert Image.open(io.BytesIO(png.getvalue())).mode == "I;16"
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "deep", "png": png.getvalue()})
    (raw,) = _keys(_loader(str(tmp_path / "s.tar"), sample_fn=lambda r: r))
    image = np.asarray(raw["image"])
    assert image.shape == (8, 8, 3)
    np.testing.assert_array_equal(image[..., 1], ramp >> 8)
    assert image[0, 0, 0] == 1 and image[7, 7, 0] == 248  # 500 >> 8, 63500 >> 8
    with pytest.raises(ValueError, match="mode F .*32-bit float.*convert it"):
        to_8bit(Image.fromarray(np.ones((2, 2), np.float32) * 300))


def test_resolution_patterns_manifest_and_counts(tmp_path):
    _write_shards(tmp_path, [2, 3, 4])
    expected = [str(tmp_path / f"train-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(str(tmp_path)) == expected
    assert resolve_shards(str(tmp_path / "manifest.json")) == expected
    assert resolve_shards(str(tmp_path / "train-{000000..000002}.tar")) == expected
    assert resolve_shards([expected[0], str(tmp_path / "train-{000001..000002}.tar")]) == expected
    assert resolve_shards("pipe:curl -s https://host/train-{0..1}.tar") == [
        "pipe:curl -s https://host/train-0.tar", "pipe:curl -s https://host/train-1.tar"]
    assert count_samples(str(tmp_path)) == 9
    assert count_samples(str(tmp_path / "train-{000000..000002}.tar")) is None
    with pytest.raises(ValueError, match="no split 'val'"):
        resolve_shards(str(tmp_path), split="val")


def test_a_loader_reads_its_manifest_once_and_resolves_as_the_parts_do(tmp_path, monkeypatch):
    """A remote manifest is a request: `build_loader` read it twice (the shard list, then the entries)."""
    import sslpipe.data.stream as stream

    _write_shards(tmp_path, [2, 3, 4])
    other = tmp_path / "other"
    _write_shards(other, [1])
    for spec in (str(tmp_path), [str(tmp_path), str(other / "train-000000.tar")]):
        assert stream.resolve_shard_entries(spec) == (resolve_shards(spec), stream.shard_entries(spec))
    reads = []
    monkeypatch.setattr(stream, "read_manifest", lambda path: reads.append(path) or json.loads(
        (tmp_path / "manifest.json").read_text()))
    assert len(_keys(_loader(str(tmp_path)))) == 9 and len(reads) == 1
    os.remove(tmp_path / "train-000001.tar")
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shard files missing: .*train-000001\.tar"):
        stream.resolve_shard_entries(str(tmp_path))


def test_missing_shards_named(tmp_path):
    _write_shards(tmp_path, [2, 2])
    with pytest.raises(FileNotFoundError, match=r"train-000003\.tar.*sslpipe shards") as info:
        resolve_shards(str(tmp_path / "train-{000000..000003}.tar"))
    assert "train-000002.tar" in str(info.value) and "2 of 4" in str(info.value)
    os.remove(tmp_path / "train-000001.tar")
    with pytest.raises(FileNotFoundError, match=r"train-000001\.tar"):
        resolve_shards(str(tmp_path))


def test_pipe_url(tmp_path):
    keys = _write_shards(tmp_path, [3, 2])
    spec = f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar"
    assert sorted(_keys(_loader(spec, num_workers=2))) == keys


def test_loader_bench_smoke(tmp_path):
    from torchvision import transforms

    from sslpipe.bench.loader import run_loader_bench
    from sslpipe.data.fast_views import FastMultiCropTransform

    _write_shards(tmp_path, [12, 12])
    tf = transforms.Compose([transforms.RandomResizedCrop(8, scale=(0.5, 1.0)), transforms.ToTensor()])
    from sslpipe.data.device_views import DeviceMultiCropTransform

    fast = FastMultiCropTransform(8, 4, n_local=2)
    result = run_loader_bench(str(tmp_path), transforms={"fast": fast, "torchvision": tf,
                                                         "device": DeviceMultiCropTransform(8, 4, n_local=2)},
                              batch_size=4, num_workers=0, max_images=16, device="cpu")
    assert result["stream_device_img_s"] > 0 and result["ceiling_device_img_s"] > 0
    assert result["images"] == 16
    for key in ("stream_fast_img_s", "stream_torchvision_img_s", "imagefolder_img_s", "ceiling_fast_img_s",
                "ceiling_torchvision_img_s", "stream_fast_per_core"):
        assert result[key] > 0
    assert "ImageFolder" in result["table"] and "fast crops" in result["table"]


def test_all_corrupt_shards_end_instead_of_hanging(tmp_path):
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"bad_{i}", "jpg": b"garbage", "cls": b"0"})
    loader = _loader(str(tmp_path / "train-000000.tar"), num_batches=2, shuffle_buffer=2)
    with pytest.warns(CorruptSampleWarning), pytest.raises(ShardReadError, match="only 0 of 2 batches"):
        list(loader)
    assert loader.stats["corrupt_samples"] == 3  # one pass: it gives no batch, so no other pass is started


def test_each_pass_of_a_repeating_stream_holds_every_sample_once(tmp_path):
    """A rank that re-reads its share to reach its batch count: with a shuffle buffer far larger than the share,
    every pass (epoch) still yields each sample exactly once, in a shuffled order."""
    keys = _write_shards(tmp_path, [6, 6, 4])
    spec = f"{tmp_path}/train-{{000000..000002}}.tar"
    got = _keys(_loader(spec, batch_size=4, num_batches=8, shuffle_buffer=1000))
    passes = [got[:16], got[16:]]
    assert all(sorted(p) == sorted(keys) for p in passes) and passes[0] != sorted(keys)


def test_shuffle_within_passes_never_mixes_passes():
    import random

    from sslpipe.data.stream import PASS_END, shuffle_within_passes

    stream = [*range(10), PASS_END, *range(10, 20), PASS_END, *range(20, 25)]
    out = list(shuffle_within_passes(iter(stream), bufsize=100, initial=3, rng=random.Random(0)))
    cut = [i for i, s in enumerate(out) if s is PASS_END]
    assert sorted(out[:cut[0]]) == list(range(10)) and sorted(out[cut[0] + 1:cut[1]]) == list(range(10, 20))
    assert sorted(out[cut[1] + 1:]) == list(range(20, 25)) and out[:cut[0]] != list(range(10))

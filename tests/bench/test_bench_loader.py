"""`sslpipe bench loader`: the stream decodes JPEGs reduced as the trainer does, and the one-core paths run on one
torch thread."""
from __future__ import annotations

from pathlib import Path

import torch

from sslpipe.bench.loader import run_loader_bench
from sslpipe.bench.photos import make_photo_shards


class SizeSpy:
    """A crop transform that needs 48 px a side (`draft_size`, as FastMultiCropTransform offers one) and records the
    size each image reaches it at and torch's thread count while it runs."""

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[int, int], int]] = []

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        return 48, 48

    def __call__(self, image) -> torch.Tensor:
        self.seen.append((image.size, torch.get_num_threads()))
        return torch.zeros(1)


def test_stream_and_ceiling_decode_reduced_on_one_thread(tmp_path: Path) -> None:
    """400x300 JPEGs, 48 px needed: PIL's draft decodes at 1/4 (100x75; 1/8 would be 50x38, below 48), on the stream
    (which decoded them in full, 400x300, before it forwarded the hint) and on the ceiling alike. Both run in this
    process (0 workers) under one torch thread, the ceiling used torch's default (2 here); the default comes back."""
    shards = make_photo_shards(tmp_path / "photos", 8, size=(400, 300), samples_per_shard=4)
    spy = SizeSpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = run_loader_bench(str(shards), transforms={"fast": spy, "torchvision": lambda image: torch.zeros(1)},
                             batch_size=4, num_workers=0, max_images=8, rounds=1, max_seconds=30)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert r["images"] == 8 and len(spy.seen) == 16  # 8 on the stream, 8 on the ceiling (ImageFolder: the other)
    assert spy.seen == [((100, 75), 1)] * 16
    assert "this process, 1 thread" in r["table"]

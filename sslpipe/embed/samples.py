"""Samples of a shard set fetched by key: the raw tar members (what curate copies byte for byte) or the decoded
image (what the search and curate pictures show). Each shard is read once, front to back, for all the keys asked of
it; a key that is not in its shard is an error naming both."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from sslpipe.data.stream import decode_sample

Members = dict[str, bytes]  # a sample's tar members: extension -> bytes


def members_of(url: str, keys: Iterable[str]) -> Iterator[tuple[str, Members]]:
    """(key, members) of the `keys` found in the shard `url`, in shard order; raises when one is missing."""
    wanted, found = set(keys), set()
    current: tuple[str, Members] | None = None
    stream = gopen(url)
    try:
        for member in tar_file_iterator(stream):
            key, ext = base_plus_ext(member["fname"])
            if key not in wanted:
                continue
            if current is not None and current[0] != key:
                found.add(current[0])
                yield current
                current = None
            current = current or (key, {})
            current[1][ext] = member["data"]
    finally:
        stream.close()
    if current is not None:
        found.add(current[0])
        yield current
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"shard {url} holds no sample {missing[0]!r}"
                         + (f" (nor {len(missing) - 1} more keys)" if len(missing) > 1 else "")
                         + ": the shards changed since they were embedded; embed them again")


def by_shard(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(shard URL, key) pairs grouped by shard, keys in the order asked."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for url, key in pairs:
        grouped[url].append(key)
    return dict(grouped)


def read_images(pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Image.Image]:
    """The decoded RGB image of each (shard URL, key)."""
    images = {}
    for url, keys in by_shard(pairs).items():
        for key, members in members_of(url, keys):
            images[(url, key)] = decode_sample({"__key__": key, "__url__": url,
                                                     **{ext.lower(): data for ext, data in members.items()}})["image"]
    return images

"""Stream WebDataset shards into reproducible, rank- and worker-split DataLoaders (docs/internals.md §2).

The pieces that webdataset does well are used as-is: URL opening (`gopen`: local files, `pipe:` commands, ...;
http(s) by `sslpipe.data.remote`, which retries and resumes), tar member iteration (`tar_file_iterator`), key
splitting (`base_plus_ext`) and the sample shuffle buffer (`wds.shuffle`). The shard *schedule* is written here
because webdataset's `split_by_node`, `split_by_worker` and `ResampledShards` read the rank from
`torch.distributed`/environment variables and keep a hidden epoch counter, whereas the trainer needs the rank, world
size and epoch passed explicitly (tests simulate ranks; resume rebuilds the loader of a given epoch). Shard reading
is per shard so that a truncated shard or undecodable image can be reported with its shard URL and sample key, and
counted.

Schedule, exact mode (``resampled=False``):
  1. all shard URLs are shuffled with a seed derived from (seed, epoch) -- identical on every rank;
  2. rank r takes ``urls[r::world_size]``, its DataLoader worker w takes ``rank_urls[w::num_workers]``;
  3. samples pass a shuffle buffer seeded from (seed, epoch, rank, worker).
  One epoch with ``num_batches=None`` therefore visits every sample exactly once across ranks and workers.
  With ``num_batches`` set, each rank yields exactly that many batches (DDP needs equal counts): when a pass over the
  rank's share ends first, the loader starts the next pass (the share's shard order and the workers' seeds drawn
  anew from (seed, epoch, rank, pass)). A pass reads every sample of the share once, whatever the workers hold,
  and each worker drops its last partial batch (at most batch_size - 1 samples, other ones each pass): a worker
  never re-reads its shards while another has not finished its own (a DataLoader takes batches from its workers in
  turn, so endless workers would over-read the short ones and leave the long ones unfinished). Where the manifest
  gives the shards' sample counts, no more workers are started than the share fills with full batches.
Resampled mode draws shards with replacement per (seed, epoch, rank, worker); it is infinite and cut at
``num_batches`` (required).

Each worker seeds python ``random``, numpy and torch from (seed, epoch, rank, worker) when its stream starts, so
augmentations are a function of the arguments only: two loaders built alike yield identical batches. With
``num_workers=0`` the stream keeps its own RNG state and swaps it in only while producing a batch, so iterating
the loader does not disturb the training loop's global RNG (and skipping batches on resume does not either).

Errors: an undecodable sample or a truncated/unreadable shard is skipped with a warning naming the shard URL and
key and counted in ``loader.stats`` (``corrupt_samples``, ``shard_errors``). The counters live in shared memory,
so counts from worker processes are included; they count every sample a worker has read, including batches
prefetched but not yet consumed (`loader_stats`; the trainer prints and logs their totals at the end of a run).
``on_error="raise"`` raises :class:`ShardReadError` instead, and so does the shard after `max_skipped_shards`
lost by one loader. An error of `sample_fn` (a transform refusing a sample: a label map of another size, a missing
key) is always raised, as a `ShardReadError` naming the shard and key. HTTP(S) shards are read with retries, a
read timeout and resumption (`sslpipe.data.remote`).
"""

from __future__ import annotations

import glob
import io
import json
import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from sslpipe.data.manifest import read_manifest
from sslpipe.data.remote import HTTP_PREFIXES, Reading, fetch_manifest, open_shard

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://", "ais://")
_MAKE_SHARDS_HINT = "write shards first with `sslpipe shards ...` (see README) or fix the path/pattern"


class ShardReadError(RuntimeError):
    """A shard or one of its samples could not be read; the message names the shard URL and sample key."""


class CorruptSampleWarning(UserWarning):
    """A sample or shard was skipped because it could not be read (on_error="warn")."""


# ----------------------------------------------------------------------------------------------- shard resolution
def _load_manifest(path: str, reading: Reading) -> tuple[dict, str]:
    """The manifest (directory, .json file, or the http(s) URL of a manifest.json, read with `reading`'s retries and
    timeout) and the directory or URL its shard names are relative to."""
    if path.startswith(HTTP_PREFIXES):
        return fetch_manifest(path, reading), path.rsplit("/", 1)[0]
    file = os.path.join(path, "manifest.json") if os.path.isdir(path) else path
    return read_manifest(path), os.path.dirname(os.path.abspath(file))


def _manifest_split(manifest: dict, split: str, where: str) -> dict:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(f"{where}: manifest has no split {split!r} (available: {sorted(splits)})")
    return splits[split]


def _is_manifest_spec(spec: str) -> bool:
    return os.path.isdir(spec) or (spec.endswith(".json") and
                                   (spec.startswith(HTTP_PREFIXES) or not spec.startswith(_REMOTE_PREFIXES)))


def _manifest_urls(spec: str, split: str, reading: Reading) -> list[tuple[str, dict]]:
    """(url, manifest entry) of each shard of `split` in the manifest `spec` names."""
    manifest, root = _load_manifest(spec, reading)
    entries = _manifest_split(manifest, split, spec).get("shards", [])
    if not entries:
        raise ValueError(f"{spec}: split {split!r} lists no shards; {_MAKE_SHARDS_HINT}")
    remote = root.startswith(HTTP_PREFIXES)
    return [(f"{root}/{e['name']}" if remote else os.path.join(root, e["name"]), e) for e in entries]


def shard_entries(spec: str | list[str], split: str = "train", reading: Reading = Reading()) -> dict[str, dict]:
    """{url: manifest entry (name, samples, bytes, sha256)} of the shards a manifest lists (none for patterns and
    plain URLs): a shard that ends early is caught by its sample count, a damaged one by its sha256."""
    if isinstance(spec, (list, tuple)):
        return {url: entry for item in spec for url, entry in shard_entries(item, split, reading).items()}
    spec = os.fspath(spec)
    return dict(_manifest_urls(spec, split, reading)) if _is_manifest_spec(spec) else {}


def resolve_shards(spec: str | list[str], split: str = "train", reading: Reading = Reading()) -> list[str]:
    """Turn a shard spec into the list of shard URLs.

    `spec` is a shard directory with ``manifest.json``, a manifest file or the http(s) URL of one (-> that split's
    shards), a brace pattern (``data/train-{000000..000127}.tar``), a glob, a local path, a remote/``pipe:`` URL
    (brace-expanded, otherwise passed through untouched), or a list of any of these. Local files are checked so
    that a typo fails here with the missing names rather than inside a DataLoader worker.
    """
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in resolve_shards(item, split, reading)]
    spec = os.fspath(spec)
    if _is_manifest_spec(spec):
        urls = [url for url, _ in _manifest_urls(spec, split, reading)]
        if urls[0].startswith(HTTP_PREFIXES):
            return urls
    elif spec.startswith(_REMOTE_PREFIXES) or "://" in spec:
        return list(braceexpand.braceexpand(spec))
    else:
        urls = []
        for path in braceexpand.braceexpand(spec):
            urls.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
        if not urls:
            raise FileNotFoundError(f"{spec}: the pattern matches no shard files; {_MAKE_SHARDS_HINT}")
    return _check_local(urls)


def _check_local(urls: list[str]) -> list[str]:
    """`urls`, local files all: a typo fails here with the missing names rather than inside a DataLoader worker."""
    missing = [url for url in urls if not os.path.isfile(url)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shard files missing: {shown}; {_MAKE_SHARDS_HINT}")
    return urls


def resolve_shard_entries(spec: str | list[str], split: str = "train",
                          reading: Reading = Reading()) -> tuple[list[str], dict[str, dict]]:
    """(`resolve_shards`, `shard_entries`) of `spec` with its manifest read once (a remote one is a request)."""
    if isinstance(spec, (list, tuple)):
        pairs = [resolve_shard_entries(item, split, reading) for item in spec]
        return [url for urls, _ in pairs for url in urls], {k: v for _, entries in pairs for k, v in entries.items()}
    spec = os.fspath(spec)
    if not _is_manifest_spec(spec):
        return resolve_shards(spec, split, reading), {}
    entries = dict(_manifest_urls(spec, split, reading))
    urls = list(entries)
    return (urls if urls[0].startswith(HTTP_PREFIXES) else _check_local(urls)), entries


def count_samples(spec: str | list[str], split: str = "train", reading: Reading = Reading()) -> int | None:
    """Number of samples in `split` from the manifest, or None when `spec` is not a manifest (pattern, URL, list)."""
    if isinstance(spec, (list, tuple)) or not _is_manifest_spec(os.fspath(spec)):
        return None
    manifest, _ = _load_manifest(os.fspath(spec), reading)
    return int(_manifest_split(manifest, split, os.fspath(spec))["samples"])


def batches_per_epoch(spec: str | list[str], split: str, batch_size: int, world_size: int,
                      fixed: int | None = None, reading: Reading = Reading()) -> int:
    """Batches per rank in one epoch: `fixed` (the recipe's data.steps_per_epoch) when set, else the manifest's sample
    count over the global batch. Checks first that the shards exist, naming the missing ones."""
    resolve_shards(spec, split, reading)
    if fixed is not None:
        return fixed
    total = count_samples(spec, split, reading)
    if total is None:
        raise ValueError(f"{spec!r} has no manifest.json to count samples from: set data.steps_per_epoch")
    steps = total // (batch_size * world_size)
    if steps == 0:
        raise ValueError(f"{spec} holds {total} samples, fewer than one global batch ({batch_size} x {world_size} "
                         "processes): lower data.batch_size")
    return steps


def rank_shares(spec: str | list[str], split: str, world_size: int, seed: int, epoch: int,
                reading: Reading = Reading()) -> list[int] | None:
    """Samples in each rank's shards in `epoch` of an exact-mode loader (the same split as `StreamDataset`), from the
    manifest's counts; None without them. Every rank takes the same number of batches, so ranks whose shares differ
    re-read samples or leave some unread in that epoch."""
    entries = shard_entries(spec, split, reading)  # the manifest's shards, in the order resolve_shards lists them
    if not entries or any("samples" not in entry for entry in entries.values()):
        return None
    urls = list(entries)
    random.Random(derive_seed(seed, epoch)).shuffle(urls)
    return [sum(int(entries[url]["samples"]) for url in urls[rank::world_size]) for rank in range(world_size)]


# ------------------------------------------------------------------------------------------------ reading, decoding
def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers, the same in every process (unlike `hash`), well mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def to_8bit(img: Image.Image) -> Image.Image:
    """`img` with 8-bit values, for `convert("RGB")`: Pillow clips wider values to 0..255 instead of scaling them,
    so a 16-bit image would turn almost all white. 16-bit grey (`I;16*`, or a 32-bit `I` image whose values all lie
    in 0..65535, as Pillow opens a 16-bit PGM) is scaled by `value >> 8` to mode `L`, the same gain for every image
    (0..65535 -> 0..255); other `I` and float (`F`) images are refused (ValueError): no mode fixes their range.
    Every other mode is returned as it is. Ingest (`sslpipe.ingest.encode`) and the training decoder both use it."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img)
        if img.mode == "F" or (values.size and (values.min() < 0 or values.max() > 65535)):
            kind = "32-bit float" if img.mode == "F" else "32-bit integer, values beyond 0..65535"
            raise ValueError(f"image of mode {img.mode} ({kind}): no mode fixes its value range, so it is not scaled "
                             "to 8 bits; convert it to an 8-bit or 16-bit image first")
        return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8))
    return img


def decode_sample(sample: dict[str, Any],
                  draft: Callable[[int, int], tuple[int, int]] | None = None) -> dict[str, Any]:
    """Raw tar members -> ``{key, url, image (PIL RGB), label (int, -1 if none), seg (PIL "L", if present),
    inst (PIL "I" instance ids, if present), crowd ({instance id: class} of COCO crowd regions, if present)}``.

    `draft(width, height) -> (w, h)`: the smallest size the consumer needs; a JPEG is then decoded at the largest
    1/2, 1/4 or 1/8 reduction that stays at least that big (PIL `draft`: scaling inside the decoder, far cheaper
    than decoding in full and resizing). A sample_fn offers it as its `draft_size` attribute.
    """
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise ValueError(f"no image member ({'/'.join(IMAGE_KEYS)}) in sample; members: {sorted(sample)}")
    with Image.open(io.BytesIO(sample[image_key])) as img:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft(*img.size))
        image = to_8bit(img).convert("RGB")  # also forces a full decode, so truncated bytes fail here
    out = {"key": sample["__key__"], "url": sample["__url__"], "image": image,
           "label": int(sample["cls"].decode("ascii").strip()) if "cls" in sample else -1}
    if "seg.png" in sample:
        with Image.open(io.BytesIO(sample["seg.png"])) as seg:
            seg.load()
            if seg.mode == "P":  # palette PNG (e.g. VOC): the indices are the class ids, not the colours
                seg = Image.fromarray(np.asarray(seg), mode="L")
            elif seg.mode != "L":
                raise ValueError(f"seg.png has mode {seg.mode!r}; expected 8-bit single-channel ('L')")
            out["seg"] = seg.copy()
    if "inst.png" in sample:  # instance ids (16-bit PNG, 0 = none): decoded to a 32-bit "I" image
        with Image.open(io.BytesIO(sample["inst.png"])) as inst:
            inst.load()
            out["inst"] = inst.convert("I")
    if "crowd.json" in sample:  # COCO crowd regions among the instance ids: {id: class}
        out["crowd"] = {int(k): int(v) for k, v in json.loads(sample["crowd.json"]).items()}
    return out


class _Stats:
    """Error counters in shared memory, so that DataLoader worker processes add to the parent's numbers."""

    FIELDS = ("corrupt_samples", "shard_errors")

    def __init__(self) -> None:
        self._counts = multiprocessing.Array("q", len(self.FIELDS))

    def add(self, field: str) -> None:
        with self._counts.get_lock():
            self._counts[self.FIELDS.index(field)] += 1

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.FIELDS, self._counts[:]))


class StreamDataset(IterableDataset):
    """The per-process sample stream: shard schedule -> tar members -> shuffle buffer -> decode -> `sample_fn`."""

    def __init__(self, urls: list[str], *, sample_fn: Callable[[dict], Any], epoch: int, seed: int, rank: int,
                 world_size: int, num_workers: int, shuffle: bool, shuffle_buffer: int, resampled: bool,
                 reading: Reading, entries: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.urls, self.sample_fn = urls, sample_fn
        self.epoch, self.seed, self.rank, self.world_size = epoch, seed, rank, world_size
        self.num_workers, self.shuffle, self.shuffle_buffer = num_workers, shuffle, shuffle_buffer
        self.resampled, self.reading = resampled, reading
        self.npass = 0  # which pass over the rank's share (`StreamLoader` starts the next when one ends early)
        self.entries = entries or {}
        self.stats = _Stats()

    def rank_shards(self) -> list[str]:
        """This rank's shards for the epoch: a (seed, epoch)-seeded permutation, the same on all ranks, then split."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(derive_seed(self.seed, self.epoch)).shuffle(urls)
        return urls[self.rank::self.world_size]

    def _schedule(self, worker: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, 1))
            while True:
                yield rng.choice(self.urls)
        yield from self.pass_shards()[worker::self.num_workers]

    def pass_shards(self) -> list[str]:
        """The rank's shards in this pass's order: `rank_shards` for the first pass, reshuffled for later ones."""
        mine = self.rank_shards()
        if self.npass:
            random.Random(derive_seed(self.seed, self.epoch, self.rank, 2, self.npass)).shuffle(mine)
        return mine

    def _seed(self, *parts: int) -> int:
        """A seed of (seed, epoch, rank, *parts), drawn anew for each pass after the first."""
        return derive_seed(self.seed, self.epoch, self.rank, *parts, *((4, self.npass) if self.npass else ()))

    def _problem(self, kind: str, url: str, key: str | None, exn: BaseException) -> None:
        what = f"shard {url}" + (f", sample {key!r}" if key else "")
        if self.reading.on_error == "raise":
            raise ShardReadError(f"{what}: {type(exn).__name__}: {exn}") from exn
        self.stats.add(kind)
        lost, most = self.stats.as_dict()["shard_errors"], self.reading.max_skipped_shards
        if kind == "shard_errors" and most is not None and lost > most:
            raise ShardReadError(f"{lost} shards lost by rank {self.rank}'s loader, more than data.max_skipped_shards="
                                 f"{most}; the last: {what}: {type(exn).__name__}: {exn}. Check the shards' server or "
                                 "paths, then resume the run (--resume auto)") from exn
        skipped = "rest of shard" if kind == "shard_errors" else "sample"
        warnings.warn(f"skipping {skipped} ({what}): {type(exn).__name__}: {exn}", CorruptSampleWarning,
                      stacklevel=2)

    def read_shard(self, url: str) -> Iterator[dict[str, Any]]:
        """Yield raw samples (members grouped by key) of one shard; a read error drops the unfinished sample, and a
        shard that ends before the manifest's sample count (cut at a member boundary: the tar reader cannot tell)
        counts as unreadable."""
        current: dict[str, Any] | None = None
        last_key, count = None, 0
        entry = self.entries.get(url, {})
        try:
            stream = open_shard(url, self.reading, entry.get("sha256"))
            try:
                for member in tar_file_iterator(stream):
                    key, ext = base_plus_ext(member["fname"])
                    if key is None:
                        continue
                    if current is not None and current["__key__"] != key:
                        last_key, count = current["__key__"], count + 1
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    current[ext.lower()] = member["data"]
            finally:
                stream.close()
        except Exception as exn:  # truncated tar, failing pipe command, unreadable file
            key = current["__key__"] if current else (f"after {last_key}" if last_key else None)
            self._problem("shard_errors", url, key, exn)
            return
        if current is not None:
            last_key, count = current["__key__"], count + 1
            yield current
        if count < entry.get("samples", 0):
            self._problem("shard_errors", url, f"after {last_key}", EOFError(
                f"the shard ended after {count} of the {entry['samples']} samples its manifest lists (truncated)"))

    def _decoded(self, raw: Iterator[dict[str, Any]]) -> Iterator[Any]:
        """Decode + `sample_fn`; an endless stream stops after more failures in a row than a pass can hold."""
        failures = 0
        for sample in raw:
            try:
                decoded = decode_sample(sample, getattr(self.sample_fn, "draft_size", None))
            except Exception as exn:
                self._problem("corrupt_samples", sample["__url__"], sample["__key__"], exn)
                failures += 1
                if self.resampled and failures > self._pass_samples + self.shuffle_buffer:
                    warnings.warn(f"rank {self.rank}: {failures} undecodable samples in a row, a full pass over its "
                                  "shards; stopping this worker's stream", CorruptSampleWarning, stacklevel=2)
                    return
                continue
            failures = 0
            try:
                out = self.sample_fn(decoded)
            except Exception as exn:  # a data or configuration error: raised, naming where, never skipped
                raise ShardReadError(f"shard {sample['__url__']}, sample {sample['__key__']!r}: "
                                     f"{type(exn).__name__}: {exn}") from exn
            yield out

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        worker_seed = self._seed(worker)
        self._pass_samples = 1 << 62  # raw samples in one pass over the schedule; known after the first pass
        random.seed(worker_seed)
        np.random.seed(worker_seed)
        torch.manual_seed(worker_seed)
        raw = self._guarded(worker)
        if self.shuffle:
            rng = random.Random(self._seed(worker, 3))
            raw = shuffle_within_passes(raw, self.shuffle_buffer, min(100, self.shuffle_buffer), rng)
        return self._decoded(s for s in raw if s is not PASS_END)

    def _guarded(self, worker: int) -> Iterator[dict[str, Any]]:
        """Raw samples of the worker's schedule; stops an endless schedule that went a full cycle with no sample."""
        cycle = len(self.urls) if self.resampled else max(1, len(self.pass_shards()[worker::self.num_workers]))
        empty_run, read = 0, 0
        for n, url in enumerate(self._schedule(worker), start=1):
            got = False
            for sample in self.read_shard(url):
                got, read = True, read + 1
                yield sample
            empty_run = 0 if got else empty_run + 1
            if n == cycle:
                self._pass_samples = read
            if n % cycle == 0 and not self.resampled:
                yield PASS_END
            if empty_run >= cycle and self.resampled:
                warnings.warn(f"rank {self.rank} worker {worker}: {cycle} shards in a row gave no readable sample; "
                              "stopping this worker's stream", CorruptSampleWarning, stacklevel=2)
                return


PASS_END = object()  # marks the end of one pass over a worker's shards in its raw sample stream


def shuffle_within_passes(samples: Iterator[Any], bufsize: int, initial: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle buffer (fill `initial`, then emit a random buffered sample per new one, up to
    `bufsize` held), flushed at every `PASS_END`: samples of the next pass over the shards never overtake those of
    the current one, so each pass -- each epoch of a rank that re-reads its share to reach its batch count --
    yields every sample exactly once. (webdataset's own buffer, fed an endless stream, mixes passes whenever
    the buffer is larger than what is left of a pass.)"""
    buffer: list[Any] = []
    arrivals = 0
    for sample in samples:
        if sample is PASS_END:
            rng.shuffle(buffer)
            yield from buffer
            buffer.clear()
            yield PASS_END
            continue
        buffer.append(sample)
        if len(buffer) < initial:
            continue
        arrivals += 1
        if len(buffer) < bufsize and arrivals % 2:
            continue  # still growing towards bufsize: one sample out for every two in
        index = rng.randrange(len(buffer))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------------------------------------- loader
class _OwnRNG:
    """Swap a private (random, numpy, torch) RNG state in around a block; keeps in-process streaming from touching
    the caller's global RNG (num_workers=0), so that e.g. skipping batches on resume leaves training RNG alone."""

    def __init__(self) -> None:
        self.state: tuple | None = None

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        if self.state is not None:
            random.setstate(self.state[0]), np.random.set_state(self.state[1]), torch.set_rng_state(self.state[2])

    def __exit__(self, *exc: object) -> None:
        self.state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.setstate(self.saved[0]), np.random.set_state(self.saved[1]), torch.set_rng_state(self.saved[2])


class StreamLoader:
    """Iterable of batches for one rank and epoch; wraps a `torch.utils.data.DataLoader` over a `StreamDataset`.

    `len()` is `num_batches` when set; `stats` gives the skipped-sample/shard counters (see the module docstring).
    """

    def __init__(self, dataset: StreamDataset, loader: DataLoader, num_batches: int | None) -> None:
        self.dataset, self.loader, self.num_batches = dataset, loader, num_batches

    @property
    def stats(self) -> dict[str, int]:
        return self.dataset.stats.as_dict()

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an exact-mode stream without num_batches has no known length; use count_samples()")
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        """The batches of pass 0, then of passes 1, 2, ... while `num_batches` is not reached (the dataset's
        `npass` picks the pass; a pass that gives no batch at all ends the stream)."""
        in_process = self.loader.num_workers == 0
        rng = _OwnRNG()
        produced, npass, in_pass = 0, 0, 1
        while in_pass and (self.num_batches is None or produced < self.num_batches):
            self.dataset.npass = npass  # before the workers start: each gets a copy of the dataset
            with rng if in_process else nullcontext():
                batches = iter(self.loader)
            in_pass = 0
            while self.num_batches is None or produced < self.num_batches:
                with rng if in_process else nullcontext():
                    batch = next(batches, _END)
                if batch is _END:
                    break
                produced, in_pass = produced + 1, in_pass + 1
                yield batch
            del batches  # shuts the worker processes down (persistent_workers=False)
            if self.num_batches is None or self.dataset.resampled:
                break
            npass += 1
        self.dataset.npass = 0
        if self.num_batches is not None and produced < self.num_batches:
            workers = self.loader.num_workers
            raise ShardReadError(f"rank {self.dataset.rank}: the shards gave only {produced} of {self.num_batches} "
                                 f"batches (stats: {self.stats}); check the shards or lower num_batches"
                                 + (f" (each of the {workers} loader workers batches its own shards: with fewer "
                                    "samples than a batch it gives none; lower data.num_workers or data.batch_size)"
                                    if workers > 1 else ""))


_END = object()


def loader_stats(loader: Any) -> dict[str, int] | None:
    """The skip counters of a training loader: a `StreamLoader`'s own, or summed over the `StreamLoader`s an object
    holds as attributes (U2PL's labelled + unlabelled pair); None for a loader without counters."""
    if isinstance(loader, StreamLoader):
        return loader.stats
    parts = [v.stats for v in getattr(loader, "__dict__", {}).values() if isinstance(v, StreamLoader)]
    return {k: sum(p[k] for p in parts) for k in _Stats.FIELDS} if parts else None


def build_loader(spec: str | list[str], *, split: str = "train", sample_fn: Callable[[dict], Any],
                 collate_fn: Callable[[list], Any], batch_size: int, num_workers: int = 0, epoch: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True, shuffle_buffer: int = 1000,
                 resampled: bool = False, num_batches: int | None = None, drop_last: bool = True,
                 reading: Reading = Reading(), pin_memory: bool = False) -> StreamLoader:
    """Build the batch stream of one rank for one epoch (schedule and seeding: see the module docstring).

    Rank and world size are explicit (no torch.distributed lookup). Batches are formed inside each DataLoader
    worker from that worker's samples; with `drop_last=True` each worker's last partial batch is dropped, and
    always with `num_batches` (a pass's partial batch would fall in the middle of the epoch's full ones). Workers
    beyond this rank's shard count would get nothing and are not started.
    `pin_memory` (training on CUDA) pins the batches so that their copies to the GPU can run asynchronously.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if resampled and num_batches is None:
        raise ValueError("resampled=True streams forever: pass num_batches (batches per rank per epoch)")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    urls, entries = resolve_shard_entries(spec, split, reading)
    if not resampled and len(urls) < world_size:
        raise ValueError(f"{len(urls)} shards cannot be split over {world_size} ranks without leaving a rank empty; "
                         "write more, smaller shards (`sslpipe shards ... --samples-per-shard N`) or use "
                         "resampled=True")
    if not resampled:
        num_workers = min(num_workers, len(urls[rank::world_size]))
    dataset = StreamDataset(urls, sample_fn=sample_fn, epoch=epoch, seed=seed, rank=rank, world_size=world_size,
                            num_workers=max(1, num_workers), shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                            resampled=resampled, reading=reading, entries=entries)
    share = sum(dataset.entries.get(url, {}).get("samples", 0) for url in dataset.rank_shards())
    if num_batches is not None and not resampled and share:
        # each worker batches its own shards: more workers than full batches in the share would leave a pass empty
        num_workers = min(num_workers, max(1, share // batch_size))
        dataset.num_workers = max(1, num_workers)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers,
                        drop_last=drop_last or num_batches is not None, persistent_workers=False, pin_memory=pin_memory,
                        # DataLoader draws a base seed from this generator, not from the caller's global RNG
                        generator=torch.Generator().manual_seed(derive_seed(seed, epoch, rank)))
    return StreamLoader(dataset, loader, num_batches)

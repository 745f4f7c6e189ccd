"""`sslpipe embed`: the feature of every image of a split, float16 and L2-normalised, one store part per shard
(sslpipe/embed/store.py).

The features are the probes' (`FeatureSpec.from_export`: the export's size, mean and std; the `cls` pooling), so a
neighbour found in an embedding folder is one `sslpipe knn` would count. Resumable: a part is written whole or not at
all, and a run skips the shards that have one. Under `accelerate launch` rank r of P embeds shards r, r + P, ...
(each part is its own file, so the processes never write the same one); after a barrier rank 0 counts the parts and
marks embed.json `complete`. A shard read short of its manifest's sample count (truncated, damaged) gets no part, so a
rerun embeds it again, and the run ends with an error naming it and what was readable. A shard without a count (a
pattern or list input) is checked the same way once the loader has reported a skipped shard or sample: its samples
are counted by reading its tar members again, undecoded (`_count_samples`): the loader counts skips, not where. (Such
a shard cut exactly between two samples reads as a whole, shorter tar: only a manifest's count tells; give the shard
directory to have every shard checked.) Every rank decodes with
`spec.num_workers` loader processes; a batch carries its loader worker's id, and as each worker reads its shards one
after the other, a shard is whole once its worker has moved on.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import get_worker_info
from tqdm.auto import tqdm
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from sslpipe.data.remote import Reading, open_shard
from sslpipe.data.stream import ShardReadError, build_loader
from sslpipe.embed.backbone import backbone_sha256, is_backbone, open_backbone, spec_record
from sslpipe.embed.inputs import (
    FOLDER_SHARDS,
    Input,
    check_folder,
    data_name,
    embed_wrote,
    files_record,
    is_image_folder,
    refuse_foreign_shards,
    resolve_input,
    write_folder_shards,
)
from sslpipe.embed.search import IVF_FILE, IVF_STAMP
from sslpipe.embed.store import (
    INDEX,
    done_shards,
    part_name,
    read_index,
    read_part,
    read_shorts,
    short_name,
    write_index,
    write_part,
    write_short,
)
from sslpipe.eval.features import autocast, default_device, feature_dim
from sslpipe.eval.spec import FeatureSpec

IDENTITY = ("backbone_sha256", "data", "split", "spec")  # what must match for a run to add to an existing --out
# the files of an embedding run and of its search index beside embed.json (and OUT/shards for a folder): by name, so
# that --force never takes a file of the user's (a `search-hits.png` of theirs, say)
WRITTEN = ("part-*.safetensors", "part-*.safetensors.tmp", "short-*.json", "short-*.json.tmp", IVF_FILE, IVF_STAMP,
           f".{IVF_FILE}.tmp")


class _Sample:
    """sample_fn of the stream: (image tensor, key, shard URL, loader worker). A class, so workers can pickle it."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, raw: dict[str, Any]) -> tuple[Tensor, str, str, int]:
        info = get_worker_info()
        return self.transform(raw["image"]), raw["key"], raw["url"], info.id if info is not None else 0


def _collate(batch: list[tuple[Tensor, str, str, int]]) -> tuple[Tensor, list[str], list[str], int]:
    images, keys, urls, workers = zip(*batch)
    return torch.stack(images), list(keys), list(urls), workers[0]


def _describe(index: dict[str, Any]) -> str:
    return (f"backbone {index['backbone']} (sha256 {index['backbone_sha256'][:12]}...) on {index['data']} split "
            f"{index['split']!r}")


def check_out(out: Path, identity: dict[str, Any], inp: Input | None, force: bool) -> dict[str, Any] | None:
    """The index of `out` when this run may add to it (None: a fresh start); refuses, naming both sides, an `out`
    of another backbone, data set, spec or shard list, one whose shards have changed since (rewritten in place), or
    a non-empty folder that is no embedding folder (unless `force`)."""
    if force or not out.exists() or not any(out.iterdir()):
        return None
    if not (out / INDEX).is_file():
        raise FileExistsError(f"--out {out} is not empty and holds no {INDEX}: choose an empty or new folder, or "
                              "pass --force to write the embeddings there anyway")
    index = read_index(out)
    differ = [k for k in IDENTITY if k != "backbone_sha256" and index.get(k) != identity[k]]
    recorded = index.get("backbone_sha256")  # an older embed.json: the file's sha256, not the tensors'
    if recorded != identity["backbone_sha256"] and not (recorded and is_backbone(identity["backbone"], recorded)):
        differ.insert(0, "backbone_sha256")
    if differ:
        raise FileExistsError(f"--out {out} holds the embeddings of {_describe(index)}; this run embeds "
                              f"{_describe(identity)} ({', '.join(differ)} differ): choose another --out, or pass "
                              "--force to start over")
    why = shard_mismatch(index, inp, done_shards(out)) if inp is not None else None
    if why:
        raise FileExistsError(f"--out {out} holds embeddings of {_describe(index)}, but {why}: pass --force to "
                              "embed the shard set again (or choose another --out)")
    return index


def shard_mismatch(index: dict[str, Any], inp: Input, done: set[int] | None = None) -> str | None:
    """Why the embeddings of `index` (embed.json) are not those of `inp`'s shards: another shard list, or shards
    rewritten in place since (their recorded versions); None when they are (an index of an older sslpipe records no
    versions). `done`: the shards that have a part (None: all); one without a part may change (a damaged shard
    repaired), it is embedded as it is now."""
    if index["shards"] != inp.urls:
        return f"{len(index['shards'])} shards were embedded and the data lists {len(inp.urls)} (another shard list)"
    recorded = index.get("shard_versions") or [None] * len(inp.urls)
    changed = [url for i, (url, old, new) in enumerate(zip(inp.urls, recorded, inp.versions))
               if old is not None and old != new and (done is None or i in done)]
    if changed:
        return (f"{len(changed)} shard(s) were rewritten in place since they were embedded ("
                f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})")
    return None


def _inside(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def _force_plan(out: Path, data: str | Path, inp: Input | None) -> list[Path]:
    """What --force removes from `out` (never other files of the folder): the files beside an embed.json, and
    OUT/shards when embed wrote it (`embed_wrote`). Refused, before anything is removed: files named like embed's
    without an embed.json (whose are they?), and a `data` (or one of its shards) inside what would go."""
    if not out.is_dir():
        return []
    plan = sorted({p for pattern in WRITTEN for p in out.glob(pattern)})
    has_index = (out / INDEX).is_file()  # written before the first part, removed after the last
    if plan and not has_index:
        raise FileExistsError(f"--out {out} holds {plan[0].name} but no {INDEX}: not known to be written by "
                              "sslpipe embed, so --force does not remove it; choose another --out")
    shards = out / FOLDER_SHARDS
    if shards.is_dir() and embed_wrote(shards):
        plan.append(shards)
    if has_index:
        plan.append(out / INDEX)
    local = [p for p in (os.fspath(data), *(inp.urls if inp is not None else ())) if os.path.exists(p)]
    for path in plan:
        hit = next((p for p in local if _inside(p, path)), None)
        if hit is not None:
            raise FileExistsError(f"--data {data}: {hit} lies in {path}, which --force removes (sslpipe embed wrote "
                                  f"it into --out {out}); choose another --out")
    return plan


def _clear(plan: list[Path]) -> None:
    """Remove what `_force_plan` listed: --force starts over."""
    for path in plan:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _count_samples(url: str) -> tuple[int, str | None]:
    """(samples, None) of a shard read to its end as tar members (no image decoded), or (samples before the
    fault, the read error): the check of a shard that has no manifest count."""
    samples, last = 0, None
    try:
        stream = open_shard(url, Reading())
        try:
            for member in tar_file_iterator(stream):
                key, _ = base_plus_ext(member["fname"])
                if key is not None and key != last:
                    samples, last = samples + 1, key
        finally:
            stream.close()
    except Exception as err:  # truncated tar, junk, unreadable file: what the loader skipped
        return samples, f"{type(err).__name__}: {err}"
    return samples, None


@torch.inference_mode()
def _embed(model: nn.Module, spec: FeatureSpec, device: torch.device, todo: dict[str, int], out: Path, dim: int,
           bar: tqdm, samples: dict[str, int | None]) -> None:
    """Embed the shards `todo` (URL -> shard index) and write each one's part as soon as it is whole; a shard that
    gave fewer than its manifest's `samples` gets a note instead (store.py), so it stays to do. Once the loader has
    skipped anything, a shard without a count is counted (`_count_samples`) before its part is written."""
    loader = build_loader(list(todo), split="train", sample_fn=_Sample(spec.transform()), collate_fn=_collate,
                          batch_size=spec.batch_size, num_workers=spec.num_workers, shuffle=False, drop_last=False)
    pending: dict[str, tuple[list[Tensor], list[str]]] = {}
    current: dict[int, str] = {}
    written: set[str] = set()
    feature_fn = spec.feature_fn()

    def flush(url: str) -> None:
        feats, keys = pending.pop(url, ([], []))
        written.add(url)
        expected, error = samples.get(url), None
        if expected is None and any(loader.stats.values()):
            # the loader skipped something, somewhere: a shard's skips are counted before its worker moves on
            counted, error = _count_samples(url)
            expected = None if error else counted
        if error is not None or (expected is not None and len(keys) < expected):
            write_short(out, todo[url], url, len(keys), expected, error)
            return
        features = torch.cat(feats) if feats else torch.zeros(0, dim)
        write_part(out, todo[url], features, keys, [url] * len(keys))
        (out / short_name(todo[url])).unlink(missing_ok=True)

    for images, keys, urls, worker in loader:
        with autocast(device, spec.precision):
            out_features = feature_fn(model, images.to(device, non_blocking=True))
        feats = F.normalize(out_features.float(), dim=1).to(torch.float16).cpu()
        for row, (key, url) in enumerate(zip(keys, urls)):
            if current.get(worker, url) != url:
                flush(current[worker])  # this worker has moved on: its previous shard is whole
            current[worker] = url
            entry = pending.setdefault(url, ([], []))
            entry[0].append(feats[row:row + 1])
            entry[1].append(key)
        bar.update(len(keys))
    for url in todo:  # the last shard of each worker, and shards without one readable sample
        if url not in written:
            flush(url)


def _ranks(accelerator: Any) -> tuple[int, int]:
    return (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)


def _barrier(accelerator: Any) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def _check_done(out: Path, inp: Input) -> None:
    """Refuse to finish while a shard has no part (every rank calls it after the barrier, so all stop together). A
    shard read short is named with what was readable: embedding the rest would curate or search a smaller pool
    silently."""
    done = done_shards(out)
    missing = [i for i in range(len(inp.urls)) if i not in done]
    shorts = read_shorts(out)
    short = [shorts[i] for i in missing if i in shorts]
    if short:
        listed = "; ".join(f"shard {n['url']}: " + (f"{n['read']} of {n['samples']} samples readable"
                                                   if n.get("samples") is not None else
                                                   f"{n['read']} samples readable, then {n.get('error')}")
                           for n in short[:5])
        raise ShardReadError(f"{out} is incomplete, {len(short)} shard(s) read short ({listed}"
                             f"{'; ...' if len(short) > 5 else ''}): truncated or damaged? Repair them (copy or write "
                             "them again), then run the same command: it embeds only those shards")
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:5]} have no part after every process finished; run the same "
                           "command again to embed them")


def _finish(out: Path, inp: Input) -> dict[str, Any]:
    """Mark the folder complete (`_check_done` passed); the count is read from the part headers."""
    index = read_index(out)
    count = sum(len(read_part(out / part_name(i), features=False).keys) for i in range(len(inp.urls)))
    index.update(complete=True, count=count)
    index.pop("format", None)
    write_index(out, index)
    return index


def embed_shards(export: str | Path, data: str | Path, out: str | Path, *, split: str = "train",
                 spec: FeatureSpec | None = None, accelerator: Any = None, progress: bool = True,
                 force: bool = False) -> Path:
    """Write the embeddings of `data`'s `split` (a shard set, or a folder of images) under `export` into `out`;
    return `out`. `spec`: default `FeatureSpec.from_export(export)`; `accelerator`: several processes share the
    shards; `force`: start over in an `out` that holds other embeddings (`_force_plan`: only what embed wrote goes).
    A run that stopped resumes."""
    out = Path(out)
    spec = spec or FeatureSpec.from_export(export)
    rank, world = _ranks(accelerator)
    identity = {"backbone": str(Path(export).resolve()), "backbone_sha256": backbone_sha256(export),
                "data": data_name(data), "split": split, "spec": spec_record(spec)}
    folder = is_image_folder(data)
    given = None if folder else resolve_input(data, split, out)
    existing = check_out(out, identity, given, force)
    plan = _force_plan(out, data, given) if force else []
    if folder and out / FOLDER_SHARDS not in plan:
        refuse_foreign_shards(out, data)
    if folder and existing is not None:
        check_folder(data, out)
    model = open_backbone(export, spec)  # after the checks: a refused `out` costs no model load
    if rank == 0:
        _clear(plan)
        out.mkdir(parents=True, exist_ok=True)
        if folder:
            write_folder_shards(data, out, progress)
    _barrier(accelerator)
    inp = resolve_input(data, split, out)
    dim = feature_dim(model, spec)
    if rank == 0 and (existing is None or existing.get("shards") != inp.urls or existing.get("complete")
                      or existing.get("shard_versions") != inp.versions):  # versions: of repaired shards, as embedded
        write_index(out, {**identity, "dim": dim, "dtype": "float16", "shards": inp.urls,
                          "shard_versions": inp.versions,
                          "files": files_record(out, inp.files), "complete": False, "count": None})
    _barrier(accelerator)
    done = done_shards(out)
    todo = {url: i for i, url in enumerate(inp.urls) if i % world == rank and i not in done}
    total = sum(n or 0 for i, n in enumerate(inp.samples) if inp.urls[i] in todo) or None
    device = torch.device(spec.device) if spec.device is not None else (
        accelerator.device if accelerator is not None else default_device(model))
    desc = f"embed {split}" + (f" (rank {rank} of {world})" if world > 1 else "")
    with tqdm(total=total, desc=desc, unit="img", disable=not progress or rank != 0) as bar:
        if todo:
            model.to(device).eval()
            _embed(model, spec, device, todo, out, dim, bar, dict(zip(inp.urls, inp.samples)))
    _barrier(accelerator)
    _check_done(out, inp)
    if rank == 0:
        _finish(out, inp)
    _barrier(accelerator)
    return out

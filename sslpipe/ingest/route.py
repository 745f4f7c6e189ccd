"""`sslpipe shards` in one call: which writer a source goes to.

A segmentation layout (`voc`, `cityscapes`, `ade20k`, the `stardist` tiles, or `scenes` with `semi`) is read into
(train, val) pairs and written as U2PL's labelled / unlabelled / val shard sets (`sslpipe.ingest.semi_shards`); every
other source becomes one shard set (`sslpipe.ingest.shards.write_shards`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sslpipe.ingest.layouts import read_labelled_ids, read_layout
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.semi_shards import check_semi_options, check_semi_out, write_semi_shards
from sslpipe.ingest.shards import write_shards

_LOCATIONS = ("dataset", "folder", "list_file", "seg_list", "coco", "voc", "cityscapes", "ade20k")


@dataclass(frozen=True)
class ShardSource:
    """What `sslpipe shards` reads: exactly one location, one field per source flag, and that source's details."""

    dataset: str | None = None  # a bundled data set, `scenes` or `stardist`
    folder: str | None = None
    list_file: str | None = None
    seg_list: str | None = None
    coco: str | None = None
    voc: str | None = None
    cityscapes: str | None = None
    ade20k: str | None = None
    classes: Sequence[str] | None = None  # the class names of a list or seg-list source, in label order
    coco_images: str | None = None  # the image folder of a single COCO json (default: found next to it)
    scenes: dict | None = None  # `train` / `val` counts, `size` and any SceneGenerator keyword of the scenes
    voc_splits: tuple[str, str] = ("train", "val")  # VOC's train and val split lists (names or list files)

    def __post_init__(self) -> None:
        given = [name for name in _LOCATIONS if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(f"a shard source is exactly one of {', '.join(_LOCATIONS)}; got {given or 'none'}")
        unread = [what for what, read in (("coco_images (--coco-images)", self.coco_images is None or self.coco),
                                          ("scenes (--scene-*)", self.scenes is None or self.dataset == "scenes"),
                                          ("voc_splits (--voc-train/--voc-val)",
                                           self.voc_splits == ("train", "val") or self.voc)) if not read]
        if unread:
            raise ValueError(f"{', '.join(unread)} not read by a {given[0]} source: leave it out")


def write_source(out: str | Path, source: ShardSource, options: ShardOptions = ShardOptions(), *, semi: bool = False,
                 labeled: str | None = None, labeled_list: str | None = None, num_workers: int = 0,
                 force: bool = False, created_by: str | None = None, progress: bool = True) -> list[str]:
    """Write `source` into `out`; return what to tell the user: a line per split or shard set written, and one for
    the unreadable samples skipped.

    `semi`: write the scenes as a layout too. A layout's labelled subset is `labeled` (a count or a fraction such as
    `1/16`, chosen by `options.seed`) or the ids in the file `labeled_list`; neither: all labelled. A layout reads
    every option but `val_fraction` and `limit`, which it refuses (`write_semi_shards`)."""
    if labeled and labeled_list:
        raise ValueError("--labeled and --labeled-list both choose the labelled subset: give one of them")
    if source.classes is not None and not (source.seg_list or source.list_file):
        raise ValueError("--classes names the classes of a --seg-list or --list source; the others name their own")
    if source.voc or source.cityscapes or source.ade20k or source.dataset == "stardist" or (
            source.dataset == "scenes" and semi):
        check_semi_options(options)
        check_semi_out(out, force)  # before read_layout writes converted labels or generated images into OUT/source
        train, val, classes = read_layout(
            Path(out) / "source", voc=source.voc, cityscapes=source.cityscapes, ade20k=source.ade20k,
            scenes=source.scenes if source.dataset == "scenes" else None, stardist=source.dataset == "stardist",
            voc_train=source.voc_splits[0], voc_val=source.voc_splits[1], seed=options.seed)
        summary = write_semi_shards(out, train, val, classes=classes, labeled=labeled,
                                    labeled_ids=read_labelled_ids(labeled_list) if labeled_list else None,
                                    options=options, force=force, num_workers=num_workers, progress=progress,
                                    created_by=created_by)
        return [f"{out}/{name}: {info['samples']} samples in {info['shards']} shards"
                for name, info in summary["sets"].items()]
    if semi or labeled or labeled_list:
        raise ValueError("--semi/--labeled/--labeled-list go with --voc, --cityscapes, --ade20k or "
                         "--dataset scenes --semi")
    location, kind = (
        (source.dataset, "scenes" if source.dataset == "scenes" else "dataset") if source.dataset else
        (source.folder, "folder") if source.folder else
        (source.list_file, "list") if source.list_file else
        (source.coco, "coco") if source.coco else
        (source.seg_list, "seg-list")
    )
    manifest = write_shards(out, source=location, kind=kind, options=options, num_workers=num_workers, force=force,
                            created_by=created_by, progress=progress, scenes=source.scenes,
                            coco_images=source.coco_images, classes=source.classes)
    lines = [f"{split}: {info['samples']} samples in {len(info['shards'])} shards"
             for split, info in manifest["splits"].items()]
    no_mask = sum(f.get("annotations_without_mask", 0) for f in manifest.get("coco", {}).get("files", {}).values())
    if no_mask:
        lines.append(f"left out {no_mask} annotations without a mask (box only, or a polygon of < 3 points)")
    if manifest.get("skipped"):
        lines.append(f"skipped {len(manifest['skipped'])} unreadable samples (listed in {out}/manifest.json)")
    return lines

"""`sslpipe shards`: write WebDataset shards + manifest.json from images, a list, a dataset layout or a bundled
data set."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sslpipe.cli.probes import nonnegative_int, positive_int

_LAYOUTS = ("--voc", "--cityscapes", "--ade20k", "--dataset stardist", "--dataset scenes --semi")
_SCENES = ("--dataset scenes", "--dataset scenes --semi")
_BUNDLED = ("--dataset fashion-mnist", "--dataset digits")
_ONE_SET = (*_BUNDLED, "--dataset scenes", "--folder", "--list", "--seg-list", "--coco")  # one shard set each
# The sources that read image files as they are (a JPEG can be re-encoded as JPEG without --reencode: turned upright
# or downsized by --max-side); the bundled ones make their images, stored as PNG unless --reencode jpg.
_FILES = ("--folder", "--list", "--seg-list", "--coco", "--voc", "--cityscapes", "--ade20k")
# The flags only some sources read (dest -> those sources); every other flag is read by all of them.
_READ_BY = {
    "val_fraction": ("--folder", "--list", "--seg-list", "--coco"),
    "limit": _ONE_SET,
    "seed": tuple(s for s in (*_ONE_SET, *_LAYOUTS) if s not in _BUNDLED),
    "classes": ("--list", "--seg-list"),
    "coco_images": ("--coco",),
    **{f"scene_{k}": _SCENES for k in ("size", "train", "val", "objects", "scale", "classes")},
    "semi": ("--dataset scenes --semi",),
    "labeled": _LAYOUTS,
    "labeled_list": _LAYOUTS,
    "voc_train": ("--voc",),
    "voc_val": ("--voc",),
}


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write WebDataset tar shards + manifest.json from images or a bundled data set")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["fashion-mnist", "digits", "scenes", "stardist"],
                     help="a bundled data set; `scenes`: generated segmentation scenes (Fashion-MNIST objects on "
                          "scikit-image photographs, seg.png + inst.png); `stardist`: 64-px tiles of the real "
                          "nuclei image in the stardist wheel (background/nucleus), written like --voc")
    src.add_argument("--folder", help="an image folder with one sub-folder per class (like ImageFolder)")
    src.add_argument("--list", dest="list_file", help="a list file: `path [label]` per line")
    src.add_argument("--seg-list", help="a list file: `image_path label_png_path` per line (segmentation)")
    src.add_argument("--voc", help="a PASCAL VOC style folder (JPEGImages/, SegmentationClass[Aug]/, split lists): "
                                   "writes OUT/labeled, OUT/unlabeled, OUT/val for U2PL (docs/u2pl.md)")
    src.add_argument("--cityscapes", help="a Cityscapes style folder (leftImg8bit/, gtFine/): like --voc")
    src.add_argument("--ade20k", help="an ADEChallengeData2016 folder (images/, annotations/; labels 1..150 -> 0..149, "
                                      "0 -> 255): like --voc")
    src.add_argument("--coco", help="COCO instances: a COCO folder (annotations/instances_*.json + image folders, "
                                    "splits kept) or one COCO-format json; writes seg.png + inst.png per image")
    p.add_argument("out", help="output directory (refused if it is not empty, unless --force)")
    p.add_argument("--samples-per-shard", type=positive_int, default=10000)
    p.add_argument("--max-shard-bytes", type=positive_int, default=None, help="also start a new shard past this size")
    p.add_argument("--val-fraction", type=float, default=0.0, help="held-out fraction for sources with no split")
    p.add_argument("--reencode", choices=["jpg", "png"], default=None,
                   help="re-encode images (default: keep the bytes of JPEG/PNG files, except those that must change "
                        "to be stored as shown: EXIF-rotated photos are turned upright and 16-bit images scaled to "
                        "8 bits (value >> 8), then re-encoded)")
    p.add_argument("--quality", type=_jpeg_quality, default=95,
                   help="JPEG quality (1-100) of the JPEGs written: with --reencode jpg, or, for the sources that "
                        "read image files, of the JPEG files that are re-encoded (EXIF-rotated, or downsized by "
                        "--max-side); refused where no JPEG is written (--reencode png, the bundled data sets)")
    p.add_argument("--max-side", type=positive_int, default=None, help="downscale so the longer side is at most this")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N samples per split (not for layouts)")
    p.add_argument("--workers", type=nonnegative_int, default=1, help="processes that read and encode images")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.add_argument("--classes", default=None,
                   help="--seg-list/--list: the class names in label order, a file (one per line) or a,b,c "
                        "(a seg-list names none otherwise; its label maps are checked against them)")
    p.add_argument("--coco-images", default=None, help="--coco with one json: its image folder (default: found "
                                                       "next to the json)")
    p.add_argument("--scene-size", type=int, default=64, help="scenes: image side in pixels")
    p.add_argument("--scene-train", type=int, default=2000, help="scenes: number of train images")
    p.add_argument("--scene-val", type=int, default=500, help="scenes: number of val images")
    p.add_argument("--scene-objects", default=None, metavar="MIN,MAX",
                   help="scenes: objects per image (default 1,4)")
    p.add_argument("--scene-scale", default=None, metavar="LO,HI",
                   help="scenes: object side as a fraction of the image side (default 0.35,0.7)")
    p.add_argument("--scene-classes", default=None, metavar="NAME,NAME,...",
                   help="scenes: paste only these Fashion-MNIST classes, labelled 1.. in this order "
                        "(e.g. Trouser,Sneaker,Bag; default all ten)")
    p.add_argument("--semi", action="store_true",
                   help="scenes: write labelled/unlabelled/val shard sets like --voc (with --labeled)")
    p.add_argument("--labeled", default=None,
                   help="--voc/--cityscapes/--ade20k/--semi: the labelled subset, a count (1464) or fraction "
                        "(1/16), chosen by a seeded list (--seed); the rest becomes unlabelled. Default: all labelled")
    p.add_argument("--labeled-list", default=None,
                   help="--voc/--cityscapes/--ade20k: a file of the labelled ids instead")
    p.add_argument("--voc-train", default="train",
                   help="--voc: train split (ImageSets/Segmentation/NAME.txt or a list file; U2PL: trainaug ids)")
    p.add_argument("--voc-val", default="val", help="--voc: val split (name or list file)")
    p.set_defaults(shard_flag_defaults={dest: p.get_default(dest) for dest in (*_READ_BY, "quality")})
    p.epilog = ("Images are stored as they are shown: a photo's EXIF orientation is applied (its label map, if any, "
                "must match the photo as shown). A flag the chosen source does not read is refused.")


def _jpeg_quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a JPEG quality from 1 to 100, got {text}")
    return value


def _source_flag(args: argparse.Namespace) -> str:
    """The source as its flag(s), as `_READ_BY` names it."""
    if args.dataset:
        return f"--dataset {args.dataset}" + (" --semi" if args.dataset == "scenes" and args.semi else "")
    return next(flag for dest, flag in (("folder", "--folder"), ("list_file", "--list"), ("seg_list", "--seg-list"),
                                        ("coco", "--coco"), ("voc", "--voc"), ("cityscapes", "--cityscapes"),
                                        ("ade20k", "--ade20k")) if getattr(args, dest))


def _refuse_unread(args: argparse.Namespace) -> None:
    """A flag given (not at its default) that the source does not read is refused, not silently dropped."""
    source = _source_flag(args)
    unread = ["--" + dest.replace("_", "-") for dest, readers in _READ_BY.items()
              if source not in readers and getattr(args, dest) != args.shard_flag_defaults[dest]]
    if unread:
        raise ValueError(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not read by a {source} source: "
                         "leave it out (`sslpipe shards --help` says which source reads which option)")
    if args.quality != args.shard_flag_defaults["quality"] and args.reencode != "jpg" and (
            args.reencode == "png" or source not in _FILES):
        written = "--reencode png writes PNG" if args.reencode == "png" else f"a {source} source is stored as PNG"
        raise ValueError(f"--quality is read only where JPEGs are written, and {written}: add --reencode jpg, or "
                         "leave --quality out")


def _pair(text: str, cast: type, flag: str) -> tuple:
    """`a,b` -> (cast(a), cast(b)), or a clear error naming the flag."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return cast(parts[0]), cast(parts[1])
    except ValueError:
        raise ValueError(f"{flag} takes two numbers as MIN,MAX (e.g. {flag} 1,2), got {text!r}") from None


def _scene_options(args: argparse.Namespace) -> dict:
    """The `scenes` options of `--dataset scenes` (SceneGenerator keywords besides the counts and the size)."""
    options = {"train": args.scene_train, "val": args.scene_val, "size": args.scene_size}
    if args.scene_objects:
        options["objects"] = _pair(args.scene_objects, int, "--scene-objects")
    if args.scene_scale:
        options["scale"] = _pair(args.scene_scale, float, "--scene-scale")
    if args.scene_classes:
        options["classes"] = [name.strip() for name in args.scene_classes.split(",")]
    return options


def run(args: argparse.Namespace) -> int:
    from sslpipe.ingest.options import ShardOptions
    from sslpipe.ingest.route import ShardSource, write_source
    from sslpipe.ingest.sources import parse_classes

    _refuse_unread(args)
    source = ShardSource(dataset=args.dataset, folder=args.folder, list_file=args.list_file, seg_list=args.seg_list,
                         coco=args.coco, voc=args.voc, cityscapes=args.cityscapes, ade20k=args.ade20k,
                         classes=parse_classes(args.classes) if args.classes else None, coco_images=args.coco_images,
                         scenes=_scene_options(args) if args.dataset == "scenes" else None,
                         voc_splits=(args.voc_train, args.voc_val))
    options = ShardOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                           val_fraction=args.val_fraction, seed=args.seed, reencode=args.reencode, quality=args.quality,
                           max_side=args.max_side, limit=args.limit)
    out, existed = Path(args.out), Path(args.out).exists()
    try:
        for line in write_source(args.out, source, options, semi=args.semi, labeled=args.labeled,
                                 labeled_list=args.labeled_list, num_workers=args.workers, force=args.force,
                                 created_by="sslpipe " + " ".join(sys.argv[1:])):
            print(line)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused source leaves no empty OUT behind
        raise
    return 0

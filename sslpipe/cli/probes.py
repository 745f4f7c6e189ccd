"""What the probe commands (knn, linear, qscore, linear-seg, show) share: their arguments and how those become a
`FeatureSpec` (the export's image size, mean and std, overridden by the flags given) and a `ProbeData`. embed and
curate take the same feature flags (`add_spec_args`), so their features are the probes'."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sslpipe.eval.spec import FeatureSpec, ProbeData


def add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("backbone", help="an export folder (or its model.safetensors)")
    p.add_argument("--data", required=True, help="shard directory with manifest.json (or a shard pattern)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    add_spec_args(p)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N train samples")
    p.add_argument("--max-val", type=int, default=None, help="use only the first N val samples")
    p.add_argument("--out", default=None, help="write the result JSON here")


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """The flags that say how images become features (embed and curate take them too)."""
    p.add_argument("--resize", type=int, default=None, help="eval resize (default: the export's image size x 256/224)")
    p.add_argument("--crop", type=int, default=None, help="eval centre crop (default: the export's image size)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)


# parsed flag -> FeatureSpec field, for the probe commands that have the flag
_SPEC_FLAGS = {"resize": "resize", "crop": "crop", "size": "crop", "workers": "num_workers", "device": "device"}


def feature_spec(args: argparse.Namespace, **fields: Any) -> FeatureSpec:
    """The probe's FeatureSpec: the export's image size, mean and std, overridden by the flags given (--resize,
    --crop or --size, --workers, --device, where the command has them) and by the command's own `fields`."""
    from sslpipe.eval.spec import FeatureSpec

    flags = {field: getattr(args, flag) for flag, field in _SPEC_FLAGS.items() if hasattr(args, flag)}
    return FeatureSpec.from_export(args.backbone, **flags, **fields)


def probe_data(args: argparse.Namespace) -> ProbeData:
    """The images of a `_add_probe_args` command: both splits of --data, capped by --max-train / --max-val."""
    from sslpipe.eval.spec import ProbeData

    return ProbeData(args.data, args.data, args.train_split, args.val_split, args.max_train, args.max_val)

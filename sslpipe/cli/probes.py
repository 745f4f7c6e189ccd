"""What the probe commands (knn, linear, qscore, linear-seg, show) share: their arguments and how those become a
`FeatureSpec` (the export's image size, mean and std, overridden by the flags given) and a `ProbeData`. embed and
curate take the same feature flags (`add_spec_args`), so their features are the probes'."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from sslpipe.eval.spec import FeatureSpec, ProbeData


# Flag types: a bad value is refused by argparse, naming the flag, before any feature is extracted (the library
# would refuse it only after both splits are, with a message that names no flag).
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def open_fraction(text: str) -> float:
    """A level strictly between 0 and 1 (a confidence level: 0.95, not 95)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (e.g. 0.95 for 95%), got {text}")
    return value


def fraction_or_none(text: str) -> float | None:
    """A share in (0, 1], or 'none'."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1] or 'none', got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] or 'none', got {text}")
    return value


class PercentileBand(argparse.Action):
    """`--percentiles LOW HIGH` (floats): refused unless 0 <= LOW <= HIGH <= 100."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Sequence[float] | None,
                 option_string: str | None = None) -> None:
        lo, hi = values  # nargs=2
        if not 0 <= lo <= hi <= 100:
            raise argparse.ArgumentError(self, f"must be LOW HIGH with 0 <= LOW <= HIGH <= 100, got {lo:g} {hi:g}")
        setattr(namespace, self.dest, [lo, hi])


def add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("backbone", help="an export folder (or its model.safetensors)")
    p.add_argument("--data", required=True, help="shard directory with manifest.json (or a shard pattern)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    add_spec_args(p)
    p.add_argument("--max-train", type=positive_int, default=None, help="use only the first N train samples")
    p.add_argument("--max-val", type=positive_int, default=None, help="use only the first N val samples")
    p.add_argument("--out", default=None, help="write the result JSON here")


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """The flags that say how images become features (embed and curate take them too)."""
    p.add_argument("--resize", type=positive_int, default=None,
                   help="eval resize of the short side (default: the export's image size x 256/224)")
    p.add_argument("--crop", type=positive_int, default=None,
                   help="eval centre crop (default: the export's image size); at most the resize")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--workers", type=nonnegative_int, default=0)


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

"""The `sslpipe` command: one module per subcommand, each a thin `add(sub)` (its arguments) and `run(args)` (parse,
then call the library). Library code is imported inside `run`, so `sslpipe --help` is instant and one stage's
dependencies never slow another's start."""
from __future__ import annotations

import argparse
import sys

from sslpipe.cli import (
    bench,
    check,
    curate,
    demo,
    embed,
    eval_seg,
    export,
    finetune,
    importing,
    knn,
    linear,
    linear_seg,
    onnx,
    predict,
    qscore,
    report,
    search,
    shards,
    show,
    train,
)

COMMANDS = {"shards": shards, "train": train, "export": export, "import": importing, "onnx": onnx, "check": check,
            "knn": knn, "linear": linear, "linear-seg": linear_seg, "qscore": qscore, "finetune": finetune,
            "predict": predict, "eval-seg": eval_seg, "demo": demo, "show": show, "report": report, "embed": embed,
            "search": search, "curate": curate, "bench": bench}
_SHARD_ERROR = "sslpipe.data.stream.ShardReadError: "


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sslpipe",
        description="Self-supervised pretraining for vision: shards -> train (DINOv2, iBOT, DINO, SimCLR) -> export "
                    "-> kNN / linear / fine-tuning.",
        epilog="Start with `sslpipe demo`; each stage's --help lists its options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add(sub)
    return parser


def _refuse_repeated_overrides(overrides: list[str]) -> None:
    """A key set twice on one command line is refused (the last one would win without a word, e.g. a shard pattern
    split into one `data.train=` per shard by a shell)."""
    seen: dict[str, str] = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in seen:
            raise ValueError(f"{key} is given twice on the command line ('{seen[key]}', then '{item}'): keep one")
        inside = next((earlier for k, earlier in seen.items() if k.startswith(key + ".")), None)
        if inside is not None:  # `a.b=1 'a={...}'`: the whole section replaces what was set inside it
            raise ValueError(f"'{item}' replaces the whole {key} section after '{inside}' set a key inside it: give "
                             "the section first, or put the key into it")
        seen[key] = item


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `key=value` overrides may come before or after options (`train R.yaml --resume auto a.b=1`); argparse
    # stops filling a `*` positional at the first option, so stragglers are collected here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        _refuse_repeated_overrides(getattr(args, "overrides", []))
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
            ValueError) as err:
        # Errors we raise on bad input carry the file/key and the fix; a traceback would only hide them. The OS's
        # own (a folder given for a file, a file for a folder, no permission) name the path, which is the fix.
        print(f"sslpipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from sslpipe.data.stream import ShardReadError
        from sslpipe.errors import RunStopped

        if isinstance(err, RunStopped):
            print(f"sslpipe {args.command}: error: {err}", file=sys.stderr)
            return 1
        if not isinstance(err, ShardReadError):
            raise
        # Raised in a loader worker, it arrives with the worker's traceback in its text: its own line is the last.
        print(f"sslpipe {args.command}: error: {str(err).strip().splitlines()[-1].removeprefix(_SHARD_ERROR)}",
              file=sys.stderr)
        return 1
    except OSError as err:
        from sslpipe.errors import WriteFailed

        if not isinstance(err, WriteFailed):
            raise
        # A full or failing disk: the message names the file, what was removed and how to continue.
        print(f"sslpipe {args.command}: error: {err}", file=sys.stderr)
        return 1

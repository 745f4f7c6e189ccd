"""`sslpipe import`: an official DINO / iBOT / DINOv2 / DINOv3 / MAE checkpoint or a timm state dict as an export
folder."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import positive_int


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="an official DINO / iBOT / DINOv2 / DINOv3 / MAE checkpoint or a timm state dict "
                                      "as an export folder (model.safetensors + config.json), for every probe and "
                                      "recipe")
    p.add_argument("source", help="a .pth/.pt/.bin checkpoint (read with torch.load(weights_only=True)), a "
                                  ".safetensors file, an export folder or a Hugging Face folder (timm's, "
                                  "transformers' DINOv2)")
    p.add_argument("out", help="output export folder")
    p.add_argument("--format", choices=["dino", "ibot", "dinov2", "dinov3", "mae", "timm", "safetensors"],
                   default=None, help="the checkpoint's layout (default: detected from the keys)")
    p.add_argument("--which", choices=["teacher", "student"], default=None,
                   help="training checkpoints with both networks (DINO, iBOT, DINOv2, DINOv3): default the teacher")
    p.add_argument("--arch", default=None,
                   help="timm architecture whose defaults describe the weights (default: read from the shapes)")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="input size of the export (default: the checkpoint's position grid x patch size, else 224); "
                        "another grid resizes the position embedding by the source's official rule")
    p.add_argument("--with-heads", action="store_true",
                   help="DINO / iBOT / DINOv2 / DINOv3 training checkpoints: also keep the projection heads "
                        "(heads.safetensors), to continue the official pretraining with `model.init_from`")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), default=None,
                   help="the per-channel mean the weights were trained with, recorded in config.json (default: the "
                        "config.json beside the weights, else ImageNet's, assumed and said); with --std")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), default=None,
                   help="the per-channel standard deviation the weights were trained with; with --mean")


def run(args: argparse.Namespace) -> int:
    from sslpipe.weights.importing import import_checkpoint

    check_out(args.out, "OUT", folder=True)
    report = import_checkpoint(args.source, args.out, fmt=args.format, which=args.which, arch=args.arch,
                               img_size=args.img_size, with_heads=args.with_heads, mean=args.mean, std=args.std)
    print("\n".join(report.lines()))
    return 0

"""`sslpipe export`: a run's backbone as model.safetensors + config.json (loads in timm), optionally model.onnx."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's backbone as model.safetensors + config.json (loads in timm)")
    p.add_argument("run", help="a run directory")
    p.add_argument("--which", choices=["teacher", "student"], default=None,
                   help="default: the teacher when the run has one (DINO, iBOT), else the student (SimCLR)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the newest)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export/WHICH); a non-empty folder that "
                                               "holds no sslpipe export is refused, unless --force")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out that holds no sslpipe export, replacing its model.safetensors, "
                        "config.json, README.md (and heads.safetensors with --with-heads); its other files stay")
    p.add_argument("--with-heads", action="store_true",
                   help="also keep the projection heads (heads.safetensors): `model.init_from` then continues the "
                        "run's pretraining with them (DINO, iBOT, DINOv2)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (opset 18, dynamic batch, height and width; `sslpipe onnx EXPORT` "
                        "converts an existing export folder)")


def run(args: argparse.Namespace) -> int:
    from sslpipe.weights.onnx import export_onnx, require_onnx
    from sslpipe.weights.run_export import export_run

    check_out(args.out, "--out", folder=True)
    if args.onnx:
        require_onnx()  # before the export, not after it
    out = export_run(args.run, which=args.which, out=args.out, checkpoint=args.checkpoint,
                     with_heads=args.with_heads, force=args.force)
    print(f"exported to {out}")
    if args.onnx:
        print("\n".join(export_onnx(out).lines()))
    return 0

"""`sslpipe onnx EXPORT`: an export folder as model.onnx (dynamic batch, height and width), checked with onnxruntime."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("onnx", help="an export folder as model.onnx with dynamic batch, height and width, checked "
                                    "against torch with onnxruntime (needs `pip install 'sslpipe[onnx]'`)")
    p.add_argument("export", help="an export folder (sslpipe export / sslpipe import)")
    p.add_argument("--out", default=None, help="the .onnx file (default: EXPORT/model.onnx)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 18 or more (default: 18)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest abs difference onnxruntime vs torch accepted at the two checked sizes")


def run(args: argparse.Namespace) -> int:
    from sslpipe.weights.onnx import OPSET, export_onnx

    check_out(args.out, "--out", example="model.onnx")
    report = export_onnx(args.export, args.out, opset=args.opset or OPSET, atol=args.atol)
    print("\n".join(report.lines()))
    return 0

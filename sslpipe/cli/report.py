"""`sslpipe report`: a static HTML page of one or more runs."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a run's curves, health, evaluations, pictures and config as a static HTML "
                                      "page (no server, no network); several runs on the same axes")
    p.add_argument("runs", nargs="+", help="run directories (metrics.jsonl + config.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/report, or RUN_A/report-compare)")


def run(args: argparse.Namespace) -> int:
    from sslpipe.viz.report import write_report

    check_out(args.out, "--out", folder=True)
    print(f"wrote {write_report(args.runs, args.out)}")
    return 0

"""`sslpipe check`: a run's checkpoints and exports against their sha256s."""
from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="verify a run's checkpoints and exports against their sha256s (a table; exit "
                                     "status 1 when any is bad)")
    p.add_argument("run", help="a run directory")


def run(args: argparse.Namespace) -> int:
    from sslpipe.weights.verify import check_run, format_check

    rows = check_run(args.run)
    print(format_check(rows))
    return 1 if any(r.status == "bad" for r in rows) else 0

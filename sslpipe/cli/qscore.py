"""`sslpipe qscore`: which label-free metrics (Q-score v1/v2, sparsity, L1, ...) flag the samples kNN gets wrong."""
from __future__ import annotations

import argparse
from pathlib import Path

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import (
    PercentileBand,
    add_probe_args,
    feature_spec,
    fraction_or_none,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
    probe_data,
)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qscore", help="Q-score report: which label-free metrics flag the samples kNN gets wrong")
    add_probe_args(p)
    p.add_argument("--k", type=positive_int, default=20, help="kNN neighbours whose predictions define right/wrong")
    p.add_argument("--temperature", type=positive_float, default=0.07)
    p.add_argument("--eta", type=float, default=1e-3, help="soft-sparsity threshold")
    p.add_argument("--eps", type=positive_float, default=4.0,
                   help="v2: highly activating = h > mean + eps * std (with --v2-coverage: the highest eps tried)")
    p.add_argument("--percentiles", type=float, nargs=2, default=[50.0, 95.0], metavar=("LOW", "HIGH"),
                   action=PercentileBand,
                   help="v2: band of the non-zero activation rates that counts as discriminative")
    p.add_argument("--no-l2-normalize", action="store_true", help="v1 metrics on raw features (default: h/||h||_2)")
    p.add_argument("--sparsity-abs", action="store_true", help="sparsity counts |h| < eta instead of h < eta")
    p.add_argument("--rates-from", choices=["val", "train"], default="val",
                   help="v2: split whose activation rates select the discriminative features")
    p.add_argument("--v2-coverage", type=fraction_or_none, default=0.5,
                   help="v2: lower eps (from --eps, in steps of 0.25) until this share of samples has a selected "
                        "feature; 'none' keeps --eps as given")
    p.add_argument("--v2-raw", action="store_true",
                   help="v2: Q as the raw excess h - mean (the published form) instead of in units of the sample's std")
    p.add_argument("--bootstrap", type=nonnegative_int, default=1000,
                   help="bootstrap resamples for the AUROC/AUPRC intervals (0: none)")
    p.add_argument("--ci", type=open_fraction, default=0.95, help="confidence level of the intervals (0.95 = 95%%)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--png", default=None, help="histogram PNG (default: next to --out, same name .png)")
    p.add_argument("--cache", default=None, help="folder to cache extracted features in")
    p.add_argument("--log-with", choices=["wandb", "tensorboard"], default=None,
                   help="also log the AUROC/AUPRC values to this tracker")


def run(args: argparse.Namespace) -> int:
    from sslpipe.engine.tracking import command_tracker
    from sslpipe.eval.qscore_report import (
        QScoreSettings,
        format_qscore_report,
        qscore_report,
    )

    check_out(args.out, "--out", example="qscore.json")
    check_out(args.png, "--png", example="qscore.png")
    settings = QScoreSettings(
        k=args.k, T=args.temperature, eta=args.eta, eps=args.eps, percentiles=args.percentiles,
        l2_normalize=not args.no_l2_normalize, sparsity_abs=args.sparsity_abs, rates_from=args.rates_from,
        v2_coverage=args.v2_coverage,
        v2_standardize=not args.v2_raw, n_boot=args.bootstrap, ci=args.ci, seed=args.seed)
    log_dir = Path(args.out).parent if args.out else Path("runs/qscore")
    with command_tracker(args.log_with, "sslpipe-qscore", log_dir, vars(args)) as tracker:
        result = qscore_report(args.backbone, feature_spec(args, batch_size=args.batch_size), probe_data(args),
                               settings, cache_dir=args.cache, out_json=args.out, out_png=args.png, tracker=tracker)
    print(format_qscore_report(result, args.ci))
    return 0

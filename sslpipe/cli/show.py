"""`sslpipe show`: what a backbone sees (attention maps, patch PCA, neighbours, an embedding map), one PNG each."""
from __future__ import annotations

import argparse

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import feature_spec, nonnegative_int, positive_int


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="what a backbone sees: attention maps, patch PCA, nearest neighbours and an "
                                    "embedding map of a few images, one PNG each")
    p.add_argument("backbone", help="an export folder (`sslpipe export`)")
    p.add_argument("--data", default=None, help="shards: the first -n val images are shown, neighbours come from "
                                                "the train split, the embedding map from the val split")
    p.add_argument("--images", nargs="+", default=[], help="image files to show instead of the first val images")
    p.add_argument("--out", required=True, help="folder for attention.png, pca.png, neighbours.png, embedding.png")
    p.add_argument("-n", "--num-images", type=positive_int, default=4, help="val images to show (with --data)")
    p.add_argument("--k", type=positive_int, default=5, help="neighbours per image")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--max-train", type=nonnegative_int, default=10000,
                   help="search the neighbours among the first N train images (0: all)")
    p.add_argument("--max-val", type=nonnegative_int, default=2000, help="map the first N val images (0: all)")
    p.add_argument("--resize", type=positive_int, default=None,
                   help="eval resize (default: the export's image size x 256/224)")
    p.add_argument("--crop", type=positive_int, default=None,
                   help="eval centre crop (default: the export's image size)")
    p.add_argument("--embedding", choices=["tsne", "umap"], default="tsne",
                   help="t-SNE (scikit-learn) or UMAP (needs umap-learn)")
    p.add_argument("--log-with", choices=["wandb"], default=None, help="also log the PNGs to this tracker")


def run(args: argparse.Namespace) -> int:
    from sslpipe.engine.tracking import command_tracker
    from sslpipe.eval.spec import ProbeData
    from sslpipe.viz.show import show

    check_out(args.out, "--out", folder=True)
    data = None
    if args.data:
        data = ProbeData(args.data, args.data, args.train_split, args.val_split, args.max_train or None,
                         args.max_val or None)
    with command_tracker(args.log_with, "sslpipe-show", args.out, vars(args)) as accelerator:
        show(args.backbone, args.out, feature_spec(args), data=data, images=args.images, n=args.num_images,
             k=args.k, embedding=args.embedding,
             tracker=accelerator.get_tracker(args.log_with) if accelerator else None)
    return 0

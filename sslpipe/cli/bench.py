"""`sslpipe bench`: benchmarks, each against a reference run side by side (loader, kNN, iBOT step, trainer step,
the step fed by the loader, curation, remote shards)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sslpipe.cli.outputs import check_out
from sslpipe.cli.probes import nonnegative_int, positive_float, positive_int


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks, each against a reference run side by side")
    which = p.add_subparsers(dest="bench", required=True)
    loader = which.add_parser("loader", help="shard stream (fast / torchvision crops) vs ImageFolder vs ceiling")
    loader.add_argument("shards", nargs="?", default=None,
                        help="shard directory with manifest.json (default with --photos: runs/bench_photos)")
    loader.add_argument("--photos", type=positive_int, default=None, metavar="N",
                        help="first write N 500x375 JPEG photographs (from scikit-image's bundled images) as shards")
    loader.add_argument("--recipe", default="recipes/demo_ibot.yaml", help="takes the multi-crop settings from it")
    loader.add_argument("--backend", choices=["fast", "torchvision", "device", "both", "all"], default="both",
                        help="crop backends to time (crops.backend); both = fast + torchvision, all = + device")
    loader.add_argument("--device", default=None, help="where the device backend crops (default: cuda if present)")
    loader.add_argument("--batch-size", type=positive_int, default=64)
    loader.add_argument("--workers", type=nonnegative_int, default=2)
    loader.add_argument("--max-images", type=positive_int, default=4096)
    loader.add_argument("--rounds", type=positive_int, default=2,
                        help="alternating rounds; the best of each path counts")
    loader.add_argument("--max-seconds", type=positive_float, default=30.0,
                        help="time bound of the single-core (one thread) ceiling")
    knn = which.add_parser("knn", help="faiss vs torch matmul+topk vs scikit-learn kNN on the same features")
    knn.add_argument("--n-train", type=positive_int, default=50000)
    knn.add_argument("--n-test", type=positive_int, default=10000)
    knn.add_argument("--dim", type=positive_int, default=384)
    knn.add_argument("--k", type=positive_int, default=20)
    ibot = which.add_parser("ibot-step", help="our iBOT training step vs one built from lightly's blocks")
    ibot.add_argument("--batch-size", type=positive_int, default=64)
    ibot.add_argument("--steps", type=positive_int, default=10)
    step = which.add_parser("step", help="the trainer's step of a recipe vs the bare network: time, FLOPs, MFU")
    step.add_argument("--recipe", default="recipes/demo_ibot.yaml")
    step.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    step.add_argument("--batch-size", type=positive_int, default=None, help="default: the recipe's data.batch_size")
    step.add_argument("--steps", type=positive_int, default=10)
    step.add_argument("--warmup", type=nonnegative_int, default=3)
    step.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    step.add_argument("--peak-tflops", type=positive_float, default=None,
                      help="device peak for MFU at the step's precision (default: a table of known GPUs per precision)")
    step.add_argument("--packing", action="store_true",
                      help="DINO/iBOT/DINOv2/DINOv3: time the step with the crops packed and per size, side by side")
    step.add_argument("--compile", action="store_true",
                      help="DINO/iBOT/DINOv2/DINOv3: time the step eager, with each block compiled and (DINOv2, "
                           "DINOv3) compiled whole, side by side")
    step.add_argument("overrides", nargs="*", help="key.sub=value overrides for the recipe")
    loaded = which.add_parser("loaded-step", help="the trainer's step fed by the loader from shards vs on a "
                                                 "synthetic batch: is the loader the bottleneck?")
    loaded.add_argument("shards", nargs="?", default=None,
                        help="shard directory (default with --photos: runs/bench_photos)")
    loaded.add_argument("--photos", type=positive_int, default=None, metavar="N",
                        help="first write N 500x375 JPEG photographs (from scikit-image's bundled images) as shards")
    loaded.add_argument("--recipe", default="recipes/demo_ibot.yaml")
    loaded.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    loaded.add_argument("--batch-size", type=positive_int, default=None, help="default: the recipe's data.batch_size")
    loaded.add_argument("--steps", type=positive_int, default=50)
    loaded.add_argument("--warmup", type=nonnegative_int, default=5,
                        help="the fed side warms up for at least 2 x workers + 2")
    loaded.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    loaded.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.num_workers=16 "
                                                     "crops.backend=device")
    curate = which.add_parser("curate", help="faiss k-means vs scikit-learn MiniBatchKMeans; IVF vs exact search")
    curate.add_argument("--n", type=positive_int, default=1_000_000, help="synthetic features (rows)")
    curate.add_argument("--dim", type=positive_int, default=384)
    curate.add_argument("--k", type=positive_int, default=None,
                        help="clusters (default: curate's level-1 count, N / 100)")
    curate.add_argument("--iters", type=positive_int, default=20,
                        help="k-means passes over the data, both (faiss: over its training sample, all rows when k "
                             ">= N / 256)")
    curate.add_argument("--queries", type=positive_int, default=1000, help="held-out queries of the search comparison")
    remote = which.add_parser("remote", help="shards over HTTP (a local server) vs on disk; descriptors before/after")
    remote.add_argument("shards", nargs="?", default=None, help="a shard set (default: --photos N made in a temp dir)")
    remote.add_argument("--photos", type=positive_int, default=1024, metavar="N",
                        help="500x375 JPEG shards when no shards")
    remote.add_argument("--processes", type=positive_int, default=2)
    remote.add_argument("--workers", type=nonnegative_int, default=2)
    remote.add_argument("--batch-size", type=positive_int, default=64)
    remote.add_argument("--seconds", type=positive_float, default=60.0, help="reading time of each side")
    for q in (loader, knn, ibot, step, loaded, curate, remote):
        q.add_argument("--out", default=None, help="also write the result as JSON here")


def _refuse_missing_cuda(device: str | None) -> None:
    """`--device cuda` on a machine without CUDA: one line, not torch's traceback from the first tensor moved."""
    import torch

    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch "
                         f"{torch.__version__}, no usable GPU or driver); use --device cpu, or leave --device out")


def run(args: argparse.Namespace) -> int:

    check_out(args.out, "--out")
    _refuse_missing_cuda(getattr(args, "device", None))
    if args.bench == "loader":
        from sslpipe.bench.loader import BACKEND_SETS, run_loader_bench_from_recipe

        result = run_loader_bench_from_recipe(
            args.shards, args.recipe, backends=BACKEND_SETS.get(args.backend, (args.backend,)),
            batch_size=args.batch_size, num_workers=args.workers, max_images=args.max_images, rounds=args.rounds,
            max_seconds=args.max_seconds, device=args.device, photos=args.photos)
    elif args.bench == "knn":
        from sslpipe.bench.knn import run_knn_bench

        result = run_knn_bench(n_train=args.n_train, n_test=args.n_test, dim=args.dim, k=args.k)
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
    elif args.bench == "remote":
        import tempfile

        from sslpipe.bench.photos import make_photo_shards
        from sslpipe.bench.remote import run_remote_bench

        with tempfile.TemporaryDirectory() as tmp:
            # enough shards for every worker of every process (4 each)
            per_shard = max(1, args.photos // (4 * args.processes * args.workers))
            shards = args.shards or make_photo_shards(Path(tmp) / "photos", args.photos, samples_per_shard=per_shard)
            result = run_remote_bench(shards, processes=args.processes, workers=args.workers,
                                      batch_size=args.batch_size, seconds=args.seconds)
        print(result["table"])
    elif args.bench == "loaded-step":
        from sslpipe.bench.loaded_step import run_loaded_step_bench

        if args.shards is not None and "=" in args.shards and not Path(args.shards).exists():
            args.overrides, args.shards = [args.shards, *args.overrides], None  # an override, not a folder
        result = run_loaded_step_bench(args.recipe, args.shards, device=args.device, batch_size=args.batch_size,
                                       steps=args.steps, warmup=args.warmup, mixed_precision=args.mixed_precision,
                                       overrides=args.overrides, photos=args.photos)
        print(result["table"])
    elif args.bench == "curate":
        from sslpipe.bench.curate import run_curate_bench

        result = run_curate_bench(n=args.n, dim=args.dim, k=args.k, niter=args.iters, queries=args.queries)
        print(result["table"])
    elif args.bench == "step":
        from sslpipe.bench.step import main_print, run_step_bench

        if args.packing and args.compile:
            raise ValueError("--packing and --compile are two comparisons: choose one, and set the other as an "
                             "override (e.g. --compile dinov2.pack_crops=true)")
        if args.packing or args.compile:
            from sslpipe.bench.step import run_compile_bench, run_packing_bench

            side_by_side = run_packing_bench if args.packing else run_compile_bench
            result = side_by_side(args.recipe, device=args.device, batch_size=args.batch_size, steps=args.steps,
                                  warmup=args.warmup, mixed_precision=args.mixed_precision,
                                  overrides=args.overrides, peak=args.peak_tflops)
            print(result["table"])
        else:
            result = run_step_bench(args.recipe, device=args.device, batch_size=args.batch_size, steps=args.steps,
                                    warmup=args.warmup, mixed_precision=args.mixed_precision,
                                    overrides=args.overrides, peak=args.peak_tflops)
            main_print(result)
    else:
        from sslpipe.bench.ibot_step import run_ibot_step_bench

        result = run_ibot_step_bench(batch_size=args.batch_size, steps=args.steps)
        print(json.dumps(result, indent=2))
        print(f"sslpipe iBOT step {result['sslpipe_ms']:.1f} ms, lightly-assembled {result['lightly_ms']:.1f} ms: "
              f"ratio {result['ratio_sslpipe_over_lightly']:.2f} (lower is faster); FLOPs per step "
              f"{result['gflop_sslpipe']:.3f} vs {result['gflop_lightly']:.3f} GFLOP (lightly / sslpipe "
              f"{result['flop_ratio_lightly_over_sslpipe']:.2f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0

"""`sslpipe bench step`: the trainer's step of a multi-crop recipe (iBOT, DINO, DINOv2) against the bare network
doing the same work, side by side in one process.

"Ours" is exactly what the trainer runs per iteration (`sslpipe.engine.trainer.train_step`): the batch arrives as the
loader hands it over (uint8 crops in host memory, pinned on CUDA), is copied and normalised on the device, the
student runs on all crops and the teacher on the global ones, heads, loss, centre update, backward, per-tensor
clipping, AdamW, EMA. "Bare" is the recipe's timm backbone alone: student forward+backward on every crop, teacher
forward on the global crops, AdamW (fused on CUDA), with its float batch already on the device and a mean as the
loss -- the floor any trainer of this network pays. Both use the same crops, batch size, autocast precision and are
timed interleaved (one step of each in turn) to cancel drift; the median step is reported.

FLOPs per image come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention, forward
and backward; `sslpipe.bench.flops`) over one step. MFU = achieved FLOP/s / the device's dense peak at the precision
the step's matmuls run in: bf16 or fp16 under autocast, else tf32 where torch allows it for matmuls, else fp32
(`--peak-tflops`, or a table of known GPUs per precision); on a CPU only the achieved TFLOP/s is given.
"""
from __future__ import annotations

import copy
import json
import random
import re
import resource
import statistics
from typing import Any, Callable, Sequence

import torch

from sslpipe.bench.flops import count_flops
from sslpipe.bench.timing import time_interleaved


def _peaks(half: float, tf32: float, fp32: float) -> dict[str, float]:
    """One card's row: bf16 and fp16 share the tensor-core peak."""
    return {"bf16": half, "fp16": half, "tf32": tf32, "fp32": fp32}


# Dense peaks (TFLOP/s, without 2:4 sparsity) from the vendors' data sheets, per precision of the matmuls. A card is
# found by the first name that occurs in the device name as a whole word: "H100 PCIe" and "H100 NVL" come before
# "H100" (the SXM card, reported as e.g. "NVIDIA H100 80GB HBM3"), and "A10" does not match "A100" or "A10G".
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", _peaks(756.0, 378.0, 51.2)),
    ("H100 NVL", _peaks(835.0, 417.5, 60.0)),
    ("H200 NVL", _peaks(835.0, 417.5, 60.0)),
    ("H100", _peaks(989.0, 494.5, 67.0)),
    ("H200", _peaks(989.0, 494.5, 67.0)),
    ("A100", _peaks(312.0, 156.0, 19.5)),
    ("L40S", _peaks(362.0, 183.0, 91.6)),
    ("L4", _peaks(121.0, 60.0, 30.3)),
    ("A10", _peaks(125.0, 62.5, 31.2)),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of the card called `device_name` (as `torch.cuda.get_device_name` gives it) for matmuls in
    `precision` (bf16, fp16, tf32, fp32); None for a device not in the table."""
    for card, peaks in PEAK_TFLOPS:
        if re.search(rf"(?<!\w){re.escape(card)}(?!\w)", device_name):
            return peaks.get(precision)
    return None


def matmul_precision(mixed_precision: str, device: torch.device) -> str:
    """The precision the step's matmuls run in: the autocast dtype, else tf32 where torch allows it on CUDA."""
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"


def device_name(device: torch.device) -> str:
    """The name the peak table is matched against ("cpu" off CUDA)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synthetic_batch(cfg: Any, recipe: Any, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """A batch in the loader's format: uint8 crops crop-major, the recipe's own masks (iBOT's per-crop block masks,
    DINOv2's batch-level ones with their indices; `MultiCropRecipe.mask_fields`), labels."""
    g = torch.Generator().manual_seed(seed)
    c = cfg.crops

    def crops(n: int, size: int) -> torch.Tensor | None:
        return torch.randint(0, 256, (n * batch_size, 3, size, size), generator=g, dtype=torch.uint8) if n else None

    random.seed(seed)
    start = recipe.section.masking.pred_start_epoch if recipe.uses_masks else 0  # iBOT's masks begin there
    masks = recipe.mask_fields(c.n_global * batch_size, epoch=max(start, 0))
    return {"global_crops": crops(c.n_global, c.global_size), "local_crops": crops(c.n_local, c.local_size),
            **masks, "labels": torch.zeros(batch_size, dtype=torch.long)}


def _bare_step(cfg: Any, accelerator: Any, batch: dict[str, Any]) -> Callable[[], Any]:
    from sslpipe.data.fast_views import normalize_crops
    from sslpipe.models.backbones import create_backbone

    m, c = cfg.model, cfg.crops
    device = accelerator.device
    student = create_backbone(m.arch, img_size=c.global_size, patch_size=m.patch_size,
                              drop_path_rate=m.drop_path_rate, **m.kwargs).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, **({"fused": True} if device.type == "cuda" else {}))
    views = [normalize_crops(batch[k].to(device), c.mean, c.std) for k in ("global_crops", "local_crops")
             if batch[k] is not None]

    def step() -> None:
        with accelerator.autocast():  # the trainer's precision, exactly
            with torch.no_grad():
                teacher.forward_features(views[0])
            loss = sum(student.forward_features(v).float().mean() for v in views)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def prepared_step(recipe_path: str, *, device: str | None = None, batch_size: int | None = None,
                  mixed_precision: str | None = None, overrides: Sequence[str] = ()) -> tuple[Any, ...]:
    """What `train_step` needs, built as the trainer builds it on one process: (cfg, device, accelerator, recipe,
    optimizer, sched), the schedule taken mid-run (lr and momentum non-trivial, last layer no longer frozen)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from sslpipe.engine.optim import build_optimizer
    from sslpipe.engine.schedules import Schedules
    from sslpipe.recipes import get_recipe, load_config
    from sslpipe.recipes.multicrop import MultiCropRecipe

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extra = [f"data.batch_size={batch_size}"] if batch_size else []
    if mixed_precision:
        extra.append(f"train.mixed_precision={mixed_precision}")
    cfg = load_config(recipe_path, [*overrides, *extra])
    recipe_cls = get_recipe(cfg.method)
    if not issubclass(recipe_cls, MultiCropRecipe):
        raise ValueError(f"`sslpipe bench step` times multi-crop recipes (ibot, dino, dinov2); {recipe_path} is "
                         f"method {cfg.method!r}")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision=cfg.train.mixed_precision or "no")
    torch.manual_seed(cfg.seed)
    recipe = recipe_cls(cfg)
    recipe.build(accelerator)
    recipe.student.to(accelerator.device)
    optimizer = build_optimizer(cfg, recipe.param_groups())
    recipe.student, optimizer = accelerator.prepare(recipe.student, optimizer)
    sched = Schedules(cfg, steps_per_epoch=1000, recipe=recipe.schedule)(1000 * cfg.train.epochs // 2)
    return cfg, dev, accelerator, recipe, optimizer, sched


def run_step_bench(recipe_path: str, *, device: str | None = None, batch_size: int | None = None, steps: int = 10,
                   warmup: int = 3, mixed_precision: str | None = None, overrides: Sequence[str] = (),
                   peak: float | None = None) -> dict[str, Any]:
    """Time the trainer's step and the bare network's on the recipe's crops; see the module docstring."""
    from sslpipe.engine.trainer import train_step

    cfg, dev, accelerator, recipe, optimizer, sched = prepared_step(
        recipe_path, device=device, batch_size=batch_size, mixed_precision=mixed_precision, overrides=overrides)
    B = cfg.data.batch_size
    batch = synthetic_batch(cfg, recipe, B, seed=cfg.seed)
    if dev.type == "cuda":
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def ours() -> None:
        train_step(accelerator, recipe, optimizer, [batch], sched, cfg)

    bare = _bare_step(cfg, accelerator, batch)
    flops_ours, flops_bare = count_flops(ours), count_flops(bare)
    ours_times, bare_times, _, _ = time_interleaved(ours, bare, warmup, steps, dev)
    ours_s, bare_s = statistics.median(ours_times), statistics.median(bare_times)
    name, precision = device_name(dev), matmul_precision(accelerator.mixed_precision, dev)
    peak = peak if peak is not None else peak_tflops(name, precision)
    result: dict[str, Any] = {
        "recipe": recipe_path, "device": str(dev), "device_name": name, "threads": torch.get_num_threads(),
        "batch_size": B,
        "crops": f"{cfg.crops.n_global}x{cfg.crops.global_size} + {cfg.crops.n_local}x{cfg.crops.local_size}",
        "mixed_precision": accelerator.mixed_precision, "steps": steps,
        "ours_ms": 1000 * ours_s, "bare_ms": 1000 * bare_s, "ratio_ours_over_bare": ours_s / bare_s,
        "ours_img_s": B / ours_s, "bare_img_s": B / bare_s,
        "gflop_per_image_ours": flops_ours / B / 1e9, "gflop_per_image_bare": flops_bare / B / 1e9,
        "tflops_ours": flops_ours / ours_s / 1e12, "tflops_bare": flops_bare / bare_s / 1e12,
        "peak_tflops": peak, "peak_precision": precision,
        "mfu_ours": flops_ours / ours_s / 1e12 / peak if peak else None,
        "mfu_bare": flops_bare / bare_s / 1e12 / peak if peak else None,
    }
    if dev.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        result["process_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["table"] = format_table(result)
    return result


def _side_by_side(recipe_path: str, flag: str, variants: dict[str, list[str]], overrides: Sequence[str],
                  **kwargs: Any) -> dict[str, Any]:
    """`run_step_bench` once per variant (its overrides after the caller's), one after the other, each beside the bare
    network; every later variant's step as a ratio to the first's (`<name>_over_<first>`). `flag` names the bench
    option in the refusal of a method without these settings."""
    from sslpipe.recipes import load_config

    method = load_config(recipe_path, list(overrides)).method
    if method not in ("dino", "ibot", "dinov2", "dinov3"):
        raise ValueError(f"{flag}: {recipe_path} is method {method!r}; it exists for dino, ibot, dinov2 and dinov3")
    variants = {name: [o.replace("METHOD", method) for o in extra] for name, extra in variants.items()}
    runs = {name: run_step_bench(recipe_path, overrides=[*overrides, *extra], **kwargs)
            for name, extra in variants.items()}
    first = next(iter(runs))
    ratios = {f"{name}_over_{first}": runs[name]["ours_ms"] / runs[first]["ours_ms"] for name in list(runs)[1:]}
    table = "\n".join([*(f"{name} ({' '.join(variants[name])}):\n{run['table']}" for name, run in runs.items()),
                       ", ".join(f"{k.replace('_over_', ' / ')}: {v:.2f}x" for k, v in ratios.items())])
    return {**runs, **ratios, "table": table}


def run_packing_bench(recipe_path: str, *, overrides: Sequence[str] = (), **kwargs: Any) -> dict[str, Any]:
    """The student's crops per size and packed into one pass (`<method>.pack_crops`), side by side; the bare
    network's ratio in each shows the drift between the two runs."""
    return _side_by_side(recipe_path, "--packing", {"per_size": ["METHOD.pack_crops=false"],
                                                    "packed": ["METHOD.pack_crops=true"]}, overrides, **kwargs)


def run_compile_bench(recipe_path: str, *, overrides: Sequence[str] = (), **kwargs: Any) -> dict[str, Any]:
    """Eager, with each block compiled (`train.compile`) and, for DINOv2 and DINOv3, with the forwards and loss
    compiled as one graph (`train.compile_scope: step`), side by side. DINOv2's masks are padded to their bound in all
    three, so that only the compile differs. Compiling happens in the warm-up steps; the median step is reported."""
    from sslpipe.config.core import TrainConfig
    from sslpipe.recipes import load_config

    # a train.compile_backend override is the compiled sides' (the eager side reads none)
    backend = [o for o in overrides if o.startswith("train.compile_backend=")]
    overrides = [o for o in overrides if o not in backend]
    method = load_config(recipe_path, overrides).method
    static = ["METHOD.pad_masked_patches=true"] if method in ("dinov2", "dinov3") else []
    # the eager side reads no backend: the default, so that a recipe's own compile_backend is not refused there
    eager_backend = f"train.compile_backend={TrainConfig.model_fields['compile_backend'].default}"
    variants = {"eager": [*static, "train.compile=false", eager_backend],
                "blocks": [*static, "train.compile=true", *backend]}
    if static:
        variants["step"] = [*static, "train.compile=true", "train.compile_scope=step", *backend]
    return _side_by_side(recipe_path, "--compile", variants, overrides, **kwargs)


def format_table(r: dict[str, Any]) -> str:
    def mfu(v: float | None) -> str:
        return f"{100 * v:.1f}%" if v is not None else "n/a (no peak: --peak-tflops)"

    rows = [("", "ours (trainer step)", "bare network"),
            ("ms / step", f"{r['ours_ms']:.1f}", f"{r['bare_ms']:.1f}"),
            ("images / s", f"{r['ours_img_s']:.1f}", f"{r['bare_img_s']:.1f}"),
            ("GFLOP / image", f"{r['gflop_per_image_ours']:.2f}", f"{r['gflop_per_image_bare']:.2f}"),
            ("TFLOP/s achieved", f"{r['tflops_ours']:.3f}", f"{r['tflops_bare']:.3f}"),
            ("MFU", mfu(r["mfu_ours"]), mfu(r["mfu_bare"]))]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"{a:<{width}}  {b:>20}  {c:>20}" for a, b, c in rows]
    lines.append(f"ratio ours / bare: {r['ratio_ours_over_bare']:.2f}x  ({r['device_name']}, batch "
                 f"{r['batch_size']}, {r['crops']}, precision {r['mixed_precision']}; MFU against the "
                 f"{r['peak_precision']} peak: {r['peak_tflops'] or 'unknown'} TFLOP/s)")
    return "\n".join(lines)


def main_print(result: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
    print(result["table"])

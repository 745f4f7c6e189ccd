"""Weighted kNN classifier of DINO (eval_knn.py 142-182, docs/methods.md §2) on faiss.

Train and test features are L2-normalised (cosine similarity). For each test sample the top-k train neighbours
(largest inner product) vote: class score = sum over neighbours of that class of exp(sim / T). Top-1 and top-5
(top-5 only when there are >= 5 classes) are reported for every k; the search runs once with the largest k and is
sliced. faiss's exact `IndexFlatIP` does the search (moved to a GPU only when `faiss.get_num_gpus() > 0`);
`backend="torch"` is the brute-force matmul + topk reference, and the fallback (with a one-line notice) when faiss is
not installed (`pip install 'sslpipe[cpu]'` or `'sslpipe[gpu]'` brings it). The votes use `scatter_add_` over class
ids, which equals DINO's one-hot x weights sum without the (chunk, k, classes) one-hot tensor. Accuracies are
fractions in [0, 1] (DINO prints percentages).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from sslpipe.eval.spec import FeatureSpec, ProbeData

try:
    import faiss
except ImportError:  # installed without the cpu/gpu extra: the torch backend does the search
    faiss = None

FAISS_MISSING = ("note: faiss is not installed, so kNN uses the torch backend (same results); "
                 "install it with pip install 'sslpipe[cpu]' (or 'sslpipe[gpu]' on CUDA machines)")
DEFAULT_K = (10, 20, 100, 200)
DEFAULT_T = 0.07
_MEMORY_FRACTION = 0.25  # of the free host/GPU memory a search may use for its per-chunk buffers


class _FaissSearch:
    """Exact inner-product search; GPU index only when faiss sees a GPU (faiss-gpu raises otherwise)."""

    name = "faiss"

    def __init__(self, train: Tensor) -> None:
        data = np.ascontiguousarray(train.cpu().numpy(), dtype=np.float32)
        index = faiss.IndexFlatIP(data.shape[1])
        index.add(data)
        self.gpu = faiss.get_num_gpus() > 0
        if self.gpu:  # this process's GPU (each rank of a distributed probe searches on its own)
            self.resources = faiss.StandardGpuResources()
            gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
            index = faiss.index_cpu_to_gpu(self.resources, gpu, index)
        self.index = index

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        sims, idx = self.index.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)
        return torch.from_numpy(sims), torch.from_numpy(idx)


class _TorchSearch:
    """Brute force: (chunk, n_train) similarities by matmul, then topk. The reference for the faiss path."""

    name = "torch"

    def __init__(self, train: Tensor, device: torch.device) -> None:
        self.train = train.to(device)
        self.device = device

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        sims = queries.to(self.device) @ self.train.T
        top = sims.topk(k, dim=1, largest=True, sorted=True)
        return top.values.cpu(), top.indices.cpu()


def _free_bytes(device: torch.device, max_memory_mb: float | None) -> float:
    if max_memory_mb is not None:
        return max_memory_mb * 2**20
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] * _MEMORY_FRACTION
    return psutil.virtual_memory().available * _MEMORY_FRACTION


def check_temperature(T: float) -> None:
    """T = 0 divides by zero and T < 0 gives the farthest neighbours the largest votes: refused (before any
    feature is extracted)."""
    if not T > 0:
        raise ValueError(f"the kNN temperature must be > 0 (DINO: 0.07), got {T} (--temperature)")


def class_scores(sims: Tensor, neighbour_labels: Tensor, T: float, num_classes: int) -> Tensor:
    """DINO's vote: score[i, c] = sum_j [label_ij == c] * exp(sim_ij / T) over the k neighbours j of sample i."""
    weights = (sims.float() / T).exp()
    return torch.zeros(len(sims), num_classes).scatter_add_(1, neighbour_labels.long(), weights)


def auto_chunk_size(n_train: int, dim: int, kmax: int, num_classes: int, *, backend: str,
                    device: torch.device, max_memory_mb: float | None = None) -> int:
    """Queries per chunk so the per-chunk buffers fit: queries (dim), results (kmax sims + ids + labels), class
    scores, and for the torch backend the (chunk, n_train) similarity matrix (faiss tiles that internally)."""
    per_query = 4 * dim + 20 * kmax + 8 * num_classes
    if backend == "torch":
        per_query += 4 * n_train
    return max(1, int(_free_bytes(device, max_memory_mb) // per_query))


@torch.no_grad()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k_list: Sequence[int] = DEFAULT_K,
    T: float = DEFAULT_T,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    *,
    backend: str = "faiss",
    device: str | torch.device | None = None,
    max_memory_mb: float | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Weighted kNN accuracy for every k in `k_list`.

    Returns `{"k": {k: {"top1", "top5"?}}, "n_train", "n_test", "backend", "T", "num_classes", "chunk_size"}` and,
    with `return_predictions`, `"predictions": {k: LongTensor (n_test,)}` (top-1 class per test sample).
    """
    if backend not in ("faiss", "torch"):
        raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
    if backend == "faiss" and faiss is None:
        print(FAISS_MISSING, file=sys.stderr)
        backend = "torch"
    k_list = sorted({int(k) for k in k_list})
    n_train, n_test = len(train_feats), len(test_feats)
    if not k_list or k_list[0] < 1:
        raise ValueError(f"k_list must hold positive integers, got {k_list}")
    check_temperature(T)
    if k_list[-1] > n_train:
        raise ValueError(f"k={k_list[-1]} exceeds the {n_train} training samples: pass a smaller k list")
    train_labels = train_labels.long().cpu()
    test_labels = test_labels.long().cpu()
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("kNN needs labelled train and test samples (found label -1: shards without `cls`)")
    num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
    kmax = k_list[-1]
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    searcher = _FaissSearch(train) if backend == "faiss" else _TorchSearch(train, dev)
    if chunk_size is None:
        mem_device = dev if backend == "torch" or getattr(searcher, "gpu", False) else torch.device("cpu")
        chunk_size = auto_chunk_size(n_train, train.shape[1], kmax, num_classes, backend=backend,
                                     device=mem_device, max_memory_mb=max_memory_mb)
    chunk_size = max(1, min(int(chunk_size), n_test))

    top5 = num_classes >= 5
    correct = {k: [0, 0] for k in k_list}
    preds: dict[int, list[Tensor]] = {k: [] for k in k_list}
    for start in range(0, n_test, chunk_size):
        sims, idx = searcher.search(test[start:start + chunk_size], kmax)
        neighbour_labels = train_labels[idx]
        targets = test_labels[start:start + chunk_size].view(-1, 1)
        for k in k_list:
            scores = class_scores(sims[:, :k], neighbour_labels[:, :k], T, num_classes)
            ranked = scores.topk(min(5, num_classes), dim=1).indices
            hits = ranked.eq(targets)
            correct[k][0] += int(hits[:, 0].sum())
            if top5:
                correct[k][1] += int(hits.any(dim=1).sum())
            if return_predictions:
                preds[k].append(ranked[:, 0])

    result: dict[str, Any] = {
        "k": {k: {"top1": c1 / n_test, **({"top5": c5 / n_test} if top5 else {})} for k, (c1, c5) in correct.items()},
        "n_train": n_train, "n_test": n_test, "backend": searcher.name, "T": T, "num_classes": num_classes,
        "chunk_size": chunk_size,
    }
    if return_predictions:
        result["predictions"] = {k: torch.cat(p) for k, p in preds.items()}
    return result


def run_knn(
    backbone: str | Path | nn.Module,
    spec: FeatureSpec,
    data: ProbeData,
    *,
    k_list: Sequence[int] = DEFAULT_K,
    T: float = DEFAULT_T,
    backend: str = "faiss",
    cache_dir: str | Path | None = None,
    out_json: str | Path | None = None,
    tracker: Any = None,
    step: int | None = None,
    progress: bool = True,
    accelerator: Any = None,
) -> dict[str, Any]:
    """Extract train/val features of a backbone (an export folder or a module) as `spec` says and run the weighted
    kNN on `data` (the search runs on `spec.device` too).

    With an `accelerator` of several processes (the periodic probe of a distributed run) every process extracts its
    share of the shards and all receive the gathered features; each then runs the same search, so all return the
    same result without waiting on one another.

    Writes the result to `out_json` and logs `knn/top1_k{k}` (and top5) through `tracker.log(values, step=step)`
    (e.g. an accelerate Accelerator).
    """
    from sslpipe.eval.features import extract_train_val, prepare_backbone, report

    check_temperature(T)

    model, source = prepare_backbone(backbone, spec)
    train_x, train_y, test_x, test_y = extract_train_val(model, spec, data, cache_dir=cache_dir, progress=progress,
                                                         accelerator=accelerator)
    result = knn_classify(train_x, train_y, test_x, test_y, k_list, T, data.num_classes, backend=backend,
                          device=spec.device)
    result["backbone"] = source
    report(result, {f"knn/{m}_k{k}": v for k, acc in result["k"].items() for m, v in acc.items()}, out_json,
           tracker, step)
    return result


def knn_probe(module: nn.Module, spec: FeatureSpec, data: ProbeData, *, k_list: Sequence[int] = DEFAULT_K,
              T: float = DEFAULT_T, accelerator: Any = None, progress: bool = False) -> dict[str, float]:
    """The periodic kNN of a training run: `run_knn` of the module (the teacher backbone) on every process (with
    several, the extraction is shared out), returned as the metrics the trainer logs, `knn/top1_k{k}`."""
    result = run_knn(module, spec, data, k_list=k_list, T=T, progress=progress, accelerator=accelerator)
    return {f"knn/top1_k{k}": v["top1"] for k, v in result["k"].items()}

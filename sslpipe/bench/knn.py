"""kNN benchmark: faiss vs torch brute force vs scikit-learn on the same weighted-kNN task, in one process.

All three compute the same classifier (DINO's weighted vote, docs/methods.md §2): cosine similarity, top-k neighbours,
class score = sum of exp(sim / T). faiss and torch run through `knn_classify` (L2-normalise, search, vote);
scikit-learn runs `KNeighborsClassifier(metric="cosine", algorithm="brute")` with a callable weight
exp((1 - d) / T) on the cosine distance d = 1 - sim, i.e. the same vote. Times are wall-clock seconds of the whole
classification (index build / fit + search + vote); ratios > 1 mean faiss is faster.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier

from sslpipe.eval import knn as knn_module
from sslpipe.eval.knn import DEFAULT_T, knn_classify


def clustered_features(n: int, dim: int, num_classes: int, *, seed: int,
                       spread: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around random class centres (centre norm ~ `spread`, noise norm ~ 1); the default overlaps
    enough that kNN is not perfect (about 0.88 top-1 at 384-d, 10 classes, k=20)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(12345)) * spread / dim ** 0.5
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return centres[labels] + torch.randn(n, dim, generator=gen) / dim ** 0.5, labels


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_knn_bench(n_train: int = 50000, n_test: int = 10000, dim: int = 384, k: int = 20, num_classes: int = 10,
                  seed: int = 0, T: float = DEFAULT_T, device: str | None = None) -> dict[str, Any]:
    """Time the three kNN implementations on synthetic clustered features; check that their predictions agree."""
    faiss = knn_module.faiss
    if faiss is None:
        raise ValueError("`sslpipe bench knn` times faiss, which is not installed: "
                         "pip install 'sslpipe[cpu]' (or 'sslpipe[gpu]')")
    train_x, train_y = clustered_features(n_train, dim, num_classes, seed=seed)
    test_x, test_y = clustered_features(n_test, dim, num_classes, seed=seed + 1)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    common = dict(k_list=[k], T=T, num_classes=num_classes, device=dev, return_predictions=True)
    res_faiss, t_faiss = _timed(lambda: knn_classify(train_x, train_y, test_x, test_y, backend="faiss", **common))
    res_torch, t_torch = _timed(lambda: knn_classify(train_x, train_y, test_x, test_y, backend="torch", **common))

    def sklearn_predict() -> np.ndarray:
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                   weights=lambda d: np.exp((1.0 - d) / T))
        clf.fit(train_x.numpy(), train_y.numpy())
        return clf.predict(test_x.numpy())

    pred_sklearn, t_sklearn = _timed(sklearn_predict)
    pred_faiss, pred_torch = res_faiss["predictions"][k], res_torch["predictions"][k]
    pred_sklearn = torch.from_numpy(pred_sklearn).long()
    return {
        "n_train": n_train, "n_test": n_test, "dim": dim, "k": k, "num_classes": num_classes, "T": T,
        "faiss_gpu": faiss.get_num_gpus() > 0, "torch_device": str(dev), "torch_threads": torch.get_num_threads(),
        "faiss_s": t_faiss, "torch_s": t_torch, "sklearn_s": t_sklearn,
        "faiss_vs_torch": t_torch / t_faiss, "faiss_vs_sklearn": t_sklearn / t_faiss,
        "top1": {"faiss": res_faiss["k"][k]["top1"], "torch": res_torch["k"][k]["top1"],
                 "sklearn": float((pred_sklearn == test_y).float().mean())},
        "agree_faiss_torch": float((pred_faiss == pred_torch).float().mean()),
        "agree_faiss_sklearn": float((pred_faiss == pred_sklearn).float().mean()),
    }

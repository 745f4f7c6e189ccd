"""A 2-D map of the val split's features coloured by label: do the classes form clusters without being told?

t-SNE from scikit-learn (always installed); UMAP (`umap-learn`) when asked for and importable. The features are
L2-normalised first, so distances follow the kNN probe's cosine similarity.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from sslpipe.viz.figures import pyplot, save_figure

METHODS = ("tsne", "umap")


def embed_2d(features: Tensor, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates of the L2-normalised features by t-SNE (perplexity 30, PCA init) or UMAP."""
    x = F.normalize(features.float(), dim=1).numpy()
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max(1.0, (len(x) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ValueError("the embedding map `umap` needs umap-learn: pip install umap-learn (or use tsne)"
                             ) from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    raise ValueError(f"embedding map method must be one of {METHODS}, got {method!r}")


def draw_embedding(points: np.ndarray, labels: Tensor, class_names: Sequence[str], path: str | Path,
                   method: str = "tsne") -> Path:
    """Scatter of the 2-D points, one colour per class with its name in the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    labels = labels.numpy()
    cmap = plt.get_cmap("tab10" if len(set(labels.tolist())) <= 10 else "tab20")
    for i, c in enumerate(sorted(set(labels.tolist()))):
        name = class_names[c] if 0 <= c < len(class_names) else ("unlabelled" if c < 0 else str(c))
        sel = labels == c
        ax.scatter(points[sel, 0], points[sel, 1], s=6, color=cmap(i % cmap.N), label=f"{name} ({sel.sum()})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{'t-SNE' if method == 'tsne' else 'UMAP'} of {len(points)} val features, coloured by label")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, markerscale=2, frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)

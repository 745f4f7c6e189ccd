"""`sslpipe show`: what an exported backbone sees, as four PNGs for a few images.

attention.png (the last block's [CLS] attention per head and its 60%-mass masks; ViTs without a [CLS] token: the
attention each patch receives, averaged over the patch queries; CNNs: the feature-norm map), pca.png (DINOv2's patch
PCA), neighbours.png (each query beside its nearest train images under the kNN probe's features, searched among the
first `data.max_train` train images: with a cap they can differ from those `sslpipe knn` votes with, and the caption
says so) and embedding.png (t-SNE / UMAP of the val split coloured by label). The images are the first `n` of the
val split of `data`, or the `images` files; neighbours and the embedding map need `data` (train and val splits).
Everything goes through the probe's own `FeatureSpec` (`FeatureSpec.from_export`: the export's size, mean and std
unless resize/crop are given), so the features are those `sslpipe knn` measures.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from PIL import Image

from sslpipe.data.manifest import read_manifest
from sslpipe.data.stream import build_loader
from sslpipe.eval.features import default_device, extract_features, on_device, prepare_backbone
from sslpipe.viz.attention import draw_attention
from sslpipe.viz.embedding import draw_embedding, embed_2d
from sslpipe.viz.figures import display_image, read_rgb
from sslpipe.viz.neighbours import draw_neighbours, nearest
from sslpipe.viz.pca import draw_pca

if TYPE_CHECKING:
    from sslpipe.eval.spec import FeatureSpec, ProbeData


def _raw(sample: dict[str, Any]) -> tuple[Image.Image, int]:
    return sample["image"], int(sample["label"])


def read_samples(spec: str, split: str, indices: Sequence[int]) -> dict[int, tuple[Image.Image, int]]:
    """The (image, label) at each position of a split in stream order (the order feature extraction reads)."""
    wanted, found = set(indices), {}
    loader = build_loader(spec, split=split, sample_fn=_raw, collate_fn=list, batch_size=64, shuffle=False,
                          drop_last=False)
    position = 0
    for batch in loader:
        for sample in batch:
            if position in wanted:
                found[position] = sample
            position += 1
        if len(found) == len(wanted):
            break
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"split {split!r} of {spec} has {position} samples; position {missing[0]} was asked for")
    return found


def _class_names(data: str | None) -> list[str]:
    if data is None:
        return []
    try:
        return list(read_manifest(data).get("classes") or [])
    except (FileNotFoundError, ValueError):
        return []


def _name(label: int, names: Sequence[str]) -> str:
    """A label's class name (its number without a manifest list; nothing for unlabelled images)."""
    if label < 0:
        return ""
    return names[label] if label < len(names) else str(label)


def log_pictures(tracker: Any, paths: dict[str, Path]) -> None:
    """Send the PNGs to a tracker with accelerate's `log_images` (e.g. `accelerator.get_tracker("wandb")`)."""
    tracker.log_images({f"show/{name}": [Image.open(path).convert("RGB")] for name, path in paths.items()})


def show(export: str | Path, out: str | Path, spec: FeatureSpec, *, data: ProbeData | None = None,
         images: Sequence[str | Path] = (), n: int = 4, k: int = 5, embedding: str = "tsne", tracker: Any = None,
         progress: bool = True) -> dict[str, Path]:
    """Write attention.png, pca.png and, with `data`, neighbours.png and embedding.png into `out`; return
    {name: path}. The queries are `images` or the first `n` images of `data`'s val split; `data.max_train` /
    `data.max_val` bound the train features searched and the val features mapped."""
    if data is None and not images:
        raise ValueError("sslpipe show needs images: --data SHARDS (the first n val images) and/or --images FILES")
    say = print if progress else (lambda *_a, **_k: None)
    model, _ = prepare_backbone(export, spec)
    transform = spec.transform()
    names = _class_names(data.train if data is not None else None)
    if images:
        missing = [str(p) for p in images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
        queries = [(read_rgb(p), -1) for p in images]
    else:
        found = read_samples(data.val, data.val_split, range(n))
        queries = [found[i] for i in range(n)]
    x = torch.stack([transform(image) for image, _ in queries])
    shown = [display_image(t, spec.mean, spec.std) for t in x]
    out = Path(out)
    paths: dict[str, Path] = {}
    device = default_device(model)
    with on_device(model, device):
        xd = x.to(device)
        paths["attention"] = draw_attention(model, xd, shown, out / "attention.png")
        say(f"wrote {paths['attention']}")
        paths["pca"] = draw_pca(model, xd, shown, out / "pca.png")
        say(f"wrote {paths['pca']}")
        with torch.no_grad():
            query_feats = spec.feature_fn()(model, xd).float().cpu()
    if data is None:
        say("neighbours and embedding map skipped: they need --data SHARDS (train and val splits)")
    else:
        # read in stream order, as `read_samples` fetches the images: with loader workers, position i of the
        # features would be another image (the workers' batches interleave)
        train_x, train_y = extract_features(model, data.train, replace(spec, num_workers=0), split=data.train_split,
                                            max_samples=data.max_train, progress=progress)
        sims, idx = nearest(train_x, query_feats, k)
        found = read_samples(data.train, data.train_split, sorted(set(idx.flatten().tolist())))
        neighbour_images = [[display_image(transform(found[i][0]), spec.mean, spec.std) for i in row]
                            for row in idx.tolist()]
        neighbour_names = [[_name(int(train_y[i]), names) for i in row] for row in idx.tolist()]
        capped = data.max_train is not None and len(train_x) >= data.max_train
        pool = f"among the first {len(train_x)} train images" if capped else "train images"
        paths["neighbours"] = draw_neighbours(shown, [_name(label, names) for _, label in queries], neighbour_images,
                                              neighbour_names, sims, out / "neighbours.png", pool=pool)
        say(f"wrote {paths['neighbours']}")
        val_x, val_y = extract_features(model, data.val, spec, split=data.val_split, max_samples=data.max_val,
                                        progress=progress)
        say(f"{embedding} of {len(val_x)} val features ...")
        points = embed_2d(val_x, embedding)
        paths["embedding"] = draw_embedding(points, val_y, names, out / "embedding.png", method=embedding)
        say(f"wrote {paths['embedding']}")
    if tracker is not None:
        log_pictures(tracker, paths)
    return paths

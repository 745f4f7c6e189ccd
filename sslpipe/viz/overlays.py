"""Coloured mask overlays: ground truth and predictions drawn over images, and panels laid out as a PNG.

One drawer for every picture of predictions (fine-tuning evaluation, `sslpipe predict`, the linear segmentation
probe): torchvision's `draw_segmentation_masks` / `draw_bounding_boxes`, colours fixed per class (a seeded palette),
so the ground-truth and predicted panels of a class match. Instance predictions are drawn when they score >=
`SHOW_SCORE`, and at least as many of the best-scoring ones as the image has ground-truth instances.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

SHOW_SCORE = 0.3  # instance predictions drawn in the PNGs (metrics use every detection)


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """A fixed colour per class index (seeded), bright enough to read over photographs."""
    rng = np.random.default_rng(12345)
    colours = rng.integers(60, 256, size=(max(num_classes, 1), 3))
    return [tuple(int(c) for c in row) for row in colours]


def semantic_overlay(image: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255,
                     alpha: float = 0.8) -> Tensor:
    """uint8 (3, H, W) image + (H, W) class map -> overlay; class 0 (background) stays uncoloured, ignore is white."""
    from torchvision.utils import draw_segmentation_masks

    labels = labels.to(image.device)
    classes = list(range(1, num_classes))
    masks = torch.stack([labels == c for c in classes] + [labels == ignore_index])
    colours = [palette(num_classes)[c] for c in classes] + [(255, 255, 255)]
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=colours)


def instance_overlay(image: Tensor, instances: dict[str, Tensor], num_classes: int, offset: int = 0,
                     min_score: float | None = None, top_k: int = 0, alpha: float = 0.75) -> Tensor:
    """uint8 (3, H, W) image + {masks (N, H, W), labels, boxes[, scores]} -> masks coloured by class, boxes drawn.
    Predictions: those scoring >= `min_score` plus the `top_k` best (a weak model's masks still show); `offset` maps
    thing labels back to class indices (Mask2Former instance labels are class - 1)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = torch.ones(len(instances["labels"]), dtype=torch.bool)
    if min_score is not None and "scores" in instances:
        scores = instances["scores"].cpu()
        keep = scores >= min_score
        keep[scores.argsort(descending=True)[:top_k]] = True
    if not keep.any():
        return image
    colours = [palette(num_classes)[min(int(c) + offset, num_classes - 1)] for c in instances["labels"][keep]]
    out = draw_segmentation_masks(image, instances["masks"][keep].bool().cpu(), alpha=alpha, colors=colours)
    return draw_bounding_boxes(out, instances["boxes"][keep].cpu(), colors=colours, width=1)


PANEL_TITLES = ("image", "ground truth", "prediction")


def class_legend(class_names: list[str], ignore: bool = True) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of every drawn class (class 0, the background, stays uncoloured), and white for ignore."""
    colours = palette(len(class_names))
    entries = [(name, colours[c]) for c, name in enumerate(class_names) if c > 0]
    return entries + ([("ignore", (255, 255, 255))] if ignore else [])


def _font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's bundled font (no system or downloaded font needed)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _legend_strip(legend: list[tuple[str, tuple[int, int, int]]], width: int) -> np.ndarray:
    """Coloured squares with class names, wrapped to `width`."""
    font, pad, box = _font(), 6, 12
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items, x, y = [], pad, pad
    for name, colour in legend:
        w = box + 4 + int(draw_probe.textlength(name, font=font)) + 12
        if x + w > width and x > pad:
            x, y = pad, y + box + 6
        items.append((x, y, name, colour))
        x += w
    strip = Image.new("RGB", (width, y + box + pad), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, name, colour in items:
        draw.rectangle([x, y, x + box, y + box], fill=tuple(colour), outline=(0, 0, 0))
        draw.text((x + box + 4, y - 1), name, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def _wrap(text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """`text` broken into lines at spaces so that each fits `width` pixels."""
    probe, lines = ImageDraw.Draw(Image.new("RGB", (1, 1))), [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if lines[-1] and probe.textlength(line, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = line
    return lines


def save_rows(rows: list[list[Tensor]], path: str | Path, min_side: int = 192, gap: int = 2,
              titles: tuple[str, ...] | None = PANEL_TITLES,
              legend: list[tuple[str, tuple[int, int, int]]] | None = None, caption: str | None = None,
              labels: list[list[str]] | None = None) -> Path:
    """Panels (uint8 (3, H, W)) laid out row by row, small images enlarged (nearest) to `min_side`, with a title
    over each column and a colour legend below (`class_legend`); written atomically as PNG. `caption` is a line
    (wrapped) over everything that says what the picture shows; `labels` a short text under each panel."""
    scale = max(1, -(-min_side // max(1, min(min(p.shape[-2:]) for row in rows for p in row))))
    arrays = [[np.asarray(p.permute(1, 2, 0).cpu().numpy()).repeat(scale, 0).repeat(scale, 1) for p in row]
              for row in rows]
    header = 20 if titles else 0
    below = 16 if labels else 0
    width = max(sum(a.shape[1] for a in row) + gap * (len(row) - 1) for row in arrays)
    caption_lines = _wrap(caption, width - 8, _font(14)) if caption else []
    top = 18 * len(caption_lines) + 4 * bool(caption_lines)
    height = top + header + sum(max(a.shape[0] for a in row) + below for row in arrays) + gap * (len(arrays) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y, spots = top + header, []
    for r, row in enumerate(arrays):
        x = 0
        for c, a in enumerate(row):
            canvas[y: y + a.shape[0], x: x + a.shape[1]] = a
            if labels and c < len(labels[r]):
                spots.append((x + a.shape[1] // 2, y + a.shape[0] + below // 2, labels[r][c]))
            x += a.shape[1] + gap
        y += max(a.shape[0] for a in row) + below + gap
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(caption_lines):
        draw.text((4, 2 + 18 * i), line, fill=(0, 0, 0), font=_font(14))
    if titles:
        font, x = _font(14), 0
        for title, a in zip(titles, arrays[0]):
            draw.text((x + a.shape[1] // 2, top + header // 2), title, fill=(0, 0, 0), font=font, anchor="mm")
            x += a.shape[1] + gap
    for x, y, text in spots:
        draw.text((x, y), text, fill=(0, 0, 0), font=_font(12), anchor="mm")
    if legend:
        image = Image.fromarray(np.concatenate([np.asarray(image), _legend_strip(legend, width)]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
        raise
    return path


def save_semantic_samples(samples: list[tuple[Tensor, Tensor, Tensor]], path: str | Path, class_names: list[str],
                          ignore_index: int = 255) -> Path:
    """Rows of image | ground truth | prediction for (uint8 image, label map, predicted map) samples, with the class
    legend: what `sslpipe linear-seg --png` draws."""
    n = len(class_names)
    rows = [[image, semantic_overlay(image, seg, n, ignore_index), semantic_overlay(image, pred, n, ignore_index)]
            for image, seg, pred in samples]
    return save_rows(rows, path, legend=class_legend(class_names))

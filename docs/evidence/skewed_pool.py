"""Build the skewed curation pool of issue 33 from the Fashion-MNIST train split, as an image folder.

The pool is skewed the way web data is: two classes 10x over-represented, about 30 % near-duplicates (shifts of 1-2 px
and 22-26 px crops resized back to 28 px, of other pool images) and about 15 % junk (flat grey, uniform noise and crops
of scikit-image's brick, grass and gravel textures). Files go to OUT/cNN/ (class NN, 10 = junk) so `sslpipe shards
--folder OUT` keeps the labels for the class histograms; OUT/truth.json lists every file in the order `sslpipe shards`
reads them (sorted class folders, sorted files) with its kind ("original", "duplicate", "junk") and, for a duplicate,
the file it copies.

    python docs/evidence/skewed_pool.py OUT [--seed 0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from sslpipe.ingest.datasets import load_arrays

PER_CLASS = 600          # originals of an ordinary class
HEAVY = (0, 6)           # T-shirt/top and Shirt: 10x over-represented
DUPLICATE_SHARE = 0.30
JUNK_SHARE = 0.15


def _near_duplicate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:  # a shift of 1-2 px, zero filled (the background is black)
        dy, dx = rng.integers(-2, 3, size=2)
        out = np.zeros_like(img)
        ys, xs = slice(max(dy, 0), 28 + min(dy, 0)), slice(max(dx, 0), 28 + min(dx, 0))
        yd, xd = slice(max(-dy, 0), 28 + min(-dy, 0)), slice(max(-dx, 0), 28 + min(-dx, 0))
        out[ys, xs] = img[yd, xd]
        return out
    side = int(rng.integers(22, 27))  # a crop, resized back
    y, x = rng.integers(0, 28 - side + 1, size=2)
    crop = Image.fromarray(img[y:y + side, x:x + side])
    return np.asarray(crop.resize((28, 28), Image.Resampling.BILINEAR))


def _junk(i: int, rng: np.random.Generator, textures: list[np.ndarray]) -> np.ndarray:
    kind = i % 3
    if kind == 0:
        return np.full((28, 28), rng.integers(0, 256), dtype=np.uint8)
    if kind == 1:
        return rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    tex = textures[int(rng.integers(len(textures)))]
    side = int(rng.integers(28, 113))
    y, x = rng.integers(0, tex.shape[0] - side), rng.integers(0, tex.shape[1] - side)
    crop = Image.fromarray(tex[y:y + side, x:x + side])
    return np.asarray(crop.resize((28, 28), Image.Resampling.BILINEAR))


def build(out: Path, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images, labels = load_arrays("fashion-mnist", "train")
    picked = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        picked.extend((int(i), c) for i in rng.choice(idx, PER_CLASS * (10 if c in HEAVY else 1), replace=False))
    n_orig = len(picked)
    n_total = round(n_orig / (1 - DUPLICATE_SHARE - JUNK_SHARE))
    n_dup, n_junk = round(n_total * DUPLICATE_SHARE), round(n_total * JUNK_SHARE)
    textures = [np.asarray(Image.fromarray(t).convert("L")) for t in (skdata.brick(), skdata.grass(), skdata.gravel())]

    files: dict[str, dict] = {}
    for j, (i, c) in enumerate(picked):
        name = f"c{c:02d}/orig_{j:06d}.png"
        files[name] = {"kind": "original", "class": c, "pixels": images[i]}
    originals = list(files)
    for j in range(n_dup):
        src = originals[int(rng.integers(n_orig))]
        c = files[src]["class"]
        files[f"c{c:02d}/dup_{j:06d}.png"] = {"kind": "duplicate", "class": c, "of": src,
                                             "pixels": _near_duplicate(files[src]["pixels"], rng)}
    for j in range(n_junk):
        files[f"c10/junk_{j:06d}.png"] = {"kind": "junk", "class": 10, "pixels": _junk(j, rng, textures)}

    for c in range(11):
        (out / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    for name, f in files.items():
        Image.fromarray(f.pop("pixels")).save(out / name)
    order = sorted(files, key=lambda n: (n.split("/")[0], n))  # the order `sslpipe shards --folder` reads
    truth = {"seed": seed, "originals": n_orig, "duplicates": n_dup, "junk": n_junk, "heavy_classes": list(HEAVY),
             "files": [{"file": n, **files[n]} for n in order]}
    (out / "truth.json").write_text(json.dumps(truth))
    return truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=False)
    t = build(out, a.seed)
    print(f"{out}: {t['originals']} originals, {t['duplicates']} near-duplicates, {t['junk']} junk")


if __name__ == "__main__":
    main()

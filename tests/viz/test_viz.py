"""Prediction overlays (sslpipe/viz/overlays.py): column titles and a class legend the reader can match colours to."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sslpipe.viz.overlays import class_legend, palette, save_rows, semantic_overlay


def test_overlay_png_has_titles_and_a_legend_in_the_class_colours(tmp_path):
    names = ["background", "cat", "dog"]
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    labels = torch.zeros(32, 32, dtype=torch.long)
    labels[4:12, 4:12] = 2
    rows = [[image, semantic_overlay(image, labels, 3, alpha=1.0), semantic_overlay(image, labels, 3, alpha=1.0)]]
    legend = class_legend(names)
    assert [n for n, _ in legend] == ["cat", "dog", "ignore"]  # background is never coloured
    plain = np.asarray(Image.open(save_rows(rows, tmp_path / "plain.png", titles=None)))
    png = np.asarray(Image.open(save_rows(rows, tmp_path / "full.png", legend=legend)))
    assert png.shape[1] == plain.shape[1] and png.shape[0] > plain.shape[0] + 20  # header + legend strip
    header, body = png[:20], png[20: 20 + plain.shape[0]]
    assert (header < 128).any()  # titles drawn in black on white
    np.testing.assert_array_equal(body, plain)  # panels unchanged below the header
    strip = png[20 + plain.shape[0]:]
    for colour in (palette(3)[1], palette(3)[2]):
        assert (strip.reshape(-1, 3) == colour).all(1).any(), colour  # a legend square in each class colour
    assert (body.reshape(-1, 3) == palette(3)[2]).all(1).any()  # the same colour paints class 2 in the panels


def test_a_failed_png_write_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    """The PNG goes through `.NAME.tmp`: when the rename fails (a folder at the target), neither file is left."""
    import os

    panel = torch.zeros(3, 8, 8, dtype=torch.uint8)
    (tmp_path / "out.png").mkdir()
    with pytest.raises(OSError):
        save_rows([[panel]], tmp_path / "out.png", titles=None)
    assert sorted(os.listdir(tmp_path)) == ["out.png"] and (tmp_path / "out.png").is_dir()

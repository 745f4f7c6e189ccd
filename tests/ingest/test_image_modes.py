"""Images stored as they are shown, whatever the flags: 16-bit values scaled to 8 bits (not clipped to white), EXIF
orientation applied; label maps never rescaled, and checked against the image as shown."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import read_split
from PIL import Image

from sslpipe.data.stream import decode_sample
from sslpipe.ingest.encode import InputError
from sslpipe.ingest.options import ShardOptions
from sslpipe.ingest.shards import write_shards

RAMP = np.linspace(0, 65535, 64 * 48).astype(np.uint16).reshape(48, 64)  # every 16-bit level, low to high


def decoded(out: Path) -> list[np.ndarray]:
    """The images of split train as training decodes them."""
    return [np.asarray(decode_sample({"__key__": k, "__url__": str(out), **s})["image"])
            for k, s in read_split(out, "train").items()]


@pytest.mark.parametrize("reencode", [None, "jpg"])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path: Path, reencode: str | None) -> None:
    """A 16-bit ramp PNG and the same ramp as a 16-bit TIFF: Pillow's convert("RGB") would clip both to white
    (mean 254.5); scaled by >> 8 they average 127.5. A float image has no fixed range: skipped, its mode named."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(RAMP).save(src / "a.png")
    Image.fromarray(RAMP).save(src / "b.tif")
    Image.fromarray(RAMP.astype(np.float32)).save(src / "c.tif")
    manifest = write_shards(tmp_path / "out", source=str(src), options=ShardOptions(shuffle=False, reencode=reencode),
                            progress=False)
    assert [(s["source"], s["error"][:24]) for s in manifest["skipped"]] == [(str(src / "c.tif"),
                                                                              "ValueError: image of mod")]
    assert "mode F" in manifest["skipped"][0]["error"]
    images = decoded(tmp_path / "out")
    assert len(images) == 2
    for image in images:
        assert image.shape == (48, 64, 3)
        assert abs(image.mean() - 127.5) < 1.0 and (image == 255).mean() < 0.01
    if reencode is None:  # lossless: exactly the high bytes
        for image in images:
            np.testing.assert_array_equal(image[..., 0], (RAMP >> 8).astype(np.uint8))


def test_label_maps_beside_a_16_bit_image_are_not_rescaled(tmp_path: Path) -> None:
    Image.fromarray(RAMP).save(tmp_path / "img.png")
    label = np.zeros((48, 64), np.uint8)
    label[:, 32:], label[0, 0] = 3, 255
    palette = Image.fromarray(label, mode="P")  # a VOC-style palette label map: its indices are the classes
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [255, 255, 255] * 252)
    palette.save(tmp_path / "label.png")
    (tmp_path / "list.txt").write_text("img.png label.png\n")
    manifest = write_shards(tmp_path / "out", source=str(tmp_path / "list.txt"), progress=False)
    (sample,) = read_split(tmp_path / "out", "train").values()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["seg.png"]))), label)
    assert manifest["seg_values"] == [0, 3, 255]
    assert np.asarray(Image.open(io.BytesIO(sample["png"]))).max() == 255  # the image scaled, not clipped


def exif_photo(path: Path) -> None:
    """64x32 stored pixels, left half red, right half blue, EXIF orientation 6: shown 32x64, red on top."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32, 0], pixels[:, 32:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("options", [ShardOptions(), ShardOptions(max_side=48), ShardOptions(reencode="png")])
def test_exif_orientation_is_applied_whatever_the_flags(tmp_path: Path, options: ShardOptions) -> None:
    (tmp_path / "src").mkdir()
    exif_photo(tmp_path / "src" / "photo.jpg")
    write_shards(tmp_path / "out", source=str(tmp_path / "src"), options=options, progress=False)
    (sample,) = read_split(tmp_path / "out", "train").values()
    stored = Image.open(io.BytesIO(sample["png" if options.reencode == "png" else "jpg"]))
    assert stored.getexif().get(0x0112) is None  # upright pixels, no tag left to turn them again
    side = options.max_side or 64
    assert stored.size == (side // 2, side)
    (image,) = decoded(tmp_path / "out")
    top, bottom = image[: side // 4].mean(axis=(0, 1)), image[-side // 4:].mean(axis=(0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_seg_list_label_follows_the_photo_as_shown(tmp_path: Path) -> None:
    exif_photo(tmp_path / "photo.jpg")
    Image.fromarray(np.ones((64, 32), np.uint8)).save(tmp_path / "shown.png")  # drawn on the photo as shown
    (tmp_path / "list.txt").write_text("photo.jpg shown.png\n")
    write_shards(tmp_path / "out", source=str(tmp_path / "list.txt"), progress=False)
    (sample,) = read_split(tmp_path / "out", "train").values()
    assert Image.open(io.BytesIO(sample["seg.png"])).size == Image.open(io.BytesIO(sample["jpg"])).size == (32, 64)

    Image.fromarray(np.ones((32, 64), np.uint8)).save(tmp_path / "stored.png")  # drawn on the unrotated pixels
    (tmp_path / "list.txt").write_text("photo.jpg stored.png\n")
    with pytest.raises(InputError, match=r"stored.png is 64x32 but its image .*photo.jpg is 32x64 \(its EXIF "
                                         r"orientation 6 .*follows the stored, unrotated pixels"):
        write_shards(tmp_path / "out2", source=str(tmp_path / "list.txt"), progress=False)

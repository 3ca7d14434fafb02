from __future__ import annotations

import io
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlmtune.data.images import image_size, load_image, open_image
from vlmtune.errors import DataError


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A real PNG whose header claims width x height, with a few bytes of pixel data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("width, height", [(12_000, 12_000), (20_000, 20_000)], ids=["144MP", "400MP"])
def test_huge_image_is_rejected_from_its_header(tmp_path: Path, monkeypatch, width: int, height: int) -> None:
    path = write_png_header(tmp_path / "bomb.png", width, height)

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    if width * height < 2 * Image.MAX_IMAGE_PIXELS:
        assert image_size(path) == (width, height)
    rss_before, start = peak_rss_mb(), time.perf_counter()
    with pytest.raises(DataError, match="before decoding") as info:
        open_image(path, max_megapixels=100)
    assert str(path) in str(info.value)
    assert time.perf_counter() - start < 1.0
    assert peak_rss_mb() - rss_before < 100, "decoding 144+ MP would need 400+ MB"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485, "Pillow's global limit is left alone"


def test_limit_is_configurable(tmp_path: Path, make_image) -> None:
    path = make_image("a.png", size=(200, 100))
    with pytest.raises(DataError, match="200x100"):
        open_image(path, max_megapixels=0.01)
    assert open_image(path, max_megapixels=0.02).size == (200, 100)


@pytest.mark.parametrize(
    "mode, color, name, expected",
    [
        ("RGB", (10, 20, 30), "rgb.png", (10, 20, 30)),
        ("L", 128, "grey.png", (128, 128, 128)),
        ("1", 1, "bw.png", (255, 255, 255)),
        ("LA", (100, 0), "la.png", (255, 255, 255)),
        ("RGBA", (255, 0, 0, 0), "clear.png", (255, 255, 255)),
        ("RGBA", (255, 0, 0, 255), "opaque.png", (255, 0, 0)),
        ("RGBA", (0, 0, 0, 128), "half.png", (127, 127, 127)),
        ("CMYK", (0, 255, 255, 0), "cmyk.jpg", (255, 0, 0)),
        ("CMYK", (0, 0, 0, 0), "cmyk.tif", (255, 255, 255)),
        ("P", 3, "palette.png", None),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_modes_are_converted_to_rgb(make_image, mode, color, name, expected) -> None:
    path = make_image(name, mode=mode, size=(4, 4), color=color)
    image, original = load_image(path)
    assert image.mode == "RGB" and image.size == (4, 4)
    assert original == Image.open(path).mode
    if expected is not None:
        assert np.allclose(image.getpixel((1, 1)), expected, atol=3), image.getpixel((1, 1))


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.save(tmp_path / "p.png", transparency=0)
    image = open_image(tmp_path / "p.png")
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((2, 2)) == (255, 255, 255)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    image, mode = load_image(tmp_path / "g16.png")
    assert mode.startswith("I")
    assert [image.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1)]] == [0, 127, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (20, 10), (0, 200, 0))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (10, 20)


def test_missing_corrupt_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        open_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match="not a readable image"):
        open_image(tmp_path / "junk.png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        open_image(tmp_path / "cut.png")

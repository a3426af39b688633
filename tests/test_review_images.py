"""Edge-case inputs for image loading and tiling: each test pins a bug a user could hit."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from nativevl.data import images as img


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (7, 0)])
def test_zero_size_images_are_refused_by_name(size):
    """A 0-pixel image raised ZeroDivisionError, or (0 wide, 5 high) silently became 13 black tiles."""
    with pytest.raises(ValueError, match="empty"):
        img.image_to_tiles(Image.new("RGB", size))
    with pytest.raises(ValueError, match="empty"):
        img.load_image(np.zeros((size[1], size[0], 3), np.uint8))


def test_tile_bounds_are_checked():
    """min_num > max_num (or max_num < 1) left no candidate grid and silently gave one tile."""
    with pytest.raises(ValueError, match="min_num"):
        img.choose_grid(100, 100, min_num=5, max_num=2)
    with pytest.raises(ValueError, match="max_num"):
        img.choose_grid(100, 100, min_num=1, max_num=0)
    with pytest.raises(ValueError, match="min_num"):
        img.image_to_tiles(Image.new("RGB", (64, 64)), max_num=0)
    assert img.choose_grid(100, 100, min_num=4, max_num=4) == (2, 2)  # still honoured when valid


def _png16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grayscale_keeps_its_contrast():
    """Pillow's convert('RGB') clips 16-bit values at 255, so a 16-bit PNG came out almost all white."""
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))  # (8, 256) dark -> bright
    for source in (_png16(ramp), Image.fromarray(ramp), Image.fromarray(ramp.astype(np.int32))):
        got = np.asarray(img.load_image(source))[0, :, 0].astype(int)
        assert got.shape == (256,)
        assert abs(got[0] - 0) <= 1 and abs(got[-1] - 255) <= 1 and abs(got[128] - 128) <= 2, got[::32]
    # an 8-bit-range image in 32-bit mode 'I' is left as it is
    small = np.arange(256, dtype=np.int32)[None].repeat(4, 0)
    assert np.array_equal(np.asarray(img.load_image(Image.fromarray(small)))[0, :, 0], np.arange(256))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_tiling_a_non_rgb_image_directly(mode):
    """tile_array / tile_image on an image not passed through load_image (grayscale, RGBA, palette)
    failed with numpy's 'cannot reshape array'; they now tile its RGB conversion."""
    pic = Image.new("RGB", (120, 60), (200, 100, 50)).convert(mode)
    want = img.tile_array(pic.convert("RGB"), image_size=28, max_num=4)
    assert np.array_equal(img.tile_array(pic, image_size=28, max_num=4), want)
    assert len(img.tile_image(pic, image_size=28, max_num=4)) == want.shape[0] == 3

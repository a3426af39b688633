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

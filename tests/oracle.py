"""transformers' InternVLProcessor as the parity oracle, built without its video processor.

On this CPU machine transformers cannot construct InternVLProcessor normally (its video processor
needs torchvision). We create the instance and set exactly the attributes its __init__ sets, then
call its real __call__, so the text expansion and image processing under test are transformers' own.
"""

from __future__ import annotations

import re

from transformers import InternVLProcessor

try:  # transformers 5: the PIL processor has its own name; in 4.x the (slow) default one is PIL's
    from transformers import GotOcr2ImageProcessorPil
except ImportError:
    from transformers import GotOcr2ImageProcessor as GotOcr2ImageProcessorPil

from nativevl.data.images import IMAGENET_MEAN, IMAGENET_STD


def internvl_image_processor(image_size: int = 448, max_patches: int = 12) -> GotOcr2ImageProcessorPil:
    return GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=IMAGENET_MEAN.tolist(),
        image_std=IMAGENET_STD.tolist(),
        crop_to_patches=True,
        max_patches=max_patches,
    )


def internvl_processor(tokenizer, image_seq_length: int, image_size: int = 448) -> InternVLProcessor:
    p = InternVLProcessor.__new__(InternVLProcessor)
    p.image_processor = internvl_image_processor(image_size)
    p.tokenizer = tokenizer
    p.video_processor = None
    p.chat_template = None
    p.image_seq_length = image_seq_length
    p.start_image_token = tokenizer.start_image_token
    p.end_image_token = tokenizer.end_image_token
    p.start_image_token_id = tokenizer.start_image_token_id
    p.end_image_token_id = tokenizer.end_image_token_id
    p.image_token = tokenizer.context_image_token
    p.video_token = tokenizer.video_token
    p.image_token_id = tokenizer.context_image_token_id
    p.multimodal_pattern = re.compile(f"(?P<image>{re.escape(p.image_token)})|(?P<video>{re.escape(p.video_token)})")
    return p

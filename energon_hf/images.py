"""Images in, pixel_values out: through the checkpoint's own AutoImageProcessor.

Inputs may be PIL images, local paths, or HWC uint8 arrays, in any size and mode: they are converted to
RGB (as transformers' image pipelines do) and resized by the processor. Anything else is a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoImageProcessor


def load_image(image: Any) -> Image.Image:
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image path {str(image)!r} does not exist")
        try:
            with Image.open(path) as opened:
                image = opened.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{str(path)!r} is not an image file PIL can read: {e}") from e
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 [H, W] or [H, W, C], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, a path or a uint8 array, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has no pixels ({image.width}x{image.height})")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_processor(folder: str | os.PathLike):
    """The checkpoint's image processor (the PIL backend: torchvision is not a dependency)."""
    return AutoImageProcessor.from_pretrained(folder, backend="pil")


def preprocess(processor, images: Any) -> torch.Tensor:
    """One image or a list of them -> pixel_values [B, 3, H, W]."""
    batch = images if isinstance(images, list | tuple) else [images]
    if not batch:
        raise ValueError("no images given")
    return processor(images=[load_image(image) for image in batch], return_tensors="pt")["pixel_values"]

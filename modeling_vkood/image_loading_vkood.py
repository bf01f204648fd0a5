"""Image loading for VKOODProcessor: any image a user hands over -> an (H, W, 3) RGB array the image processor reads.

Hub remote code, a flat sibling of `processing_vkood.py`: imports only numpy, PIL, torch, transformers and the
standard library. Decoding is strict and explicit: a truncated or corrupt file, an unknown sample format or an array
without a channel axis raises a ValueError naming the image; 16-bit images are scaled to 8 bits (not clipped), CMYK
and palette images are converted, transparency is composed onto white.
"""

import numpy as np
import PIL.Image
import torch
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import ChannelDimension

# Pillow modes holding 16-bit samples (16-bit PNG/TIFF decode to these); `Image.convert("RGB")` would clip them at 255.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_CHANNEL_COUNTS = (1, 3, 4)


def _is_single_image(value) -> bool:
    return isinstance(value, (PIL.Image.Image, np.ndarray, torch.Tensor))


def _sixteen_bit_to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """Map 16-bit samples [0, 65535] onto [0, 255] (x / 257, exact at both ends) instead of saturating them."""
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise ValueError(f"{where}: 16-bit image values must lie in [0, 65535], got [{low}, {high}]")
    return np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)


def image_to_rgb(image, where: str) -> np.ndarray:
    """Return one image as an (H, W, 3) channels-last array: uint8, or float as given; transparency on white."""
    if isinstance(image, PIL.Image.Image):
        try:
            image.load()  # Pillow decodes lazily: a truncated or corrupt file only fails here, not at open
        except OSError as error:
            source = f" ({image.filename})" if getattr(image, "filename", "") else ""
            raise ValueError(f"{where}{source}: the image data cannot be decoded ({error})") from error
        if image.mode == "F":
            raise ValueError(
                f"{where}: Pillow mode 'F' (32-bit float samples, range unknown) is not supported; convert it to "
                "'L' or 'RGB', or pass a float array in [0, 1]"
            )
        if image.mode in _SIXTEEN_BIT_MODES:
            gray = _sixteen_bit_to_uint8(np.asarray(image), where)
            return np.repeat(gray[..., None], 3, axis=-1)
        return convert_to_rgb(image, return_numpy=True)

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[..., None]
    elif image.ndim == 3:
        # Channels-last is the numpy/PIL convention, so it wins when both ends could be channels (e.g. a 3x4x3 image).
        if image.shape[-1] not in _CHANNEL_COUNTS:
            if image.shape[0] not in _CHANNEL_COUNTS:
                raise ValueError(f"{where}: cannot find a channel axis of size 1, 3 or 4 in shape {image.shape}")
            image = np.moveaxis(image, 0, -1)
    else:
        raise ValueError(f"{where}: an image array must be (H, W), (H, W, C) or (C, H, W), got shape {image.shape}")

    if image.dtype == np.uint16:
        image = _sixteen_bit_to_uint8(image, where)
    elif np.issubdtype(image.dtype, np.integer) and image.dtype != np.uint8:
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{where}: integer image values must lie in [0, 255] (or use dtype uint16 for 16-bit data), "
                f"got [{low}, {high}] with dtype {image.dtype}"
            )
        image = image.astype(np.uint8)
    elif not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"{where}: unsupported image dtype {image.dtype}")
    return convert_to_rgb(image, return_numpy=True, input_data_format=ChannelDimension.LAST)


def flatten_images(images) -> tuple[list, int | None, bool]:
    """Images -> (flat list, images per example or None, whether the input was a batch).

    A list whose elements are lists/tuples is a batch of multi-image examples (NLVR2: pairs); every example must
    hold the same number of images so that pixel_values can be (B, n, C, H, W).
    """
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images), None, True
    if _is_single_image(images):
        return [images], None, False
    if not isinstance(images, (list, tuple)):
        raise TypeError(
            "images must be a PIL image, an array/tensor, or a list of them (or of per-example lists), "
            f"got {type(images).__name__}"
        )
    if not images:
        raise ValueError("images is an empty list")
    grouped = [isinstance(example, (list, tuple)) for example in images]
    if not any(grouped):
        return list(images), None, True
    if not all(grouped):
        raise ValueError("images mixes single images and per-example lists; give all examples the same form")
    sizes = sorted({len(example) for example in images})
    if len(sizes) != 1 or sizes[0] == 0:
        raise ValueError(f"every example must hold the same, non-zero number of images (NLVR2: 2), got sizes {sizes}")
    return [image for example in images for image in example], sizes[0], True


__all__ = ["flatten_images", "image_to_rgb"]

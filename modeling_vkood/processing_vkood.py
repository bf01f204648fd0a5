"""VKOODProcessor: image + text + explicit knowledge -> the tensors `VKOODModel` reads.

Hub remote code: this file imports only torch, transformers (numpy and PIL through its dependencies) and the
standard library, so it works when copied alone into a checkpoint folder and loaded with
`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`.
"""

from collections.abc import Mapping

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import ChannelDimension
from transformers.processing_utils import ProcessorMixin

# Pillow modes holding 16-bit samples (16-bit PNG/TIFF decode to these); `Image.convert("RGB")` would clip them at 255.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_CHANNEL_COUNTS = (1, 3, 4)
# Text models whose position ids start at padding_idx + 1 (fairseq numbering, `create_position_ids_from_input_ids`
# in transformers), padding_idx being the pad token id (MPNet: always 1): only max_position_embeddings -
# padding_idx - 1 tokens fit (RoBERTa-base: 514 - 2 = 512).
_POSITIONS_AFTER_PADDING_IDX = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert", "longformer",
     "roberta-prelayernorm", "xmod", "mpnet"}
)  # fmt: skip


def usable_text_length(text_config) -> int | None:
    """Most tokens (special tokens included) the text encoder of `text_config` can embed; None if it has no limit."""
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions is None:
        return None
    if text_config.model_type in _POSITIONS_AFTER_PADDING_IDX:
        padding_idx = 1 if text_config.model_type == "mpnet" else text_config.pad_token_id
        positions -= padding_idx + 1
    return positions


def _is_single_image(value) -> bool:
    return isinstance(value, (PIL.Image.Image, np.ndarray, torch.Tensor))


def _sixteen_bit_to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """Map 16-bit samples [0, 65535] onto [0, 255] (x / 257, exact at both ends) instead of saturating them."""
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise ValueError(f"{where}: 16-bit image values must lie in [0, 65535], got [{low}, {high}]")
    return np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)


def _image_to_rgb(image, where: str) -> np.ndarray:
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


def _flatten_images(images) -> tuple[list, int | None, bool]:
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


def _item_text(item, example: int, position: int) -> str:
    """A knowledge item's sentence: a str, a mapping with "text", or any object with a `.text` attribute."""
    text = item.get("text") if isinstance(item, Mapping) else getattr(item, "text", item)
    if not isinstance(text, str):
        raise TypeError(
            f"knowledge[{example}][{position}] must be a string, a dict with a 'text' string or an object with a "
            f"`.text` string, got {type(item).__name__}"
        )
    return text


class VKOODProcessor(ProcessorMixin):
    r"""
    Turns images, a question/caption and explicit knowledge items into VK-OOD model inputs.

    Build it with the model config's limits so that the processor and the model agree on M and Lk:
    `VKOODProcessor.from_model_config(image_processor, tokenizer, model.config)`.

    Args:
        image_processor: any transformers image processor (the vision backbone's).
        tokenizer: the text backbone's tokenizer; it encodes both the text and the knowledge items.
        max_knowledge_items (`int`, defaults to 16): items kept per example (M cap); extra items are dropped in order.
        knowledge_max_length (`int`, defaults to 32): tokens kept per item, special tokens included (Lk cap).
        max_text_length (`int`, *optional*): most tokens of a text, special tokens included: the positions the
            text encoder can embed (`from_model_config` sets it), so that a long text is truncated here instead of
            failing inside the model's embeddings. None: the tokenizer's own limit.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        max_knowledge_items: int = 16,
        knowledge_max_length: int = 32,
        max_text_length: int | None = None,
    ):
        super().__init__(image_processor, tokenizer)
        limits = {"max_knowledge_items": max_knowledge_items, "knowledge_max_length": knowledge_max_length}
        if max_text_length is not None:
            limits["max_text_length"] = max_text_length
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VKOODProcessor.{name} must be a positive integer, got {value!r}")
        special = tokenizer.num_special_tokens_to_add(pair=False)
        if knowledge_max_length <= special:
            raise ValueError(
                f"VKOODProcessor.knowledge_max_length={knowledge_max_length} leaves no room for text: the tokenizer "
                f"adds {special} special tokens per item"
            )
        if max_text_length is not None and knowledge_max_length > max_text_length:
            raise ValueError(
                f"VKOODProcessor.knowledge_max_length={knowledge_max_length} exceeds max_text_length={max_text_length}"
                ": knowledge items are read by the same text encoder"
            )
        self.max_knowledge_items = max_knowledge_items
        self.knowledge_max_length = knowledge_max_length
        self.max_text_length = max_text_length

    @classmethod
    def from_model_config(cls, image_processor, tokenizer, config) -> "VKOODProcessor":
        """Processor with the model config's M and Lk caps (`max_knowledge_items`, `knowledge_max_length`) and the
        text encoder's usable length as `max_text_length` (`usable_text_length(config.text_config)`)."""
        return cls(
            image_processor,
            tokenizer,
            max_knowledge_items=config.max_knowledge_items,
            knowledge_max_length=config.knowledge_max_length,
            max_text_length=usable_text_length(config.text_config),
        )

    @property
    def model_input_names(self) -> list[str]:
        return [
            "pixel_values",
            "input_ids",
            "attention_mask",
            "knowledge_input_ids",
            "knowledge_attention_mask",
            "knowledge_mask",
        ]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        knowledge=None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Encode a batch (or one example) of any of images, text and knowledge.

        Args:
            images: a PIL image / (H, W[, C]) or (C, H, W) array or tensor / a 4-D batch / a list of them ->
                `pixel_values` (B, C, H, W); a list of per-example lists of images (NLVR2 pairs) ->
                (B, n, C, H, W). Every image is converted to RGB (transparency onto white, 16-bit scaled to 8-bit).
            text: a string or a list of strings -> `input_ids`, `attention_mask` (B, L), padded per `padding`,
                truncated to `max_length` when `truncation`. `max_length` defaults to the smaller of
                `max_text_length` and the tokenizer's limit, and may not exceed `max_text_length`; without
                truncation a text longer than `max_text_length` raises a ValueError.
            knowledge: per example a list of strings, of mappings with a "text" key, or of objects with a `.text`
                attribute (None or [] = no items); for a single example, the flat list. Returns
                `knowledge_input_ids` / `knowledge_attention_mask` (B, M, Lk) and `knowledge_mask` (B, M), 1 = real
                item, where M = most items of any example (at most `max_knowledge_items`) and Lk = longest
                tokenised item (at most `knowledge_max_length`). When no example has an item, M = 0 and Lk = 1:
                shapes (B, 0, 1) and (B, 0). knowledge=None returns no knowledge keys.
            return_tensors: "pt" (default) or "np".
            **kwargs: passed to the image processor (e.g. `do_center_crop=False`).
        """
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if images is None and text is None and knowledge is None:
            raise ValueError("VKOODProcessor needs at least one of images, text or knowledge")
        if images is None and kwargs:
            raise TypeError(f"image processor options {sorted(kwargs)} were given without images")

        data, sizes, batched = {}, {}, False
        if images is not None:
            flat_images, per_example, images_batched = _flatten_images(images)
            batched |= images_batched
            pixel_values = self._encode_images(flat_images, per_example, **kwargs)
            data["pixel_values"] = pixel_values
            sizes["images"] = pixel_values.shape[0]
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
                raise TypeError("text must be a string or a non-empty list of strings")
            batched |= not isinstance(text, str)
            encoded = self.tokenizer(
                list(texts),
                padding=padding,
                truncation=truncation,
                max_length=self._text_length(max_length) if truncation else max_length,
                return_token_type_ids=False,
                return_tensors="pt",
            )
            if self.max_text_length is not None and encoded["input_ids"].shape[1] > self.max_text_length:
                raise ValueError(
                    f"text of {encoded['input_ids'].shape[1]} tokens is longer than the text encoder's "
                    f"max_text_length={self.max_text_length}; call with truncation=True"
                )
            data["input_ids"], data["attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
            sizes["text"] = len(texts)
        if knowledge is not None:
            examples = self._knowledge_texts(knowledge, other_inputs_batched=batched)
            data.update(self._encode_knowledge(examples))
            sizes["knowledge"] = len(examples)

        if len(set(sizes.values())) > 1:
            described = ", ".join(f"{name}={sizes.get(name, 'not given')}" for name in ("images", "text", "knowledge"))
            raise ValueError(f"batch sizes differ: {described}")
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data)

    def _text_length(self, max_length: int | None) -> int | None:
        """The `max_length` for the tokenizer: the caller's, checked against `max_text_length`, or the default."""
        if self.max_text_length is None:
            return max_length
        if max_length is None:
            return min(self.max_text_length, self.tokenizer.model_max_length)
        if max_length > self.max_text_length:
            raise ValueError(
                f"max_length={max_length} exceeds the text encoder's max_text_length={self.max_text_length}"
            )
        return max_length

    def _encode_images(self, flat_images: list, per_example: int | None, **kwargs) -> torch.Tensor:
        """(B, C, H, W) pixel values, or (B, n, C, H, W) when every example holds n images."""

        def where(index: int) -> str:
            if per_example is None:
                return f"images[{index}]"
            return f"images[{index // per_example}][{index % per_example}]"

        rgb = [_image_to_rgb(image, where(index)) for index, image in enumerate(flat_images)]
        encoded = self.image_processor(rgb, return_tensors="pt", input_data_format=ChannelDimension.LAST, **kwargs)
        pixel_values = encoded["pixel_values"]
        if per_example is None:
            return pixel_values
        return pixel_values.reshape(-1, per_example, *pixel_values.shape[1:])

    def _knowledge_texts(self, knowledge, other_inputs_batched: bool) -> list[list[str]]:
        """Per-example item sentences, each list cut to `max_knowledge_items` (kept in the given order)."""
        if not isinstance(knowledge, (list, tuple)):
            raise TypeError(
                f"knowledge must be a list (per example, or for one example), got {type(knowledge).__name__}"
            )
        per_example = [entry is None or isinstance(entry, (list, tuple)) for entry in knowledge]
        if knowledge and all(per_example):
            examples = knowledge
        elif not any(per_example):
            if other_inputs_batched:
                raise ValueError(
                    f"knowledge is a flat list of {len(knowledge)} items but text/images are a batch: pass one "
                    "(possibly empty) list of items per example"
                )
            examples = [knowledge]
        else:
            raise ValueError("knowledge mixes per-example lists and single items; pass one list of items per example")
        return [
            [_item_text(item, b, i) for i, item in enumerate((example or [])[: self.max_knowledge_items])]
            for b, example in enumerate(examples)
        ]

    def _encode_knowledge(self, examples: list[list[str]]) -> dict[str, torch.Tensor]:
        """Tokenise every item of the batch in one call, then scatter the rows into (B, M, Lk) slots."""
        counts = torch.tensor([len(items) for items in examples], dtype=torch.long)
        flat = [sentence for items in examples for sentence in items]
        if flat:
            encoded = self.tokenizer(
                flat,
                padding="longest",
                truncation=True,
                max_length=self.knowledge_max_length,
                return_token_type_ids=False,
                return_tensors="pt",
            )
            item_ids, item_attention = encoded["input_ids"], encoded["attention_mask"]
        else:
            item_ids = item_attention = torch.zeros(0, 1, dtype=torch.long)

        batch_size, num_slots, length = len(examples), int(counts.max()), item_ids.shape[1]
        example_index = torch.repeat_interleave(torch.arange(batch_size), counts)
        slot_index = torch.arange(len(flat)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((batch_size, num_slots, length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, num_slots, length), dtype=torch.long)
        knowledge_mask = torch.zeros((batch_size, num_slots), dtype=torch.long)
        input_ids[example_index, slot_index] = item_ids
        attention_mask[example_index, slot_index] = item_attention.long()
        knowledge_mask[example_index, slot_index] = 1
        return {
            "knowledge_input_ids": input_ids,
            "knowledge_attention_mask": attention_mask,
            "knowledge_mask": knowledge_mask,
        }


VKOODProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VKOODProcessor", "usable_text_length"]

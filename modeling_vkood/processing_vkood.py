"""VKOODProcessor: image + text + explicit knowledge -> the tensors `VKOODModel` reads.

Hub remote code: this file imports only torch, transformers, the standard library and its flat siblings
(`image_loading_vkood.py`: decoding images to RGB; `knowledge_vkood.py`: retrieval; `knowledge_source_vkood.py`: where
the knowledge index comes from and how it travels; `decoder_targets_vkood.py`: decoder texts), so it works when
copied into a checkpoint folder and loaded with `AutoProcessor.from_pretrained(folder, trust_remote_code=True)`.
With a knowledge source the processor retrieves each text's knowledge itself, with the code the dataset builders
used, so inference sees what training saw.
"""

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import BatchFeature
from transformers.image_utils import ChannelDimension
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .decoder_targets_vkood import decoder_targets, tokenizer_decoder_tokens
from .image_loading_vkood import flatten_images, image_to_rgb
from .knowledge_source_vkood import (
    KNOWLEDGE_INDEX_FILE,
    checkpoint_index,
    is_hub_dataset,
    ship_file,
    source_index,
)
from .knowledge_vkood import KnowledgeIndex, retrieval_cut

logger = logging.get_logger(__name__)

# Text models whose position ids start at padding_idx + 1 (fairseq numbering, `create_position_ids_from_input_ids`
# in transformers), padding_idx being the pad token id (MPNet: always 1): only max_position_embeddings -
# padding_idx - 1 tokens fit (RoBERTa-base: 514 - 2 = 512).
KNOWLEDGE_PADDING = ("longest", "max_length", "bucket")
# Item lengths of `knowledge_padding="bucket"` are multiples of this (tensor-core friendly, few distinct shapes).
KNOWLEDGE_LENGTH_BUCKET = 8
_POSITIONS_AFTER_PADDING_IDX = frozenset(
    {
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "data2vec-text",
        "ibert",
        "longformer",
        "roberta-prelayernorm",
        "xmod",
        "mpnet",
    }
)


def usable_text_length(text_config) -> int | None:
    """Most tokens (special tokens included) the text encoder of `text_config` can embed; None if it has no limit."""
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions is None:
        return None
    if text_config.model_type in _POSITIONS_AFTER_PADDING_IDX:
        padding_idx = 1 if text_config.model_type == "mpnet" else text_config.pad_token_id
        positions -= padding_idx + 1
    return positions


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
        max_knowledge_items (`int`, defaults to 16): items per example (the model's M cap): retrieval retrieves this
            many per text, and of more items given, this many are kept: retrieved items (with a head and a relation,
            as `retrieve_knowledge` and the datasets' `knowledge` column hold them) as a retrieval of this many would
            choose them (`knowledge_vkood.retrieval_cut`), other items (sentences) the first ones, in order.
        knowledge_max_length (`int`, defaults to 32): tokens kept per item, special tokens included (Lk cap).
        max_text_length (`int`, *optional*): most tokens of a text, special tokens included: the positions the
            text encoder can embed (`from_model_config` sets it), so that a long text is truncated here instead of
            failing inside the model's embeddings. None: the tokenizer's own limit.
        knowledge_source (`str`, *optional*): where the knowledge retrieved for a text comes from, recorded in the
            processor config: "starter" (the vkood starter graph), the name of the ConceptNet index the model was
            trained with, `hf://datasets/OWNER/NAME[@REVISION]` (a Hub dataset holding `edges.jsonl`, JSON lines of
            {"head", "relation", "tail", "weight"}) or a local folder/file of such edges. None: the processor never
            retrieves; knowledge is only what the caller passes.
        knowledge_index (`str`, *optional*): the SQLite knowledge index retrieval reads. A relative path names a file
            of the checkpoint (`save_pretrained` ships the index as `knowledge_index.sqlite` and `from_pretrained`
            finds it, locally or in a Hub repository). Needed for "starter" and index sources; for edge sources it
            is built on first use (in $VKOOD_CACHE, default ~/.cache/vkood).
        knowledge_padding (`str`, defaults to "longest"): how a call pads the items when it does not say
            (`__call__`'s `knowledge_padding`); `train.py` sets "bucket" under FSDP, where every process must encode
            as many item rows as the others (each shard's weights are gathered collectively).

    A processor config saved with the former `knowledge_retrieval_items` (items retrieved per text, of which the first
    `max_knowledge_items` were encoded) still loads: the key is ignored, with a warning when it differs from
    `max_knowledge_items`.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        max_knowledge_items: int = 16,
        knowledge_max_length: int = 32,
        max_text_length: int | None = None,
        knowledge_source: str | None = None,
        knowledge_index: str | None = None,
        knowledge_padding: str = "longest",
    ):
        super().__init__(image_processor, tokenizer)
        if knowledge_padding not in KNOWLEDGE_PADDING:
            raise ValueError(f"knowledge_padding must be one of {KNOWLEDGE_PADDING}, got {knowledge_padding!r}")
        self.knowledge_padding = knowledge_padding
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
        self.set_knowledge_source(knowledge_source, knowledge_index)

    # ------------------------------------------------------------------------------------------- knowledge
    def set_knowledge_source(self, source: str | None, index: str | os.PathLike | None = None) -> None:
        """Set where retrieval reads (see the class arguments `knowledge_source` and `knowledge_index`);
        `set_knowledge_source(None)` turns self-retrieval off. Retrieval takes `max_knowledge_items` items per text."""
        for name, value in (("knowledge_source", source), ("knowledge_index", index)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"VKOODProcessor.{name} must be a string or a path, got {type(value).__name__}")
        if source is None and index is not None:
            raise ValueError("VKOODProcessor.knowledge_index needs a knowledge_source naming what it holds")
        self.knowledge_source = None if source is None else str(source)
        self.knowledge_index = None if index is None else str(index)
        self._index_location = self.knowledge_index  # where the index file is found on this machine
        self._index: KnowledgeIndex | None = None

    @property
    def has_knowledge_source(self) -> bool:
        """Whether the processor retrieves knowledge for texts given without any."""
        return self.knowledge_source is not None

    def _knowledge(self) -> KnowledgeIndex:
        """The open index, located and opened on first use (an edge source is indexed then)."""
        if self._index is None:
            self._index_location = source_index(self.knowledge_source, self._index_location)
            self._index = KnowledgeIndex(self._index_location)
        return self._index

    def retrieve_knowledge(self, texts: list[str]) -> list[list]:
        """Per text the knowledge items (`knowledge_vkood.KnowledgeItem`: head, relation, tail, weight, text) the
        dataset builders' retrieval gives for it: same concepts and ranking, `max_knowledge_items` items at most (a
        dataset annotated with more items per text gives the same items once cut to `max_knowledge_items`, see
        `knowledge_sentences`)."""
        if not self.has_knowledge_source:
            raise ValueError("this processor has no knowledge_source to retrieve from (see set_knowledge_source)")
        return self._knowledge().retrieve_batch(list(texts), max_items=self.max_knowledge_items)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save as ProcessorMixin does, plus the knowledge index (`knowledge_index.sqlite`) unless the source is a
        Hub dataset (the checkpoint names it and retrieval fetches it), so the folder or Hub repository carries its
        own knowledge."""
        if push_to_hub:
            files = self.save_pretrained(save_directory)
            repo_id = kwargs.pop("repo_id", Path(save_directory).name)
            self.push_to_hub(repo_id, **kwargs)  # saves afresh into a temporary folder and uploads all of it
            return files
        if not self.has_knowledge_source:
            return super().save_pretrained(save_directory, **kwargs)
        ships = not is_hub_dataset(self.knowledge_source)
        index = Path(self._knowledge().path) if ships else None
        configured = self.knowledge_index
        try:
            # The saved config names the shipped file, or nothing: a path of this machine means nothing elsewhere.
            self.knowledge_index = KNOWLEDGE_INDEX_FILE if ships else None
            files = super().save_pretrained(save_directory, **kwargs)
        finally:
            self.knowledge_index = configured
        if ships:
            ship_file(index, Path(save_directory) / KNOWLEDGE_INDEX_FILE)
            files.append(str(Path(save_directory) / KNOWLEDGE_INDEX_FILE))
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """ProcessorMixin.from_pretrained, then a relative `knowledge_index` is looked up in the same folder or Hub
        repository (downloaded with the checkpoint's revision and credentials)."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        index = processor.knowledge_index
        if index is not None and not Path(index).is_absolute():
            processor._index_location = checkpoint_index(pretrained_model_name_or_path, index, **kwargs)
        return processor

    @classmethod
    def from_dict(cls, processor_dict: dict, **kwargs):
        """ProcessorMixin.from_dict; a config saved with the former `knowledge_retrieval_items` loads too."""
        processor_dict = dict(processor_dict)
        retrieval_items = processor_dict.pop("knowledge_retrieval_items", None)
        max_items = kwargs.get("max_knowledge_items", processor_dict.get("max_knowledge_items"))
        if retrieval_items is not None and retrieval_items != max_items:
            logger.warning(
                f"this processor config has knowledge_retrieval_items={retrieval_items}, which is no longer read: the "
                f"processor retrieves max_knowledge_items={max_items} items per text (the model's M), chosen as a "
                f"retrieval of {max_items} chooses them, where it used to retrieve {retrieval_items} and encode the "
                f"first {max_items}; for some texts the encoded items differ"
            )
        return super().from_dict(processor_dict, **kwargs)

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
        answers: str | list[str] | None = None,
        max_answer_length: int = 32,
        knowledge_padding: str | None = None,
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
                attribute (an example's None or [] = no items); for a single example, the flat list. Returns
                `knowledge_input_ids` / `knowledge_attention_mask` (B, M, Lk) and `knowledge_mask` (B, M), 1 = real
                item, where M = most items of any example (at most `max_knowledge_items`) and Lk = longest
                tokenised item (at most `knowledge_max_length`). When no example has an item, M = 0 and Lk = 1:
                shapes (B, 0, 1) and (B, 0). `knowledge=[]` says "no knowledge" for every example of the batch.
                knowledge=None (the default): with a `knowledge_source` and a text, each text's items are retrieved
                (`retrieve_knowledge`), exactly as the dataset builders stored them for training; otherwise no
                knowledge keys are returned.
            answers: a string or a list of strings, the target texts of `VKOODForConditionalGeneration` (one per
                example) -> `decoder_input_ids`, `decoder_attention_mask` and `labels` (`decoder_targets`), each text
                cut to `max_answer_length` tokens, start and end tokens included.
            knowledge_padding: the processor's `knowledge_padding` (default "longest": M and Lk of the batch, as
                above) when None, or "longest", "max_length" (always
                `max_knowledge_items` x `knowledge_max_length`: one shape for every batch, so that a compiled model or
                a CUDA graph is not rebuilt for each new item count and length; the padded slots change no output)
                or "bucket" (M = `max_knowledge_items`, Lk = the longest item rounded up to a multiple of
                `KNOWLEDGE_LENGTH_BUCKET`, at most `knowledge_max_length`: a few shapes, each padded little more
                than the batch needs, for the fixed-shape path that encodes every padded slot).
            return_tensors: "pt" (default) or "np".
            **kwargs: passed to the image processor (e.g. `do_center_crop=False`).
        """
        knowledge_padding = self.knowledge_padding if knowledge_padding is None else knowledge_padding
        if knowledge_padding not in KNOWLEDGE_PADDING:
            raise ValueError(f"knowledge_padding must be one of {KNOWLEDGE_PADDING}, got {knowledge_padding!r}")
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if images is None and text is None and knowledge is None and answers is None:
            raise ValueError("VKOODProcessor needs at least one of images, text, knowledge or answers")
        if images is None and kwargs:
            raise TypeError(f"image processor options {sorted(kwargs)} were given without images")

        data, sizes, batched = {}, {}, False
        if images is not None:
            flat_images, per_example, images_batched = flatten_images(images)
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
        if knowledge is None and text is not None and self.has_knowledge_source:
            knowledge = self.retrieve_knowledge(texts)
        elif isinstance(knowledge, (list, tuple)) and not knowledge:
            knowledge = [[]] * next(iter(sizes.values()), 1)
        if knowledge is not None:
            examples = self._knowledge_texts(knowledge, other_inputs_batched=batched)
            data.update(self._encode_knowledge(examples, knowledge_padding))
            sizes["knowledge"] = len(examples)

        if answers is not None:
            targets = [answers] if isinstance(answers, str) else answers
            data.update(self.decoder_targets(targets, max_answer_length))
            sizes["answers"] = len(targets)

        if len(set(sizes.values())) > 1:
            described = ", ".join(
                f"{name}={sizes.get(name, 'not given')}" for name in ("images", "text", "knowledge", "answers")
            )
            raise ValueError(f"batch sizes differ: {described}")
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data)

    # -------------------------------------------------------------------------------------- decoder texts
    def decoder_special_tokens(self) -> dict[str, int]:
        """The decoder's start, end and padding token ids (`tokenizer_decoder_tokens` of this tokenizer)."""
        return tokenizer_decoder_tokens(self.tokenizer)

    def decoder_targets(self, texts: list[str], max_length: int = 32) -> dict[str, torch.Tensor]:
        """Decoder inputs and labels for target `texts` (`decoder_targets_vkood.decoder_targets` with this
        tokenizer): `decoder_input_ids` (B, T) = [start, tokens..., end, pad...], at most `max_length` tokens, its
        `decoder_attention_mask`, and `labels` (-100 at the start token and the padding)."""
        return decoder_targets(self.tokenizer, texts, max_length)

    def decode_answers(self, sequences) -> list[str]:
        """The texts of generated token ids (B, T): special tokens (start, end, padding) dropped, stripped."""
        return [text.strip() for text in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]

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

        rgb = [image_to_rgb(image, where(index)) for index, image in enumerate(flat_images)]
        encoded = self.image_processor(rgb, return_tensors="pt", input_data_format=ChannelDimension.LAST, **kwargs)
        pixel_values = encoded["pixel_values"]
        if per_example is None:
            return pixel_values
        return pixel_values.reshape(-1, per_example, *pixel_values.shape[1:])

    def knowledge_sentences(self, knowledge) -> list[list[str]]:
        """Per example the sentences of `knowledge` (a batch: one list per example) that `__call__` encodes, in slot
        order: each item's text, at most `max_knowledge_items` of them (chosen as the class docstring says)."""
        return self._knowledge_texts(knowledge, other_inputs_batched=True)

    def _knowledge_texts(self, knowledge, other_inputs_batched: bool) -> list[list[str]]:
        """Per-example item sentences, each list cut to `max_knowledge_items` (`retrieval_cut`: retrieved items as a
        retrieval of `max_knowledge_items` chooses them, other items the first ones; kept in the given order)."""
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
            [_item_text(item, b, i) for i, item in enumerate(retrieval_cut(example or [], self.max_knowledge_items))]
            for b, example in enumerate(examples)
        ]

    def _encode_knowledge(self, examples: list[list[str]], padding: str = "longest") -> dict[str, torch.Tensor]:
        """Tokenise every item of the batch in one call, then scatter the rows into (B, M, Lk) slots, M and Lk as
        `padding` (`knowledge_padding` of `__call__`) says."""
        counts = torch.tensor([len(items) for items in examples], dtype=torch.long)
        flat = [sentence for items in examples for sentence in items]
        fixed = padding == "max_length"
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if flat:
            encoded = self.tokenizer(
                flat,
                padding="max_length" if fixed else "longest",
                truncation=True,
                max_length=self.knowledge_max_length,
                return_token_type_ids=False,
                return_tensors="pt",
            )
            item_ids, item_attention = encoded["input_ids"], encoded["attention_mask"]
        else:
            item_ids = item_attention = torch.zeros(0, self.knowledge_max_length if fixed else 1, dtype=torch.long)
        if padding == "bucket":
            bucket = -(-max(item_ids.shape[1], 1) // KNOWLEDGE_LENGTH_BUCKET) * KNOWLEDGE_LENGTH_BUCKET
            extra = min(bucket, self.knowledge_max_length) - item_ids.shape[1]
            item_ids = torch.nn.functional.pad(item_ids, (0, extra), value=pad_id)
            item_attention = torch.nn.functional.pad(item_attention, (0, extra))

        batch_size, length = len(examples), item_ids.shape[1]
        num_slots = int(counts.max()) if padding == "longest" else self.max_knowledge_items
        example_index = torch.repeat_interleave(torch.arange(batch_size), counts)
        slot_index = torch.arange(len(flat)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)

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

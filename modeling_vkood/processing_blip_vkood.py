"""VKOODBlipProcessor: `VKOODProcessor` with BLIP's answer texts (Hub remote code: imports torch, transformers and its
flat siblings only).

Images, questions and knowledge are encoded exactly as `VKOODProcessor` encodes them (BLIP's image processor and
tokenizer inside). What BLIP changes is the answer side: its decoder starts an answer with its own start token
([DEC], `text_config.bos_token_id`), not [CLS], and ends it with [SEP]; its rank inference needs the candidate list
tokenised that way, and its VQA training takes several weighted answers per question.
"""

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from .processing_vkood import VKOODProcessor, usable_text_length


class VKOODBlipProcessor(VKOODProcessor):
    r"""
    The processor of `VKOODBlipForQuestionAnswering`: `VKOODProcessor` (same arguments, same `__call__`) whose
    answer texts start with the decoder's start token.

    Args:
        decoder_start_token_id (`int`, *optional*): the token every answer text starts with (BLIP: [DEC], the text
            config's `bos_token_id`); None: the tokenizer's [CLS], as `VKOODProcessor`.

    Build it with `from_model_config(image_processor, tokenizer, model.config)`, or from a BLIP checkpoint with
    `from_blip_pretrained("Salesforce/blip-vqa-base", model.config)`.
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
        decoder_start_token_id: int | None = None,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            max_knowledge_items=max_knowledge_items,
            knowledge_max_length=knowledge_max_length,
            max_text_length=max_text_length,
            knowledge_source=knowledge_source,
            knowledge_index=knowledge_index,
        )
        if decoder_start_token_id is not None and (
            isinstance(decoder_start_token_id, bool) or not isinstance(decoder_start_token_id, int)
        ):
            raise ValueError(f"decoder_start_token_id must be an integer token id, got {decoder_start_token_id!r}")
        self.decoder_start_token_id = decoder_start_token_id

    @classmethod
    def from_model_config(cls, image_processor, tokenizer, config) -> "VKOODBlipProcessor":
        """A processor with the model config's knowledge caps, the text encoder's usable length and BLIP's decoder
        start token (`config.text_config.bos_token_id`)."""
        return cls(
            image_processor,
            tokenizer,
            max_knowledge_items=config.max_knowledge_items,
            knowledge_max_length=config.knowledge_max_length,
            max_text_length=usable_text_length(config.text_config),
            decoder_start_token_id=config.text_config.bos_token_id,
        )

    @classmethod
    def from_blip_pretrained(cls, pretrained_model_name_or_path, config, **kwargs) -> "VKOODBlipProcessor":
        """BLIP's own image processor and tokenizer (a Hub id such as "Salesforce/blip-vqa-base" or a folder), with
        the caps of `config` (a `VKOODBlipConfig`); `kwargs` go to both `from_pretrained` calls."""
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_model_config(image_processor, tokenizer, config)

    def decoder_targets(self, texts: list[str], max_length: int = 32) -> dict[str, torch.Tensor]:
        """`VKOODProcessor.decoder_targets` with the decoder's start token first: `decoder_input_ids` (B, T) =
        [start, tokens..., [SEP], pad...], its `decoder_attention_mask`, and `labels` (-100 at the start token and
        the padding); what `VKOODBlipForQuestionAnswering.forward` trains on, one answer per question."""
        targets = super().decoder_targets(texts, max_length)
        if self.decoder_start_token_id is not None:
            targets["decoder_input_ids"][:, 0] = self.decoder_start_token_id
        return targets

    def answer_candidates(self, answers: list[str], max_length: int = 32) -> dict[str, torch.Tensor]:
        """The candidate list of rank inference, tokenised as answer texts: `answer_input_ids` and
        `answer_attention_mask` (A, T), for `VKOODBlipForQuestionAnswering.rank_answers`."""
        if not answers:
            raise ValueError("rank inference needs at least one candidate answer")
        targets = self.decoder_targets(list(answers), max_length)
        return {
            "answer_input_ids": targets["decoder_input_ids"],
            "answer_attention_mask": targets["decoder_attention_mask"],
        }

    def answer_targets(
        self, answers: list[list[str]], weights: list[list[float]] | None = None, max_length: int = 32
    ) -> dict[str, torch.Tensor]:
        """BLIP's VQA training targets, several weighted answers per question: `decoder_input_ids`,
        `decoder_attention_mask` and `labels` (B, A, T), A the most answers of any question (padded slots: [PAD]
        tokens, labels all -100), and `answer_weights` (B, A) (default 1 per answer; 0 for padded slots)."""
        if not answers or not all(isinstance(example, (list, tuple)) and example for example in answers):
            raise ValueError("answers must hold one non-empty list of answer texts per question")
        if weights is None:
            weights = [[1.0] * len(example) for example in answers]
        if [len(example) for example in weights] != [len(example) for example in answers]:
            raise ValueError("weights must hold one weight per answer")
        counts = torch.tensor([len(example) for example in answers])
        flat = self.decoder_targets([text for example in answers for text in example], max_length)
        slots = int(counts.max())
        example_index = torch.repeat_interleave(torch.arange(len(answers)), counts)
        slot_index = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        length = flat["decoder_input_ids"].shape[1]
        pad = self.decoder_special_tokens()["pad_token_id"]
        targets = {
            "decoder_input_ids": torch.full((len(answers), slots, length), pad, dtype=torch.long),
            "decoder_attention_mask": torch.zeros((len(answers), slots, length), dtype=torch.long),
            "labels": torch.full((len(answers), slots, length), -100, dtype=torch.long),
        }
        for key, tensor in targets.items():
            tensor[example_index, slot_index] = flat[key]
        answer_weights = torch.zeros((len(answers), slots), dtype=torch.float)
        answer_weights[example_index, slot_index] = torch.tensor([w for example in weights for w in example]).float()
        return {**targets, "answer_weights": answer_weights}


VKOODBlipProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VKOODBlipProcessor"]

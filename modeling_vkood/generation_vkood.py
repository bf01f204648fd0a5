"""VKOODForConditionalGeneration: answers as text, from a decoder that cross-attends to VK-OOD's fused states.

Hub remote code: imports torch, transformers, the standard library and its flat siblings only.

The fused pass of `VKOODModel` (image, question and OOD-gated knowledge through the co-attention layers) is run once
per example; its two streams, [text ; knowledge] and image, projected to the decoder's width, are the memory that
every decoder layer cross-attends to. The decoder is any causal LM with cross-attention (`config.decoder_config`,
BERT-style with `is_decoder=True, add_cross_attention=True` by default; or a pretrained checkpoint loaded in its
place, as BLIP initialises its decoder from BERT). `generate()` encodes the memory once and hands it to the
decoder's own `GenerationMixin.generate`, which keeps it fixed across decoding steps (expanded once per beam) and
caches the decoder's self- and cross-attention keys/values, so greedy search, beam search, sampling and every
`GenerationConfig` option work as for any transformers decoder.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_vkood import VKOODConfig
from .modeling_vkood import VKOODModel, VKOODPreTrainedModel
from .outputs_vkood import FUSION_ATTENTIONS, OOD_OUTPUTS

# The fused pass's per-stream states and attentions, which the generative head returns next to the decoder's.
FUSED_STREAM_OUTPUTS = ("text_hidden_states", "image_hidden_states") + FUSION_ATTENTIONS

IGNORE_INDEX = -100


@dataclass
class VKOODGenerationMemory(ModelOutput):
    """What the decoder cross-attends to: `states` (B, L + M + N, D) = projected [text ; knowledge ; image] fused
    states, `mask` (B, L + M + N) 1 for real positions (padding and hard-gated-out knowledge items are 0), the OOD
    diagnostics of the fused pass (B, M) / (B,), and its per-stream hidden states and attentions when asked for (as
    in `VKOODModelOutput`)."""

    states: torch.FloatTensor | None = None
    mask: torch.LongTensor | None = None
    ood_scores: torch.FloatTensor | None = None
    ood_gate: torch.FloatTensor | None = None
    ood_iterations: torch.LongTensor | None = None
    ood_residual: torch.FloatTensor | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_self_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_self_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class VKOODGenerationOutput(ModelOutput):
    """`loss`: token cross-entropy over the answer tokens of the batch (labels != -100), averaged over those tokens;
    `logits` (B, T, vocabulary) of the decoder; `cache` its key/value cache when `use_cache`; the OOD diagnostics.

    transformers' standard fields are the decoder's, as in its causal LMs with cross-attention (the stream the logits
    come from): `hidden_states` (embeddings + one per decoder layer, (B, T, D) each), `attentions` (its
    self-attention, (B, heads, T, T) per layer) and `cross_attentions` (over the memory, (B, heads, T, L + M + N)).
    The fused pass's own hidden states and attentions follow under their per-stream names (`VKOODModelOutput`)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    ood_scores: torch.FloatTensor | None = None
    ood_gate: torch.FloatTensor | None = None
    ood_iterations: torch.LongTensor | None = None
    ood_residual: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_self_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_self_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_cross_attentions: tuple[torch.FloatTensor, ...] | None = None


def answer_token_loss(logits, labels, shift_labels=None):
    """Cross-entropy of next-token `logits` (B, T, V) against `labels` (B, T), the tokens of the decoder input
    (position t of the logits predicts label t + 1), -100 wherever no answer token is to be predicted: the mean over
    the batch's answer tokens (0 for a batch without any, rather than NaN). `shift_labels` (B, T): the targets already
    aligned with the logits (position t predicts shift_labels t), as transformers' Trainer passes them under sequence
    or context parallelism, used instead of shifting `labels`."""
    if shift_labels is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    summed = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return summed / (targets != IGNORE_INDEX).sum().clamp_min(1)


class VKOODForConditionalGeneration(VKOODPreTrainedModel):
    """Open-ended VQA (answers as text) and question-answer generation (the SelTDA teacher) on VK-OOD's fused states.

    Training batches carry `labels` (B, T): the decoder input tokens [start, answer..., end, pad...] with -100 at
    every position that is not an answer token to predict (start, padding); `decoder_input_ids` default to them
    (-100 read as padding). `VKOODProcessor(..., answers=...)` writes all three. Like the other heads, the loss is
    already averaged over its batch (here over its answer tokens) and takes no Trainer loss kwargs.
    """

    # The VQA pipeline answers by generation with this head (and by the classifier's top-k otherwise).
    generates_answers = True
    # No poolers (the decoder reads the fused states): a checkpoint saved with them loads without a warning.
    _keys_to_ignore_on_load_unexpected = [r"vkood\.(text|image)_pooler\."]

    def __init__(self, config: VKOODConfig):
        super().__init__(config)
        if config.decoder_config is None:
            raise ValueError(
                "VKOODForConditionalGeneration needs config.decoder_config (a causal LM config that "
                "supports cross-attention, e.g. {'model_type': 'bert', ...})"
            )
        self.vkood = VKOODModel(config, add_pooling_layer=False)
        self.text_decoder = AutoModelForCausalLM.from_config(config.decoder_config)
        self.memory_projection = nn.Linear(config.hidden_size, config.decoder_config.hidden_size)
        self.post_init()

    def get_output_embeddings(self):
        """The decoder's output layer (tied to its word embeddings when `decoder_config.tie_word_embeddings`); the
        input embeddings are the text backbone's, as for every head (`VKOODModel.get_input_embeddings`)."""
        return self.text_decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.text_decoder.set_output_embeddings(new_embeddings)

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        """Questions, knowledge items and answers share the processor's one tokenizer: `resize_token_embeddings`
        resizes the decoder (its word embeddings, its output layer, their tie and `decoder_config.vocab_size`) with the
        text backbone."""
        self.text_decoder.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        return self.vkood._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def encode(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        knowledge_relevance=None,
        gate_forcing=None,
        output_attentions=False,
        output_hidden_states=False,
    ) -> VKOODGenerationMemory:
        """The decoder's memory from one fused pass (image, question or prompt, knowledge). `knowledge_relevance`
        and `gate_forcing` (training only) as in `VKOODModel.fuse`; `output_attentions` / `output_hidden_states` add
        the fused pass's per-stream ones."""
        if pixel_values is None or input_ids is None:
            raise ValueError(
                "VK-OOD needs both `pixel_values` and `input_ids` (an empty prompt for the question "
                'generator: the processor\'s text="")'
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        fused = self.vkood(
            pixel_values,
            input_ids,
            attention_mask,
            knowledge_input_ids,
            knowledge_attention_mask,
            knowledge_mask,
            knowledge_relevance,
            gate_forcing,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        # Padded items have gate 0 exactly (log-gate -inf), like hard-gated-out ones: neither is memory.
        item_mask = (fused.ood_gate > 0).to(attention_mask.dtype)
        image_mask = attention_mask.new_ones(fused.image_last_hidden_state.shape[:2])
        states = torch.cat([fused.last_hidden_state, fused.image_last_hidden_state], dim=1)
        return VKOODGenerationMemory(
            states=self.memory_projection(states),
            mask=torch.cat([attention_mask, item_mask, image_mask], dim=1),
            **{name: getattr(fused, name) for name in OOD_OUTPUTS + FUSED_STREAM_OUTPUTS},
        )

    # `past_key_values` is the cache's old name: taken with a warning, as transformers' BERT LM head takes it.
    @deprecate_kwarg("past_key_values", version="5.40.0", new_name="cache")
    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        labels=None,
        shift_labels=None,
        knowledge_relevance=None,
        gate_forcing=None,
        memory=None,
        cache=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Teacher-forced decoding of `decoder_input_ids` (default: `labels` with -100 as padding) over the fused
        states; the loss when `labels` are given (`shift_labels` as in `answer_token_loss`). `memory`: a
        `VKOODGenerationMemory` from `encode`, to decode several sequences against one fused pass. `cache` /
        `use_cache` are the decoder's key/value cache, as in transformers' decoders (no cache while training on
        `labels`); `output_attentions`, `output_hidden_states` and `return_dict` default to the config's values and
        fill the fields of `VKOODGenerationOutput`."""
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if memory is None:
            memory = self.encode(
                pixel_values,
                input_ids,
                attention_mask,
                knowledge_input_ids,
                knowledge_attention_mask,
                knowledge_mask,
                knowledge_relevance,
                gate_forcing,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("give decoder_input_ids or labels")
            decoder_input_ids = labels.masked_fill(labels == IGNORE_INDEX, self.config.decoder_config.pad_token_id or 0)
        decoded = self.text_decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=memory.states,
            encoder_attention_mask=memory.mask,
            cache=cache,
            use_cache=use_cache if labels is None else False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        loss = None
        if labels is not None:
            loss = answer_token_loss(decoded.logits, labels, shift_labels)
        output = VKOODGenerationOutput(
            loss=loss,
            logits=decoded.logits,
            cache=decoded.cache,
            hidden_states=decoded.hidden_states,
            attentions=decoded.attentions,
            cross_attentions=decoded.cross_attentions,
            **{name: getattr(memory, name) for name in OOD_OUTPUTS + FUSED_STREAM_OUTPUTS},
        )
        return self._returned(output, return_dict)

    @torch.no_grad()
    def generate(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        decoder_input_ids=None,
        memory=None,
        **generate_kwargs,
    ):
        """Generate answers (or question-answer pairs) for the images and prompts: one fused pass, then the decoder's
        `GenerationMixin.generate` with `generate_kwargs` (`max_new_tokens`, `num_beams`, `do_sample`,
        `num_return_sequences`, `return_dict_in_generate`, `output_scores`, a `generation_config`...).

        Returns what transformers' `generate` returns: the token ids (B * num_return_sequences, T), starting with the
        decoder's start token (`decoder_config.bos_token_id`, or the given `decoder_input_ids` as a prefix); decode
        them with `processor.decode_answers`. `memory`: a `VKOODGenerationMemory` from `encode` instead of the inputs.
        """
        if memory is None:
            memory = self.encode(
                pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask, knowledge_mask
            )
        if decoder_input_ids is None:
            start = self.config.decoder_config.bos_token_id
            if start is None:
                raise ValueError("config.decoder_config.bos_token_id (the decoder's start token) is not set")
            decoder_input_ids = torch.full(
                (memory.states.shape[0], 1), start, dtype=torch.long, device=memory.states.device
            )
        if generate_kwargs.get("use_cache", True) and generate_kwargs.get("cache") is None:
            # transformers gives a decoder-only model a self-attention cache only; the cross-attention keys and
            # values of the memory are cached too (computed at the first step, reused at every later one).
            config = self.text_decoder.config
            generate_kwargs["cache"] = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        return self.text_decoder.generate(
            input_ids=decoder_input_ids,
            encoder_hidden_states=memory.states,
            encoder_attention_mask=memory.mask,
            **generate_kwargs,
        )

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits=False):
        """The decoder's `GenerationMixin.compute_transition_scores`: per generated token its log-probability, from
        a `generate(..., return_dict_in_generate=True, output_scores=True)` result."""
        return self.text_decoder.compute_transition_scores(sequences, scores, beam_indices, normalize_logits)


__all__ = ["VKOODForConditionalGeneration", "VKOODGenerationMemory", "VKOODGenerationOutput", "answer_token_loss"]

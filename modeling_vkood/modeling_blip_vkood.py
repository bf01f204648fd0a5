"""VK-OOD-BLIP: BLIP's VQA model with knowledge items gated by VK-OOD's implicit OOD layer (Hub remote code: imports
torch, transformers and its flat siblings only).

The vision encoder, question encoder and answer decoder are transformers' BLIP modules under the names
`BlipForQuestionAnswering` gives them (`vision_model.*`, `text_encoder.*`, `text_decoder.*`), so a
`Salesforce/blip-vqa-*` checkpoint loads unchanged and only the VK-OOD modules (`knowledge_projection.*`, `ood.*`)
are new. Each knowledge item is encoded by the question encoder alone (unimodal mode: no image), mean-pooled,
projected to the vision width and scored by the OOD layer against BLIP's image tokens; the items then join the image
tokens as extra slots of the question encoder's cross-attention memory, [image tokens ; gate * items], with log(gate)
added to their attention logits. A hard-0 gate or a padded slot removes an item exactly, and without items the
computation is BLIP's own.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.models.blip.modeling_blip import BlipForQuestionAnswering, BlipPreTrainedModel, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextAttention, BlipTextLMHeadModel, BlipTextModel
from transformers.utils import ModelOutput

from .configuration_blip_vkood import VKOODBlipConfig
from .modeling_vkood import check_inputs, knowledge_item_mask, lora_target_regex
from .ood_vkood import ImplicitOODLayer


@dataclass
class VKOODBlipEncoding(ModelOutput):
    """What the answer decoder reads, and how the knowledge was gated: `question_embeds` (B, L, D) from the question
    encoder, `question_attention_mask` (B, L), `image_embeds` (B, N, Dv) BLIP's image tokens, and per item (B, M)
    the OOD layer's `ood_scores` and `ood_gate` (0 for padded slots); `ood_iterations` / `ood_residual` (B,) its EM
    steps and last relative change."""

    question_embeds: torch.FloatTensor | None = None
    question_attention_mask: torch.LongTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    ood_scores: torch.FloatTensor | None = None
    ood_gate: torch.FloatTensor | None = None
    ood_iterations: torch.LongTensor | None = None
    ood_residual: torch.FloatTensor | None = None


@dataclass
class VKOODBlipOutput(ModelOutput):
    """`loss` (see `VKOODBlipForQuestionAnswering.forward`), the decoder's `logits` (B, T, V), or (B, A, T, V) for
    several answers per question; `image_embeds` / `last_hidden_state` BLIP's image tokens (B, N, Dv), as in
    transformers' `BlipTextVisionModelOutput`; `question_embeds` (B, L, D); the OOD diagnostics as in
    `VKOODBlipEncoding`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    question_embeds: torch.FloatTensor | None = None
    ood_scores: torch.FloatTensor | None = None
    ood_gate: torch.FloatTensor | None = None
    ood_iterations: torch.LongTensor | None = None
    ood_residual: torch.FloatTensor | None = None


class VKOODBlipCrossAttention(BlipTextAttention):
    """BLIP's text cross-attention block (same weights and names) that applies the memory's additive mask.

    transformers 5.25's `BlipTextLayer` hands `encoder_attention_mask` to its cross-attention as `attention_mask`,
    and `BlipTextAttention` does not pass it on, so the memory is never masked: padded question tokens are read by
    the decoder and padded or gated knowledge slots would be read by the question encoder. This block passes it on.
    """

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, cache=None, **kwargs):
        context, probabilities = self.self(
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=attention_mask,
            cache=cache,
        )
        return self.output(context, hidden_states), probabilities


def _mask_cross_attention(text_model: BlipTextModel) -> None:
    """Give every layer of `text_model` a cross-attention block that applies its memory mask (new modules under the
    same names, created before the weights are loaded or initialised)."""
    for index, layer in enumerate(text_model.encoder.layer):
        if hasattr(layer, "crossattention"):
            layer.crossattention = VKOODBlipCrossAttention(text_model.config, is_cross_attention=True, layer_idx=index)


def additive_mask(mask, dtype):
    """A (B, K) 0/1 mask as the (B, 1, 1, K) additive bias BLIP's eager attention adds to its logits."""
    return ((1.0 - mask.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]


class VKOODBlipPreTrainedModel(BlipPreTrainedModel):
    config_class = VKOODBlipConfig
    config: VKOODBlipConfig
    # The Trainer/loss contract of every VK-OOD head: the loss is averaged over the batch already, no loss kwargs.
    accepts_loss_kwargs = False
    _no_split_modules = [*BlipPreTrainedModel._no_split_modules, "BlipTextLayer", "ImplicitOODLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ImplicitOODLayer):
            init.constant_(module.threshold, self.config.ood_config.threshold)
            init.constant_(module.threshold_calibrated, False)


class VKOODBlipForQuestionAnswering(VKOODBlipPreTrainedModel, GenerationMixin):
    """BLIP VQA with OOD-gated knowledge. Build one from a BLIP VQA checkpoint with
    `VKOODBlipForQuestionAnswering.from_pretrained("Salesforce/blip-vqa-base")` (every BLIP weight is used as it is;
    `knowledge_projection` and `ood` are new), and its processor with
    `VKOODBlipProcessor.from_blip_pretrained("Salesforce/blip-vqa-base", model.config)`.

    Answers: `generate()` (transformers' BLIP generation, greedy or beam) or `rank_answers()` (BLIP's rank inference
    over a candidate list). Training: `forward(..., labels=...)`, see its docstring.
    """

    _tied_weights_keys = BlipForQuestionAnswering._tied_weights_keys
    main_input_name = "pixel_values"
    # Read by the VK-OOD VQA pipeline: answers are texts, generated or ranked.
    generates_answers = True
    ranks_answers = True
    # Attention projections that LoRA adapts: the vision tower's fused `qkv` and the text encoder's and decoder's
    # `query` / `key` / `value` (self- and cross-attention).
    lora_projections = ("qkv", "query", "key", "value")

    def __init__(self, config: VKOODBlipConfig):
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(config.text_config)
        _mask_cross_attention(self.text_encoder)
        _mask_cross_attention(self.text_decoder.bert)
        self.decoder_pad_token_id = config.text_config.pad_token_id
        self.decoder_start_token_id = config.text_config.bos_token_id
        vision_width = config.vision_config.hidden_size
        self.knowledge_projection = nn.Linear(config.text_config.hidden_size, vision_width)
        self.ood = ImplicitOODLayer(config.ood_config, vision_width)
        self.post_init()

    def get_input_embeddings(self):
        return self.text_encoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.text_encoder.set_input_embeddings(value)

    @torch.no_grad()
    def resize_image_size(self, image_size: int) -> None:
        """Make `image_size` the vision tower's own size, as BLIP does when it fine-tunes a checkpoint at another
        resolution (its `interpolate_pos_embed`: the patch grid of the position table resized bicubically, the class
        position kept): the table is replaced by its interpolation and `config.vision_config.image_size` set, so the
        saved model runs at that size without `interpolate_pos_encoding`."""
        embeddings = self.vision_model.embeddings
        if image_size % embeddings.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {embeddings.patch_size}")
        if image_size == embeddings.image_size:
            return
        patches = (image_size // embeddings.patch_size) ** 2
        table = embeddings.position_embedding
        probe = table.new_zeros(1, patches + 1, table.shape[-1])
        resized = embeddings.interpolate_pos_encoding(probe, image_size, image_size)
        embeddings.position_embedding = nn.Parameter(resized.contiguous(), requires_grad=table.requires_grad)
        embeddings.image_size, embeddings.num_patches, embeddings.num_positions = image_size, patches, patches + 1
        self.config.vision_config.image_size = image_size

    # ------------------------------------------------------------------------------------------------ encoding
    def encode_knowledge(self, knowledge_input_ids, knowledge_attention_mask=None, knowledge_mask=None):
        """One vector per item in the vision width, (B, M, Dv): the question encoder in unimodal mode (no
        cross-attention, as BLIP encodes a text for its contrastive loss), mean over the item's real tokens, then
        `knowledge_projection`. Padded slots are zero. Every slot is encoded (fixed shapes, no host read)."""
        batch, items, length = knowledge_input_ids.shape
        knowledge_mask = knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
        if knowledge_attention_mask is None:
            knowledge_attention_mask = torch.ones_like(knowledge_input_ids)
        width = self.config.text_config.hidden_size
        dtype = self.knowledge_projection.weight.dtype
        pooled = torch.zeros(batch * items, width, dtype=dtype, device=knowledge_input_ids.device)
        if items and length:
            flat_ids = knowledge_input_ids.reshape(-1, length)
            flat_mask = knowledge_attention_mask.reshape(-1, length)
            # A slot without a real token reads its first token, so that no row of the encoder is fully masked; its
            # vector is zeroed below with every padded slot's.
            first_token = (torch.arange(length, device=flat_mask.device) == 0).to(flat_mask.dtype)
            encoder_mask = torch.where(flat_mask.sum(-1, keepdim=True) == 0, first_token, flat_mask)
            states = self.text_encoder(input_ids=flat_ids, attention_mask=encoder_mask).last_hidden_state
            weights = (flat_mask * knowledge_mask.reshape(-1, 1)).unsqueeze(-1).to(states.dtype)
            pooled = ((states * weights).sum(1) / weights.sum(1).clamp_min(1.0)).to(dtype)
        return self.knowledge_projection(pooled.view(batch, items, width))

    def encode(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        interpolate_pos_encoding=False,
        knowledge_relevance=None,
        gate_forcing=None,
        **kwargs,
    ) -> VKOODBlipEncoding:
        """Image tokens, knowledge gated against them, and the question encoded with cross-attention to
        [image tokens ; gate * items] (log(gate) added to the items' attention logits, padded slots masked).

        Training only, as `VKOODModel.fuse`: `gate_forcing` (a share in [0, 1]) with `knowledge_relevance` (B, M),
        the items that state the answer, teacher-forces the gate the question encoder sees
        (`ImplicitOODLayer.forward`); the OOD layer receives both, so the trainer's alignment loss reads them."""
        if pixel_values is None or input_ids is None:
            raise ValueError("VK-OOD-BLIP needs both `pixel_values` and `input_ids`")
        check_inputs(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask, knowledge_mask
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_embeds = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        ).last_hidden_state
        batch = image_embeds.shape[0]
        if knowledge_input_ids is None:
            # No knowledge is zero item slots: the knowledge projection still runs (on nothing), so the same
            # parameters are used whatever a batch holds (DDP).
            knowledge_input_ids = input_ids.new_zeros(batch, 0, 0)
            knowledge_attention_mask = knowledge_mask = None
        knowledge_mask = knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
        items = self.encode_knowledge(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
        ood = self.ood(
            image_embeds,
            items,
            knowledge_mask=knowledge_mask,
            knowledge_relevance=knowledge_relevance,
            gate_forcing=gate_forcing,
        )
        dtype = image_embeds.dtype
        memory = torch.cat([image_embeds, items.to(dtype) * ood.gate.to(dtype).unsqueeze(-1)], dim=1)
        minimum = torch.finfo(dtype).min
        log_gate = ood.log_gate.to(dtype).clamp_min(minimum).masked_fill(knowledge_mask == 0, minimum)
        memory_bias = torch.cat([image_embeds.new_zeros(batch, image_embeds.shape[1]), log_gate], dim=1)
        question_embeds = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_bias[:, None, None, :],
            **kwargs,
        ).last_hidden_state
        return VKOODBlipEncoding(
            question_embeds=question_embeds,
            question_attention_mask=attention_mask,
            image_embeds=image_embeds,
            ood_scores=ood.scores,
            ood_gate=ood.gate,
            ood_iterations=ood.iterations,
            ood_residual=ood.residual,
        )

    def decode(self, encoding: VKOODBlipEncoding, decoder_input_ids, decoder_attention_mask=None, **kwargs):
        """The answer decoder's outputs for `decoder_input_ids` (R, T), whose rows read the questions of
        `encoding` (R = B) with the question padding masked in the cross-attention, as BLIP's `question_atts`."""
        return self.text_decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoding.question_embeds,
            encoder_attention_mask=additive_mask(encoding.question_attention_mask, encoding.question_embeds.dtype),
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        attention_mask=None,
        labels=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        answer_weights=None,
        interpolate_pos_encoding=False,
        return_dict=None,
        knowledge_relevance=None,
        gate_forcing=None,
        **kwargs,
    ):
        """transformers' `BlipForQuestionAnswering.forward` with knowledge; a `VKOODBlipOutput`.

        One answer per question, as transformers: `labels` (B, T) with -100 where no loss is taken, and
        `decoder_input_ids` (default: `labels`, as transformers does). The decoder predicts token t + 1 from tokens
        <= t; the loss is the mean token cross-entropy (BLIP's text config's label smoothing) over the batch.

        Several weighted answers per question, as BLIP's VQA training: `labels` and `decoder_input_ids` (B, A, T)
        (`VKOODBlipProcessor.answer_targets`), `answer_weights` (B, A) (e.g. VQA soft scores; 0 for padded answer
        slots, whose labels are all -100). Each answer's loss is the sum over its tokens; the loss is the weighted
        sum over answers, averaged over the questions, as BLIP's `loss = (weights * loss).sum() / batch`.

        `knowledge_relevance` and `gate_forcing` (training only): as in `encode`.
        """
        if labels is None and decoder_input_ids is None:
            raise ValueError(
                "Either `decoder_input_ids` or `labels` should be passed when calling `forward` with "
                "`VKOODBlipForQuestionAnswering`: `labels` to train, `decoder_input_ids` for the decoder's logits; "
                "to answer, call `generate` or `rank_answers`"
            )
        if decoder_input_ids is None:
            decoder_input_ids = labels
        encoding = self.encode(
            input_ids,
            pixel_values,
            attention_mask,
            knowledge_input_ids,
            knowledge_attention_mask,
            knowledge_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            knowledge_relevance=knowledge_relevance,
            gate_forcing=gate_forcing,
        )
        several = decoder_input_ids.dim() == 3
        if several:
            answers = decoder_input_ids.shape[1]
            per_answer = lambda tensor: None if tensor is None else tensor.flatten(0, 1)
            decoder_input_ids, decoder_attention_mask, labels = map(
                per_answer, (decoder_input_ids, decoder_attention_mask, labels)
            )
            encoding_rows = VKOODBlipEncoding(
                question_embeds=encoding.question_embeds.repeat_interleave(answers, 0),
                question_attention_mask=encoding.question_attention_mask.repeat_interleave(answers, 0),
            )
        else:
            encoding_rows = encoding
        reduction = "none" if several else "mean"
        decoded = self.decode(
            encoding_rows, decoder_input_ids, decoder_attention_mask, labels=labels, reduction=reduction, **kwargs
        )
        loss = decoded.loss
        logits = decoded.logits
        if several:
            logits = logits.unflatten(0, (-1, answers))
            if loss is not None:
                weights = torch.ones(logits.shape[:2], device=loss.device) if answer_weights is None else answer_weights
                loss = (weights.to(loss.dtype) * loss.view(-1, answers)).sum() / weights.shape[0]
        output = VKOODBlipOutput(
            loss=loss,
            logits=logits,
            image_embeds=encoding.image_embeds,
            last_hidden_state=encoding.image_embeds,
            question_embeds=encoding.question_embeds,
            ood_scores=encoding.ood_scores,
            ood_gate=encoding.ood_gate,
            ood_iterations=encoding.ood_iterations,
            ood_residual=encoding.ood_residual,
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------------------------------------ answers
    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        interpolate_pos_encoding=False,
        memory: VKOODBlipEncoding | None = None,
        **generate_kwargs,
    ):
        """The answer decoder's `generate` from BLIP's decoder start token, reading the encoded questions, as
        transformers' `BlipForQuestionAnswering.generate` (end at [SEP], pad with [PAD]); every `generate_kwargs`
        option (num_beams, max_new_tokens, return_dict_in_generate, ...) is the decoder's. `memory`: an `encode`
        output, instead of the inputs."""
        if memory is None:
            memory = self.encode(
                input_ids,
                pixel_values,
                attention_mask,
                knowledge_input_ids,
                knowledge_attention_mask,
                knowledge_mask,
                interpolate_pos_encoding=interpolate_pos_encoding,
            )
        states = memory.question_embeds
        start = torch.full((states.shape[0], 1), self.decoder_start_token_id, dtype=torch.long, device=states.device)
        return self.text_decoder.generate(
            input_ids=start,
            eos_token_id=self.config.text_config.sep_token_id,
            pad_token_id=self.config.text_config.pad_token_id,
            encoder_hidden_states=states,
            encoder_attention_mask=memory.question_attention_mask,
            **generate_kwargs,
        )

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits=False):
        """The answer decoder's `compute_transition_scores` (its vocabulary), for `generate`'s outputs."""
        return self.text_decoder.compute_transition_scores(sequences, scores, beam_indices, normalize_logits)

    @property
    def answer_end_token_id(self) -> int:
        """The token that ends a generated answer ([SEP])."""
        return self.config.text_config.sep_token_id

    @torch.no_grad()
    def rank_answers(
        self,
        answer_input_ids,
        answer_attention_mask=None,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        k=None,
        memory: VKOODBlipEncoding | None = None,
        interpolate_pos_encoding=False,
    ):
        """BLIP's rank inference: the candidates (A of them, `answer_input_ids` (A, T) = [decoder start, tokens,
        [SEP], pad...], `VKOODBlipProcessor.answer_candidates`) are first ranked by the decoder's probability of
        their first token; the top `k` (default `config.k_test`) are re-ranked by their whole log-likelihood
        (every token up to and including [SEP]). Returns (candidate indices (B, k), their log-likelihoods (B, k)),
        best first. The decoder runs once for the first tokens and once for all B * k candidates."""
        if memory is None:
            memory = self.encode(
                input_ids,
                pixel_values,
                attention_mask,
                knowledge_input_ids,
                knowledge_attention_mask,
                knowledge_mask,
                interpolate_pos_encoding=interpolate_pos_encoding,
            )
        if answer_attention_mask is None:
            answer_attention_mask = (answer_input_ids != self.decoder_pad_token_id).long()
        states = memory.question_embeds
        batch, candidates = states.shape[0], answer_input_ids.shape[0]
        k = min(self.config.k_test if k is None else k, candidates)
        start = answer_input_ids[:1, :1].expand(batch, 1)
        first_logits = self.decode(memory, start).logits[:, 0].float()
        first_log_probs = first_logits.log_softmax(-1).index_select(1, answer_input_ids[:, 1])  # (B, A)
        top = first_log_probs.topk(k, dim=-1).indices  # (B, k)
        ids = answer_input_ids[top].flatten(0, 1)
        mask = answer_attention_mask[top].flatten(0, 1)
        rows = VKOODBlipEncoding(
            question_embeds=states.repeat_interleave(k, 0),
            question_attention_mask=memory.question_attention_mask.repeat_interleave(k, 0),
        )
        # log p(token) = its logit - logsumexp(logits): no second (B * k, T, V) tensor (BLIP's k is 128)
        logits = self.decode(rows, ids, mask).logits[:, :-1].float()
        token_log_probs = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
        log_likelihood = (token_log_probs * mask[:, 1:]).sum(-1).view(batch, k)
        order = log_likelihood.argsort(dim=-1, descending=True, stable=True)
        return top.gather(1, order), log_likelihood.gather(1, order)

    # ------------------------------------------------------------------------------------------------ PEFT
    def lora_target_modules(self, projections=None, layers=None):
        """PEFT `target_modules` regex: BLIP's attention projections (`projections`, default `lora_projections`) in
        the vision tower, the question encoder and the answer decoder (`config.pretrained_backbones`), in every
        block or only in blocks `layers` (`layers.N` in the vision tower, `layer.N` in the text modules); the
        VK-OOD modules are never adapted."""
        return lora_target_regex(self.config.pretrained_backbones, projections or self.lora_projections, layers)

    def modules_to_save(self):
        """PEFT `modules_to_save`: the VK-OOD modules, trained in full next to the adapters."""
        return ["knowledge_projection", "ood"]


VKOODBlipForQuestionAnswering.register_for_auto_class("AutoModelForVisualQuestionAnswering")

__all__ = ["VKOODBlipForQuestionAnswering", "VKOODBlipPreTrainedModel", "VKOODBlipOutput", "VKOODBlipEncoding"]

"""Output dataclasses of the VK-OOD models, and the one place that fills their OOD and fusion fields (Hub remote
code: torch and transformers only)."""

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

# The attention probabilities of a fusion layer, in the order `VKOODFusionLayer` returns them (fields of the outputs).
FUSION_ATTENTIONS = ("text_self_attentions", "text_cross_attentions", "image_self_attentions", "image_cross_attentions")
# transformers' standard fields, which tools (pipelines, attention visualisers, the common model tests) read. They hold
# the text stream's, [text ; knowledge], the one the answer is read from, as transformers' multimodal models make the
# text stream the main one; each is the same tuple as its per-stream field.
STANDARD_FIELDS = {
    "hidden_states": "text_hidden_states",
    "attentions": "text_self_attentions",
    "cross_attentions": "text_cross_attentions",
}
# Everything `output_hidden_states` / `output_attentions` add to the outputs.
FUSION_OUTPUTS = tuple(STANDARD_FIELDS) + ("text_hidden_states", "image_hidden_states") + FUSION_ATTENTIONS
# The OOD diagnostics of a fused pass, as every output names them.
OOD_OUTPUTS = ("ood_scores", "ood_gate", "ood_iterations", "ood_residual")


@dataclass
class VKOODModelOutput(ModelOutput):
    """Fused states and the OOD diagnostics.

    last_hidden_state: text stream [text ; knowledge] (B, L + M, H); image_last_hidden_state (B, N, H);
    pooler_output: concat(pooled text CLS, pooled image CLS) (B, 2H); ood_scores / ood_gate (B, M);
    ood_iterations (B,) EM steps of each example; ood_residual (B,) its last relative change.

    With `output_hidden_states=True` (default `config.output_hidden_states`), per stream a tuple of
    `config.num_fusion_layers + 1` states: the fusion's input (token-type embeddings added, knowledge scaled by its
    gate) and the output of each co-attention layer, the last equal to the last hidden state:
    text_hidden_states (B, L + M, H) each; image_hidden_states (B, N, H) each. An index or a list of indices instead
    of True keeps those states only (the others are None), as in transformers.

    With `output_attentions=True` (default `config.output_attentions`; under sdpa or flex attention, which do not
    compute the probabilities, that call's fusion attention runs in eager, with a warning), per attention a tuple of
    one tensor per co-attention layer, (B, heads, queries, keys), softmax over the keys:
    text_self_attentions (B, heads, L + M, L + M); text_cross_attentions, the text stream over the image tokens
    (B, heads, L + M, N); image_self_attentions (B, heads, N, N); image_cross_attentions, the image over
    [text ; knowledge] (B, heads, N, L + M). Padded keys and hard-gated-out knowledge items get weight 0; soft-gated
    items are down-weighted by their gate (their logits carry log(gate)).

    transformers' standard fields hold the text stream's: `hidden_states` is `text_hidden_states`, `attentions`
    `text_self_attentions` and `cross_attentions` `text_cross_attentions` (the same tuples).

    `return_dict=False` gives `to_tuple()`: the fields that are set, in the order of the dataclass.
    """

    last_hidden_state: torch.FloatTensor | None = None
    image_last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
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


@dataclass
class VKOODClassificationOutput(ModelOutput):
    """Loss and logits of the VQA and NLVR2 heads, with the pooled output and OOD diagnostics of the fused pass.

    The hidden states and attentions (when asked for) are those of `VKOODModelOutput`; NLVR2 fuses each image of a
    pair separately, so its tensors carry a pair axis after the batch: (B, 2, ...), as its `ood_scores` do.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
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


@dataclass
class VKOODRetrievalOutput(ModelOutput):
    """ITC + ITM loss; `logits_per_image` (B, B) ITC similarities; `itm_logits` (B, 2) and `rank_scores` (B,), the
    score `rank_gallery` re-ranks with (see `VKOODForImageTextRetrieval`), for the given pairs.

    The hidden states and attentions (when asked for) are those of `VKOODModelOutput` for the fused (ITM) pass of
    the given pairs (B, ...); the hard-negative pairs of the training loss are left out, as in `itm_logits`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    rank_scores: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
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


def fused_fields(fused, select=lambda tensor: tensor):
    """The OOD diagnostics of `fused` (a `VKOODModelOutput`) and the hidden states and attentions it holds, as keyword
    fields of a head's output, each tensor passed through `select` (a head keeps its given pairs, or groups NLVR2's
    pairs); hidden states left out by an index selection stay None."""
    fields = {name: select(getattr(fused, name)) for name in OOD_OUTPUTS}
    fields.update(
        {
            name: tuple(None if tensor is None else select(tensor) for tensor in getattr(fused, name))
            for name in FUSION_OUTPUTS
            if getattr(fused, name) is not None
        }
    )
    return fields


__all__ = ["VKOODModelOutput", "VKOODClassificationOutput", "VKOODRetrievalOutput", "fused_fields"]

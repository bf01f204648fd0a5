"""VK-OOD models (Hub remote code: imports torch, transformers, the standard library and its two siblings only).

VKOODModel encodes the image, the text and the knowledge items, gates the knowledge with the implicit OOD layer
and fuses [text ; gated knowledge] with the image through METER-style co-attention layers. Task heads:
VQA (VKOODForQuestionAnswering), NLVR2 (VKOODForImagesAndTextClassification), retrieval (VKOODForImageTextRetrieval).
"""

import inspect
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import ModelOutput

from .configuration_vkood import VKOODConfig
from .ood_vkood import ImageFit, ImplicitOODLayer

TEXT_TYPE, IMAGE_TYPE, KNOWLEDGE_TYPE = 0, 1, 2
NON_FINITE_PIXELS = "pixel_values contains NaN or Inf; check the image files and the image processor"


@dataclass
class VKOODModelOutput(ModelOutput):
    """Fused states and the OOD diagnostics.

    last_hidden_state: text stream [text ; knowledge] (B, L + M, H); image_last_hidden_state (B, N, H);
    pooler_output: concat(pooled text CLS, pooled image CLS) (B, 2H); ood_scores / ood_gate (B, M);
    ood_iterations (B,) EM steps of each example; ood_residual (B,) its last relative change;
    ood_alignment_loss: the OOD layer's cross-modal alignment loss (scalar; added by the heads when its weight > 0).

    With `output_hidden_states=True` (default `config.output_hidden_states`), per stream a tuple of
    `config.num_fusion_layers + 1` states: the fusion's input (token-type embeddings added, knowledge scaled by its
    gate) and the output of each co-attention layer, the last equal to the last hidden state:
    text_hidden_states (B, L + M, H) each; image_hidden_states (B, N, H) each.

    With `output_attentions=True` (default `config.output_attentions`; needs `attn_implementation="eager"`), per
    attention a tuple of one tensor per co-attention layer, (B, heads, queries, keys), softmax over the keys:
    text_self_attentions (B, heads, L + M, L + M); text_cross_attentions, the text stream over the image tokens
    (B, heads, L + M, N); image_self_attentions (B, heads, N, N); image_cross_attentions, the image over
    [text ; knowledge] (B, heads, N, L + M). Padded keys and hard-gated-out knowledge items get weight 0; soft-gated
    items are down-weighted by their gate (their logits carry log(gate)).

    `return_dict=False` gives `to_tuple()`: the fields above that are set, in this order.
    """

    last_hidden_state: torch.FloatTensor | None = None
    image_last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    ood_scores: torch.FloatTensor | None = None
    ood_gate: torch.FloatTensor | None = None
    ood_iterations: torch.LongTensor | None = None
    ood_residual: torch.FloatTensor | None = None
    ood_alignment_loss: torch.FloatTensor | None = None
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
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_self_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_self_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class VKOODRetrievalOutput(ModelOutput):
    """ITC + ITM loss; `logits_per_image` (B, B) ITC similarities; `itm_logits` (B, 2) for the given pairs.

    The hidden states and attentions (when asked for) are those of `VKOODModelOutput` for the fused (ITM) pass of
    the given pairs (B, ...); the hard-negative pairs of the training loss are left out, as in `itm_logits`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
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


# Vision towers (the CLIP family) whose `post_layernorm` normalises the pooled CLS token only, not
# `last_hidden_state`. VK-OOD uses every token, so it applies that layer norm to all of them (METER does the same with
# CLIP's `ln_post`): the pretrained norm stays in use and every weight gets a gradient (DDP requires it).
POOLED_ONLY_POST_LAYERNORM = frozenset(
    {
        "clip_vision_model",
        "chinese_clip_vision_model",
        "altclip_vision_model",
        "metaclip_2_vision_model",
        "xclip_vision_model",
        "owlvit_vision_model",
        "owlv2_vision_model",
        "clipseg_vision_model",
        "mlcd_vision_model",
    }
)


def backbone_kwargs(config):
    """Drop the pooler where the backbone allows it (BERT, RoBERTa, ViT): VK-OOD never uses it, and unused weights
    break DDP."""
    model_class = MODEL_MAPPING.get(type(config), None)
    if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


def check_inputs(
    pixel_values=None,
    input_ids=None,
    attention_mask=None,
    knowledge_input_ids=None,
    knowledge_attention_mask=None,
    knowledge_mask=None,
):
    """Fail at the door, naming every size, instead of deep inside the fusion with a shape error."""
    given = {
        name: tensor
        for name, tensor in (
            ("pixel_values", pixel_values),
            ("input_ids", input_ids),
            ("attention_mask", attention_mask),
            ("knowledge_input_ids", knowledge_input_ids),
            ("knowledge_attention_mask", knowledge_attention_mask),
            ("knowledge_mask", knowledge_mask),
        )
        if tensor is not None
    }
    if len({tensor.shape[0] for tensor in given.values()}) > 1:
        sizes = ", ".join(f"{name} {tensor.shape[0]}" for name, tensor in given.items())
        raise ValueError(f"batch sizes differ: {sizes}")
    if attention_mask is not None and input_ids is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if knowledge_input_ids is not None:
        if knowledge_attention_mask is not None and knowledge_attention_mask.shape != knowledge_input_ids.shape:
            raise ValueError(
                f"knowledge_attention_mask {tuple(knowledge_attention_mask.shape)} does not match "
                f"knowledge_input_ids {tuple(knowledge_input_ids.shape)}"
            )
        if knowledge_mask is not None and knowledge_mask.shape != knowledge_input_ids.shape[:2]:
            raise ValueError(
                f"knowledge_mask {tuple(knowledge_mask.shape)} does not match the (batch, items) of "
                f"knowledge_input_ids {tuple(knowledge_input_ids.shape)}"
            )


def knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask=None, knowledge_mask=None):
    """(B, M) mask of the real knowledge items: the given `knowledge_mask`, else the items with at least one real
    token in `knowledge_attention_mask` (the processor pads missing items with all-zero rows), else every item.

    The one definition used by every entry point, so that leaving `knowledge_mask` out never turns padded item
    slots into real (zero-vector) items that the OOD layer would score and gate in.
    """
    if knowledge_mask is not None:
        return knowledge_mask
    if knowledge_attention_mask is not None:
        return knowledge_attention_mask.any(-1).long()
    return torch.ones(knowledge_input_ids.shape[:2], dtype=torch.long, device=knowledge_input_ids.device)


def _builds_transformers_masks(model):
    """Whether `model`'s module builds its attention masks with transformers' `create_bidirectional_mask`, which
    takes an already prepared 4D mask as it is."""
    return (
        getattr(sys.modules.get(type(model).__module__), "create_bidirectional_mask", None) is create_bidirectional_mask
    )


def _key_bias(mask, dtype):
    """Additive attention bias (B, 1, 1, L): 0 for real keys, the dtype's minimum for padding."""
    return ((1.0 - mask.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0):
    """Attention in plain torch ops, the "eager" implementation and the reference of the others: softmax(q k^T *
    scaling + mask) v with the softmax in float32. Returns the attended values (B, Lq, heads, d) and the attention
    probabilities (B, heads, Lq, Lk), after dropout as in transformers' eager attentions."""
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask
    weights = F.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class VKOODAttention(nn.Module):
    """Multi-head attention of the fusion, run by the implementation `attn_implementation` names through
    transformers' attention interface: "eager", "sdpa", "flex_attention" or any function registered with
    `AttentionInterface.register` (flash attention is refused at construction, see `VKOODPreTrainedModel`). The model
    passes its `config._attn_implementation` at every call rather than each layer keeping a config: copies of the
    layers (PEFT's `modules_to_save`) then follow `set_attn_implementation` too.

    Non-causal; in cross-attention the queries and keys come from different streams of different lengths. `bias`
    (B, 1, 1, Lk), added to the attention logits, carries the padding of the keys and the log-gate of the knowledge
    items; every implementation receives it as the float mask (B, 1, Lq, Lk) (a broadcast view, no copy), so its
    gradient reaches the gate. Returns the attended states (B, Lq, H) and the attention probabilities
    (B, heads, Lq, Lk) where the implementation computes them (eager), else None. transformers' flex_attention takes
    no attention dropout: train with it only at `attention_probs_dropout_prob=0` (it raises otherwise).
    """

    is_causal = False  # read by the sdpa and flash implementations

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.attention_probs_dropout_prob

    def _heads(self, states):
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries, keys, bias, attn_implementation):
        query, key, value = self._heads(self.query(queries)), self._heads(self.key(keys)), self._heads(self.value(keys))
        mask = None if bias is None else bias.to(query.dtype).expand(-1, -1, query.shape[2], -1)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
        attended, weights = attention(
            self, query, key, value, mask, scaling=self.scaling, dropout=self.dropout if self.training else 0.0
        )
        return self.output(attended.flatten(2)), weights


class VKOODFusionBlock(nn.Module):
    """One stream of a co-attention layer: self-attention, cross-attention to the other stream, feed-forward.
    Returns the new states and the self- and cross-attention probabilities (None outside eager)."""

    def __init__(self, config):
        super().__init__()
        self.self_attention = VKOODAttention(config)
        self.self_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attention = VKOODAttention(config)
        self.cross_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, states, self_bias, other, other_bias, attn_implementation):
        attended, self_weights = self.self_attention(states, states, self_bias, attn_implementation)
        states = self.self_norm(states + self.dropout(attended))
        attended, cross_weights = self.cross_attention(states, other, other_bias, attn_implementation)
        states = self.cross_norm(states + self.dropout(attended))
        states = self.output_norm(states + self.dropout(self.output(self.activation(self.intermediate(states)))))
        return states, self_weights, cross_weights


# The attention probabilities of a fusion layer, in the order `VKOODFusionLayer` returns them (fields of the outputs).
FUSION_ATTENTIONS = ("text_self_attentions", "text_cross_attentions", "image_self_attentions", "image_cross_attentions")
# Everything `output_hidden_states` / `output_attentions` add to the outputs.
FUSION_OUTPUTS = ("text_hidden_states", "image_hidden_states") + FUSION_ATTENTIONS


class VKOODFusionLayer(GradientCheckpointingLayer):
    """Co-attention layer (METER): both streams attend to themselves and to the other stream's input states.

    Returns a flat tuple (gradient checkpointing keeps flat tuples): the new text and image states, then the four
    attention probabilities in `FUSION_ATTENTIONS` order (None outside eager)."""

    def __init__(self, config):
        super().__init__()
        self.text_block = VKOODFusionBlock(config)
        self.image_block = VKOODFusionBlock(config)

    def forward(self, text_states, image_states, text_bias, image_bias, attn_implementation):
        new_text, text_self, text_cross = self.text_block(
            text_states, text_bias, image_states, image_bias, attn_implementation
        )
        new_image, image_self, image_cross = self.image_block(
            image_states, image_bias, text_states, text_bias, attn_implementation
        )
        return new_text, new_image, text_self, text_cross, image_self, image_cross


class VKOODPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, states):
        return torch.tanh(self.dense(states[:, 0]))


class VKOODLogitScale(nn.Module):
    """The learnable ITC temperature as log scale (CLIP's 1/0.07 start), in a module of its own so that LoRA runs
    can list it in PEFT's `modules_to_save`: a bare parameter on the task model would stay frozen. The scale is
    clamped to at most 100, as CLIP does, so that the contrastive logits cannot grow without bound."""

    max_scale = 100.0

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(
            torch.full((1,), math.log(1 / 0.07))
        )  # (1,): DeepSpeed ZeRO cannot broadcast 0-dim

    def forward(self):
        return self.log_scale.exp().clamp(max=self.max_scale)


class _GatherWithGradient(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands every process the summed gradient of its own slice: each
    process's loss also depends on the features of the others (as contrastive keys)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank, ctx.size = torch.distributed.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def _world():
    """(rank, world size) of the torch.distributed run, (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def contrastive_loss(image_embeds, text_embeds, scale, image_ids=None, gather=False):
    """Symmetric InfoNCE (ITC); with `gather` under torch.distributed, this process's pairs against the global batch.

    Each process scores its B images against the texts of every process and its B texts against every image
    (ALBEF/CLIP: the negatives come from the global batch); pairs whose `image_ids` agree (several captions of one
    image) are all positives, with equal target weight. The mean of the processes' losses equals the loss of one
    process holding the global batch, and so do the gradients that DDP averages. Every process must hold the same
    batch size (the Trainer's data loaders keep batches even across processes).
    """
    batch, device = image_embeds.shape[0], image_embeds.device
    rank, world = _world() if gather else (0, 1)
    all_images, all_texts, all_ids = image_embeds, text_embeds, image_ids
    if world > 1:
        all_images, all_texts = _GatherWithGradient.apply(image_embeds), _GatherWithGradient.apply(text_embeds)
        if image_ids is not None:
            parts = [torch.empty_like(image_ids) for _ in range(world)]
            torch.distributed.all_gather(parts, image_ids.contiguous())
            all_ids = torch.cat(parts)
    if image_ids is None:  # each pair is its own image: its position in the global batch
        image_ids = torch.arange(batch, device=device) + rank * batch
        all_ids = torch.arange(all_images.shape[0], device=device)
    positives = (image_ids[:, None] == all_ids[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-F.log_softmax(scale * image_embeds @ all_texts.t(), 1) * targets, 1).mean()
        + torch.sum(-F.log_softmax(scale * text_embeds @ all_images.t(), 1) * targets, 1).mean()
    )


class VKOODPreTrainedModel(PreTrainedModel):
    config_class = VKOODConfig
    config: VKOODConfig
    base_model_prefix = "vkood"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The Trainer/loss contract: every head returns a loss already averaged over its own batch and takes no loss
    # kwargs (`num_items_in_batch`), so the Trainer divides it by the gradient accumulation steps and never multiplies
    # it by the number of processes (`average_tokens_across_devices`). The Trainer reads this flag through PEFT.
    accepts_loss_kwargs = False
    _no_split_modules = ["VKOODFusionLayer"]
    # The fusion attention (VKOODAttention) runs through transformers' attention interface: `attn_implementation=`
    # in from_pretrained / from_config / the config, or `set_attn_implementation`, picks "eager", "sdpa" (the default)
    # or "flex_attention"; a string also applies to the backbones, a dict sets each of them ({"": fusion,
    # "vision_config": ..., "text_config": ...}). As in transformers, the choice is not saved with the checkpoint.
    _supports_sdpa = True
    _supports_flex_attn = True
    # Refused with the reason (`_flash_attn_can_dispatch`): the fusion needs an additive float bias.
    _supports_flash_attn = False
    # The forward takes no attention kwargs to pass down to the attention layers (the TGI / vLLM backend contract).
    _supports_attention_backend = False

    def _flash_attn_can_dispatch(self, flash_attn_version, is_init_check=False):
        """Refuse flash attention for the fusion with the reason and the alternatives (transformers calls this when
        `attn_implementation="flash_attention_N"` is asked for the model itself)."""
        raise ValueError(
            f"VK-OOD's fusion attention cannot run on flash attention {flash_attn_version}: it adds a float bias to "
            "the attention logits, log(gate) of every knowledge item (soft in training), and the image stream's "
            "cross-attention masks the padding of the [text ; knowledge] keys only, neither of which flash kernels "
            'take. Use attn_implementation="sdpa" (its memory-efficient kernel takes the bias) or '
            '"flex_attention", or give flash attention to the backbones only: attn_implementation={"": "sdpa", '
            f'"vision_config": "flash_attention_{flash_attn_version}", '
            f'"text_config": "flash_attention_{flash_attn_version}"}}.'
        )

    def _returned(self, output, return_dict=None):
        """`output`, or its tuple of set fields (`ModelOutput.to_tuple`) when `return_dict` (default
        `config.return_dict`) is False, as transformers' models return."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ImplicitOODLayer):
            init.constant_(module.threshold, self.config.ood_threshold)
            init.constant_(module.threshold_calibrated, self.config.ood_calibration_quantile is None)
        elif isinstance(module, VKOODLogitScale):
            init.constant_(module.log_scale, math.log(1 / 0.07))

    # Attention projections that LoRA adapts: CLIP and most ViTs name them q_proj/k_proj/v_proj, BERT-family
    # encoders query/key/value. Fusion attention is new and trained in full, never adapted.
    lora_projections = ("query", "key", "value", "q_proj", "k_proj", "v_proj")

    def lora_target_modules(self, projections=None, layers=None):
        """PEFT `target_modules` regex: the attention `projections` (default `lora_projections`) of the backbones
        that hold pretrained weights (`config.pretrained_backbones`), in every transformer block or only in blocks
        `layers` (numbered `layer.N` in BERT/RoBERTa, `layers.N` in CLIP/ViT)."""
        if not self.config.pretrained_backbones:
            raise ValueError(
                "LoRA needs a pretrained backbone, and this model has none (config.pretrained_backbones "
                "is empty): fine-tune it in full"
            )
        backbones = "|".join(self.config.pretrained_backbones)
        projections = "|".join(projections or self.lora_projections)
        blocks = "" if layers is None else r"layers?\.(" + "|".join(str(layer) for layer in layers) + r")\..*"
        return rf"(.*\.)?({backbones})\..*{blocks}\.({projections})"

    def modules_to_save(self):
        """PEFT `modules_to_save`: all that VK-OOD adds to the backbones (projections, OOD layer, fusion layers,
        poolers, head) and every backbone not in `config.pretrained_backbones` (one trained from scratch), fully
        trained next to the adapters. Dotted paths, because PEFT matches names by suffix and a bare "ood" would
        also match "vkood"; list items one by one (PEFT cannot wrap a ModuleList)."""
        adapted_backbones = self.config.pretrained_backbones
        base = self.base_model
        prefix = "" if base is self else f"{self.base_model_prefix}."
        children = [(prefix + name, child) for name, child in base.named_children() if name not in adapted_backbones]
        children += [(name, child) for name, child in self.named_children() if child is not base]
        names = []
        for name, child in children:
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                names.extend(f"{name}.{key}" for key, _ in child.named_children())
            else:
                names.append(name)
        return names

    @classmethod
    def from_vision_text_pretrained(cls, vision_model_name_or_path, text_model_name_or_path, **kwargs):
        """Build a VK-OOD model around two pretrained backbones (Hub ids or local folders); the rest is new.

        A composite vision checkpoint (e.g. `openai/clip-vit-base-patch16`) contributes its vision tower only.
        `kwargs` set VKOODConfig fields (`num_labels`, `hidden_size`, `ood_*`, ...).
        """
        vision_config = AutoConfig.from_pretrained(vision_model_name_or_path)
        vision_config = getattr(vision_config, "vision_config", None) or vision_config
        vision_model = AutoModel.from_pretrained(
            vision_model_name_or_path, config=vision_config, **backbone_kwargs(vision_config)
        )
        text_config = AutoConfig.from_pretrained(text_model_name_or_path)
        text_model = AutoModel.from_pretrained(
            text_model_name_or_path, config=text_config, **backbone_kwargs(text_config)
        )
        config = VKOODConfig(
            vision_config=vision_model.config.to_dict(),
            text_config=text_model.config.to_dict(),
            pretrained_backbones=["vision_model", "text_model"],
            **kwargs,
        )
        model = cls(config)
        model.base_model.vision_model = vision_model
        model.base_model.text_model = text_model
        vision_model.config = model.config.vision_config
        text_model.config = model.config.text_config
        return model


class VKOODModel(VKOODPreTrainedModel):
    """Backbones, knowledge encoder, implicit OOD layer and co-attention fusion; returns fused states (no head)."""

    # True: always take the fixed-shape path without host reads, which accelerators and torch.compile get anyway
    # (tests and benchmarks set it on the CPU). Not saved: it changes no result, only how it is computed.
    force_fixed_shapes = False

    def __init__(self, config: VKOODConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config, **backbone_kwargs(config.vision_config))
        self.text_model = AutoModel.from_config(config.text_config, **backbone_kwargs(config.text_config))
        vision_width = getattr(config.vision_config, "hidden_size", None) or config.vision_config.hidden_sizes[-1]
        self.image_projection = nn.Linear(vision_width, config.hidden_size)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.hidden_size)
        self.knowledge_projection = nn.Linear(config.text_config.hidden_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(3, config.hidden_size)
        self.ood = ImplicitOODLayer(config)
        self.fusion_layers = nn.ModuleList([VKOODFusionLayer(config) for _ in range(config.num_fusion_layers)])
        self.text_pooler = VKOODPooler(config)
        self.image_pooler = VKOODPooler(config)
        self.post_init()

    def _fixed_shapes(self, tensor):
        """Whether to avoid data-dependent shapes and host reads: on an accelerator each one drains the launch queue,
        under torch.compile each breaks the graph. On the CPU (no queue to drain) the shortcuts stay: distinct texts
        encoded once, a ValueError for bad pixels."""
        return self.force_fixed_shapes or tensor.device.type != "cpu" or torch.compiler.is_compiling()

    def encode_image(self, pixel_values):
        """Vision tokens projected to the fusion width, (B, N, H); feature maps (B, C, h, w) become h*w tokens.

        Non-finite pixels raise a ValueError on the CPU; on the fixed-shape path `torch._assert_async` checks them
        without a host read (on CUDA a device-side assertion that stops the process; the processor rejects
        non-finite images before that)."""
        finite = torch.isfinite(pixel_values).all()
        if self._fixed_shapes(pixel_values):
            torch._assert_async(finite, NON_FINITE_PIXELS)
        elif not finite:
            raise ValueError(NON_FINITE_PIXELS)
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        if hidden.dim() == 4:
            hidden = hidden.flatten(2).transpose(1, 2)
            hidden = torch.cat([hidden.mean(1, keepdim=True), hidden], dim=1)
        elif self.config.vision_config.model_type in POOLED_ONLY_POST_LAYERNORM:
            hidden = getattr(self.vision_model, "vision_model", self.vision_model).post_layernorm(hidden)
        return self.image_projection(hidden)

    def _text_states(self, input_ids, attention_mask):
        """Text-encoder states (R, L, W); masked tokens become the pad token, so that equal rows give equal states.

        On the fixed-shape path the 4D mask is prepared here as the encoder would prepare it, but without its host
        read of "is any token padded?" (with none, transformers drops the mask for SDPA)."""
        input_ids = input_ids.masked_fill(attention_mask == 0, self.config.text_config.pad_token_id or 0)
        mask = attention_mask
        encoder = self.text_model
        if self._fixed_shapes(input_ids) and not torch.compiler.is_compiling() and _builds_transformers_masks(encoder):
            shape_only = torch.empty(*input_ids.shape, 0, dtype=encoder.dtype, device=input_ids.device)
            mask = create_bidirectional_mask(encoder.config, shape_only, mask, allow_is_bidirectional_skip=False)
        return encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def _encode_distinct(self, input_ids, attention_mask):
        """Text-encoder states of each distinct (tokens, mask) row, encoded once: questions and knowledge items
        repeat a lot within a batch (easy-VQA has 107 distinct questions). Returns (states, mask, inverse) with
        `states[inverse]` the states of every input row. Data-dependent shapes: the CPU path only."""
        keyed = input_ids.masked_fill(attention_mask == 0, -1)
        unique, inverse = torch.unique(keyed, dim=0, return_inverse=True)
        unique_mask = (unique != -1).long()
        return self._text_states(unique, unique_mask), unique_mask, inverse

    def encode_text(self, input_ids, attention_mask=None):
        """Text tokens projected to the fusion width, (B, L, H)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._fixed_shapes(input_ids):
            return self.text_projection(self._text_states(input_ids, attention_mask))
        states, _, inverse = self._encode_distinct(input_ids, attention_mask)
        return self.text_projection(states[inverse])

    def encode_knowledge(self, knowledge_input_ids, knowledge_attention_mask=None, knowledge_mask=None):
        """One vector per knowledge item, (B, M, H): mean-pooled text-encoder states of each item.

        Items repeat a lot within a batch (the same triple for many questions), so on the CPU each distinct item is
        encoded once and scattered back; the fixed-shape path encodes every item slot, padded ones zero-masked.
        """
        batch, items, length = knowledge_input_ids.shape
        knowledge_mask = knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
        if knowledge_attention_mask is None:
            knowledge_attention_mask = torch.ones_like(knowledge_input_ids)
        width = self.config.text_config.hidden_size
        dtype = self.knowledge_projection.weight.dtype
        pooled = knowledge_input_ids.new_zeros(batch * items, width, dtype=dtype)
        valid = knowledge_mask.reshape(-1).bool()
        if items and length and self._fixed_shapes(knowledge_input_ids):
            flat_mask = knowledge_attention_mask.reshape(-1, length)
            # A slot without a real token (padding) attends to its first one, so that no fully masked row reaches
            # the encoder (a softmax over -inf gives NaN in encoders that mask that way, and the zero weights below
            # would not remove it); its vector is zeroed like every padded slot's.
            first_token = (torch.arange(length, device=flat_mask.device) == 0).to(flat_mask.dtype)
            encoder_mask = torch.where(flat_mask.sum(-1, keepdim=True) == 0, first_token, flat_mask)
            states = self._text_states(knowledge_input_ids.reshape(-1, length), encoder_mask)
            weights = (flat_mask * valid.unsqueeze(-1)).unsqueeze(-1).to(states.dtype)
            pooled = ((states * weights).sum(1) / weights.sum(1).clamp_min(1.0)).to(dtype)
        elif items and length:
            flat_ids = knowledge_input_ids.reshape(-1, length)[valid]
            flat_mask = knowledge_attention_mask.reshape(-1, length)[valid]
            if flat_ids.shape[0]:
                states, unique_mask, inverse = self._encode_distinct(flat_ids, flat_mask)
                weights = unique_mask.unsqueeze(-1).to(states.dtype)
                item_vectors = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
                pooled = pooled.index_put((valid.nonzero().squeeze(-1),), item_vectors[inverse].to(dtype))
        return self.knowledge_projection(pooled.view(batch, items, width))

    def fuse(
        self,
        image_tokens,
        text_tokens,
        text_mask,
        knowledge_tokens=None,
        knowledge_mask=None,
        knowledge_relevance=None,
        output_attentions=None,
        output_hidden_states=None,
        image_fit=None,
    ):
        """OOD-gate the knowledge against the image, then run the co-attention layers over both streams.

        `knowledge_relevance` (B, M), optional, training only: the items that state the answer, for the contrastive
        alignment loss (`config.ood_alignment`). `output_attentions` / `output_hidden_states` (default: the
        config's) add the fields described in `VKOODModelOutput`, which this always returns. `image_fit`: the OOD
        layer's `fit_images` of each row's image, when an image's mixture is fitted once for several rows."""
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions needs the eager attention, not {self.config._attn_implementation!r} (which does "
                'not compute the probabilities): load with attn_implementation="eager" or call '
                'model.set_attn_implementation("eager")'
            )
        batch = image_tokens.shape[0]
        if text_tokens.shape[0] != batch or (knowledge_tokens is not None and knowledge_tokens.shape[0] != batch):
            raise ValueError(
                f"batch sizes differ: image {batch}, text {text_tokens.shape[0]}, "
                f"knowledge {None if knowledge_tokens is None else knowledge_tokens.shape[0]}"
            )
        if knowledge_tokens is None:
            knowledge_tokens = image_tokens.new_zeros(batch, 0, image_tokens.shape[-1])
            knowledge_mask = torch.zeros(batch, 0, dtype=torch.long, device=image_tokens.device)
        if knowledge_mask is None:
            knowledge_mask = torch.ones(knowledge_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        ood = self.ood(
            image_tokens,
            knowledge_tokens,
            items_mask=knowledge_mask,
            items_relevance=knowledge_relevance,
            image_fit=image_fit,
        )
        dtype = text_tokens.dtype
        knowledge_tokens = knowledge_tokens * ood.gate.to(dtype).unsqueeze(-1)
        types = self.token_type_embeddings.weight
        text_states = torch.cat([text_tokens + types[TEXT_TYPE], knowledge_tokens + types[KNOWLEDGE_TYPE]], dim=1)
        image_states = image_tokens + types[IMAGE_TYPE]
        # Gated-out items get an attention bias of log(gate): a hard 0 removes them, a soft gate down-weights them.
        minimum = torch.finfo(dtype).min
        log_gate = ood.log_gate.clamp_min(minimum).masked_fill(knowledge_mask == 0, minimum)
        text_bias = torch.cat([_key_bias(text_mask, dtype), log_gate.to(dtype)[:, None, None, :]], dim=-1)
        image_bias = None
        text_history, image_history, attentions = [text_states], [image_states], []
        implementation = self.config._attn_implementation
        for layer in self.fusion_layers:
            # the implementation as a keyword: gradient checkpointing replays the positional (tensor) arguments
            text_states, image_states, *layer_attentions = layer(
                text_states, image_states, text_bias, image_bias, attn_implementation=implementation
            )
            if output_hidden_states:
                text_history.append(text_states)
                image_history.append(image_states)
            if output_attentions:  # kept only when asked: (B, heads, Lq, Lk) per layer and attention is large
                attentions.append(layer_attentions)
        requested = dict(zip(FUSION_ATTENTIONS, zip(*attentions))) if output_attentions else {}
        if output_hidden_states:
            requested.update(text_hidden_states=tuple(text_history), image_hidden_states=tuple(image_history))
        pooled = torch.cat([self.text_pooler(text_states), self.image_pooler(image_states)], dim=-1)
        return VKOODModelOutput(
            last_hidden_state=text_states,
            image_last_hidden_state=image_states,
            pooler_output=pooled,
            ood_scores=ood.scores,
            ood_gate=ood.gate,
            ood_iterations=ood.iterations,
            ood_residual=ood.residual,
            ood_alignment_loss=ood.alignment_loss,
            **requested,
        )

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        knowledge_relevance=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Encode, gate and fuse; a `VKOODModelOutput` (its tuple with `return_dict=False`). `output_attentions`,
        `output_hidden_states` and `return_dict` default to the config's values, as in transformers' models."""
        if pixel_values is None or input_ids is None:
            raise ValueError("VK-OOD needs both `pixel_values` and `input_ids`")
        check_inputs(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask, knowledge_mask
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        knowledge = None
        if knowledge_input_ids is not None:
            knowledge_mask = knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
            knowledge = self.encode_knowledge(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
        output = self.fuse(
            self.encode_image(pixel_values),
            self.encode_text(input_ids, attention_mask),
            attention_mask,
            knowledge,
            knowledge_mask,
            knowledge_relevance,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return self._returned(output, return_dict)


class VKOODGatedProductHead(nn.Module):
    """Classifier over [text ; image ; text * image] of each fused pair through a GeGLU layer (GELU(gate) * value).

    METER's MLP over [text ; image] adds its inputs before the nonlinearity, so an answer that depends on a product
    of three features (the colour named in the question, the colour in the image, and a "not": "is there not a red
    shape?") only shows up in its gradient at second order, and training sits on the answer prior (measured on
    easy-VQA: yes/no stuck at the prior, 82%, for 700 steps; with the answers balanced per question, at 50%). Here the
    elementwise product and the gate make that function trilinear in the pooled vectors: learnable from the start.
    """

    def __init__(self, hidden_size, pairs, num_labels, dropout):
        super().__init__()
        self.hidden_size, self.pairs = hidden_size, pairs
        width, inner = 3 * pairs * hidden_size, 2 * pairs * hidden_size
        self.gate = nn.Linear(width, inner)
        self.value = nn.Linear(width, inner)
        self.norm = nn.LayerNorm(inner)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(inner, num_labels)

    def forward(self, pooled):
        """`pooled` (B, pairs * 2H): the pooler outputs [text ; image] of each fused pair, concatenated."""
        text, image = pooled.unflatten(-1, (self.pairs, 2, self.hidden_size)).unbind(-2)
        features = torch.cat([text, image, text * image], dim=-1).flatten(1)
        return self.output(self.dropout(self.norm(F.gelu(self.gate(features)) * self.value(features))))


def _classifier(config, pairs):
    """The task classifier over the pooled outputs of `pairs` fused (text, image) pairs (`config.classifier_head`)."""
    if config.classifier_head == "gated_product":
        return VKOODGatedProductHead(config.hidden_size, pairs, config.num_labels, config.classifier_dropout)
    width = 2 * pairs * config.hidden_size
    return nn.Sequential(
        nn.Linear(width, width),
        nn.LayerNorm(width),
        nn.GELU(),
        nn.Dropout(config.classifier_dropout),
        nn.Linear(width, config.num_labels),
    )


def _fusion_outputs(fused, select=lambda tensor: tensor):
    """The hidden states and attentions `fused` (a `VKOODModelOutput`) holds, as keyword fields of a head's output,
    each tensor passed through `select` (the heads keep the given pairs, or group NLVR2's pairs)."""
    return {
        name: tuple(map(select, getattr(fused, name))) for name in FUSION_OUTPUTS if getattr(fused, name) is not None
    }


class VKOODForQuestionAnswering(VKOODPreTrainedModel):
    """VQAv2 / OK-VQA / easy-VQA: a classifier over the answer vocabulary, BCE on the soft VQA scores.

    `labels` (B, num_labels) holds each answer's soft score in [0, 1]; the loss is the mean BCE scaled by the
    vocabulary size, as in METER and the bottom-up VQA recipe, so its size does not shrink with the vocabulary.
    """

    def __init__(self, config: VKOODConfig):
        super().__init__(config)
        self.vkood = VKOODModel(config)
        self.classifier = _classifier(config, pairs=1)
        self.post_init()

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        labels=None,
        knowledge_relevance=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """`knowledge_relevance` (B, M), optional: 1 for the items that state the answer (training batches of the
        contrastive OOD alignment, `config.ood_alignment="contrastive"`); ignored otherwise. `output_attentions`,
        `output_hidden_states` and `return_dict` as in `VKOODModel.forward`."""
        outputs = self.vkood(
            pixel_values,
            input_ids,
            attention_mask,
            knowledge_input_ids,
            knowledge_attention_mask,
            knowledge_mask,
            knowledge_relevance,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * labels.shape[-1]
            loss = loss + self.config.ood_alignment_weight * outputs.ood_alignment_loss
        output = VKOODClassificationOutput(
            loss=loss,
            logits=logits,
            pooler_output=outputs.pooler_output,
            ood_scores=outputs.ood_scores,
            ood_gate=outputs.ood_gate,
            ood_iterations=outputs.ood_iterations,
            ood_residual=outputs.ood_residual,
            **_fusion_outputs(outputs),
        )
        return self._returned(output, return_dict)


class VKOODForImagesAndTextClassification(VKOODPreTrainedModel):
    """NLVR2: one sentence, two images (`pixel_values` (B, 2, C, H, W)); each image is fused with the sentence and
    its knowledge, the two pooled outputs are concatenated and classified (2 classes: False, True)."""

    def __init__(self, config: VKOODConfig):
        super().__init__(config)
        self.vkood = VKOODModel(config)
        self.num_images = 2
        self.classifier = _classifier(config, pairs=self.num_images)
        self.post_init()

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """`output_attentions`, `output_hidden_states` and `return_dict` as in `VKOODModel.forward`."""
        if pixel_values is None or pixel_values.dim() != 5 or pixel_values.shape[1] != self.num_images:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(f"pixel_values must have shape (B, {self.num_images}, C, H, W), got {shape}")
        check_inputs(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask, knowledge_mask
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = pixel_values.shape[0]
        base = self.vkood
        # The sentence and its knowledge are encoded once and shared by both images.
        text = base.encode_text(input_ids, attention_mask).repeat_interleave(self.num_images, 0)
        knowledge = None
        if knowledge_input_ids is not None:
            knowledge_mask = knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
            knowledge = base.encode_knowledge(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
            knowledge = knowledge.repeat_interleave(self.num_images, 0)
            knowledge_mask = knowledge_mask.repeat_interleave(self.num_images, 0)
        outputs = base.fuse(
            base.encode_image(pixel_values.flatten(0, 1)),
            text,
            attention_mask.repeat_interleave(self.num_images, 0),
            knowledge,
            knowledge_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        pooled = outputs.pooler_output.reshape(batch, -1)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = (
                F.cross_entropy(logits.float(), labels.long())
                + self.config.ood_alignment_weight * outputs.ood_alignment_loss
            )
        per_pair = lambda tensor: tensor.reshape(batch, self.num_images, *tensor.shape[1:])  # noqa: E731
        output = VKOODClassificationOutput(
            loss=loss,
            logits=logits,
            pooler_output=pooled,
            ood_scores=per_pair(outputs.ood_scores),
            ood_gate=per_pair(outputs.ood_gate),
            ood_iterations=per_pair(outputs.ood_iterations),
            ood_residual=per_pair(outputs.ood_residual),
            **_fusion_outputs(outputs, per_pair),
        )
        return self._returned(output, return_dict)


class VKOODForImageTextRetrieval(VKOODPreTrainedModel):
    """Image-text retrieval (COCO, Flickr30k) as in ALBEF/BLIP: ITC on unimodal CLS projections + ITM on fused pairs
    with hard negatives drawn from the ITC similarities; `rank_gallery` scores a gallery in two stages."""

    def __init__(self, config: VKOODConfig):
        super().__init__(config)
        self.vkood = VKOODModel(config)
        self.image_embedding = nn.Linear(config.hidden_size, config.projection_dim)
        self.text_embedding = nn.Linear(config.hidden_size, config.projection_dim)
        self.logit_scale = VKOODLogitScale()
        self.itm_head = nn.Linear(2 * config.hidden_size, 2)
        self.post_init()

    def _embed(self, projection, tokens):
        return F.normalize(projection(tokens[:, 0]).float(), dim=-1)

    def _itm_scores(self, image_tokens, text_tokens, text_mask, knowledge, knowledge_mask, image_fit=None, **requested):
        """ITM logits (B, 2) and the fused pass; `requested`: fuse's `output_attentions` / `output_hidden_states`."""
        fused = self.vkood.fuse(
            image_tokens, text_tokens, text_mask, knowledge, knowledge_mask, image_fit=image_fit, **requested
        )
        return self.itm_head(fused.pooler_output), fused

    def _fit_images(self, image_tokens, knowledge, chunk=None):
        """Each image's OOD mixture, fitted once for all the pairs it is in (`chunk`: images per EM batch); None
        when there is no knowledge item to score."""
        if knowledge is None or knowledge.shape[1] == 0:
            return None
        chunk = chunk or image_tokens.shape[0]
        fits = [
            self.vkood.ood.fit_images(image_tokens[start : start + chunk])
            for start in range(0, image_tokens.shape[0], chunk)
        ]
        return ImageFit.cat(fits) if len(fits) > 1 else fits[0]

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        image_ids=None,
        return_loss=True,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """`image_ids` (B,) marks pairs that share an image as positives (several captions of one image).
        `output_attentions`, `output_hidden_states` and `return_dict` as in `VKOODModel.forward`."""
        requested = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        check_inputs(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask, knowledge_mask
        )
        base = self.vkood
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_tokens = base.encode_image(pixel_values)
        text_tokens = base.encode_text(input_ids, attention_mask)
        knowledge = None
        if knowledge_input_ids is not None:
            knowledge_mask = knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
            knowledge = base.encode_knowledge(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
        image_embeds = self._embed(self.image_embedding, image_tokens)
        text_embeds = self._embed(self.text_embedding, text_tokens)
        logits_per_image = self.logit_scale() * image_embeds @ text_embeds.t()
        batch = image_tokens.shape[0]
        if image_ids is None:
            positives = torch.eye(batch, dtype=torch.bool, device=image_tokens.device)
        else:
            positives = image_ids[:, None] == image_ids[None, :]
        if not return_loss:
            itm_logits, fused = self._itm_scores(
                image_tokens, text_tokens, attention_mask, knowledge, knowledge_mask, **requested
            )
            output = VKOODRetrievalOutput(
                logits_per_image=logits_per_image,
                logits_per_text=logits_per_image.t(),
                itm_logits=itm_logits,
                image_embeds=image_embeds,
                text_embeds=text_embeds,
                ood_scores=fused.ood_scores,
                ood_gate=fused.ood_gate,
                ood_iterations=fused.ood_iterations,
                ood_residual=fused.ood_residual,
                **_fusion_outputs(fused),
            )
            return self._returned(output, return_dict)
        itc_loss = contrastive_loss(image_embeds, text_embeds, self.logit_scale(), image_ids, gather=self.training)
        # Hard negatives: for each image a text (and for each text an image) drawn with probability softmax(sim)
        # among the non-positives. A row without any negative (batch of one image, or every caption of the batch
        # about the same image) draws an arbitrary index with uniform weights and its pair is left out of the ITM
        # loss; the positive pairs always remain, so the loss stays defined.
        with torch.no_grad():
            logits = logits_per_image.detach().float().masked_fill(positives, float("-inf"))
            has_text_negative = (~positives).any(1)
            has_image_negative = (~positives).any(0)
            text_weights = torch.where(has_text_negative[:, None], logits.softmax(1), 1.0)
            image_weights = torch.where(has_image_negative[:, None], logits.t().softmax(1), 1.0)
            negative_text = torch.multinomial(text_weights, 1).squeeze(1)
            negative_image = torch.multinomial(image_weights, 1).squeeze(1)
        arange = torch.arange(batch, device=image_tokens.device)
        pair_image_index = torch.cat([arange, arange, negative_image])
        pair_image = image_tokens[pair_image_index]
        image_fit = self._fit_images(image_tokens, knowledge)  # one fit per image for its 3 pairs
        pair_text = torch.cat([text_tokens, text_tokens[negative_text], text_tokens])
        pair_mask = torch.cat([attention_mask, attention_mask[negative_text], attention_mask])
        pair_knowledge = pair_knowledge_mask = None
        if knowledge is not None:
            pair_knowledge = torch.cat([knowledge, knowledge[negative_text], knowledge])
            pair_knowledge_mask = torch.cat([knowledge_mask, knowledge_mask[negative_text], knowledge_mask])
        itm_logits, fused = self._itm_scores(
            pair_image,
            pair_text,
            pair_mask,
            pair_knowledge,
            pair_knowledge_mask,
            image_fit=None if image_fit is None else image_fit.select(pair_image_index),
            **requested,
        )
        ignore = torch.full_like(negative_text, -100)
        itm_labels = torch.cat(
            [
                torch.ones_like(negative_text),
                torch.where(has_text_negative, torch.zeros_like(negative_text), ignore),
                torch.where(has_image_negative, torch.zeros_like(negative_image), ignore),
            ]
        )
        itm_loss = F.cross_entropy(itm_logits.float(), itm_labels, ignore_index=-100)
        output = VKOODRetrievalOutput(
            loss=itc_loss + itm_loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            itm_logits=itm_logits[:batch],
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            itc_loss=itc_loss,
            itm_loss=itm_loss,
            ood_scores=fused.ood_scores[:batch],
            ood_gate=fused.ood_gate[:batch],
            ood_iterations=fused.ood_iterations[:batch],
            ood_residual=fused.ood_residual[:batch],
            **_fusion_outputs(fused, lambda tensor: tensor[:batch]),
        )
        return self._returned(output, return_dict)

    @torch.no_grad()
    def encode_gallery_images(self, pixel_values):
        """Image tokens and ITC embeddings of a chunk of the gallery (concatenate chunks along dim 0)."""
        tokens = self.vkood.encode_image(pixel_values)
        return {"tokens": tokens, "embeds": self._embed(self.image_embedding, tokens)}

    @torch.no_grad()
    def encode_gallery_texts(
        self, input_ids, attention_mask, knowledge_input_ids=None, knowledge_attention_mask=None, knowledge_mask=None
    ):
        """Text tokens, knowledge vectors and ITC embeddings of a chunk of the text side of the gallery."""
        tokens = self.vkood.encode_text(input_ids, attention_mask)
        features = {"tokens": tokens, "mask": attention_mask, "embeds": self._embed(self.text_embedding, tokens)}
        if knowledge_input_ids is not None:
            knowledge_mask = knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
            features["knowledge"] = self.vkood.encode_knowledge(
                knowledge_input_ids, knowledge_attention_mask, knowledge_mask
            )
            features["knowledge_mask"] = knowledge_mask
        return features

    @torch.no_grad()
    def rank_gallery(self, images, texts, k_test=None, pair_batch_size=256, image_queries=None, text_queries=None):
        """Two-stage scores: ITC similarity for all pairs, then ITM re-scores the top `k_test` of every query.

        `images` / `texts` are the (padded to a common length) outputs of `encode_gallery_images` /
        `encode_gallery_texts`. Returns (i2t (I, T), t2i (T, I)); re-ranked entries hold ITM logit-margin + ITC
        similarity, the rest keep -100 as in ALBEF so that only re-ranked candidates can reach the top.
        `image_queries` / `text_queries` (index tensors; default all) restrict the work to those queries and return
        only their rows: a distributed evaluation gives each process a share of the queries.
        """
        k_test = k_test or self.config.k_test
        similarity = images["embeds"] @ texts["embeds"].t()
        device = similarity.device
        image_queries = torch.arange(similarity.shape[0], device=device) if image_queries is None else image_queries
        text_queries = torch.arange(similarity.shape[1], device=device) if text_queries is None else text_queries
        # Every gallery image's mixture is fitted once, for all the pairs it is re-ranked in.
        image_fit = self._fit_images(images["tokens"], texts.get("knowledge"), chunk=pair_batch_size)
        i2t = self._rerank(
            similarity[image_queries], image_queries, images, texts, k_test, pair_batch_size, True, image_fit
        )
        t2i = self._rerank(
            similarity.t()[text_queries], text_queries, images, texts, k_test, pair_batch_size, False, image_fit
        )
        return i2t, t2i

    def _rerank(self, similarity, query_ids, images, texts, k_test, pair_batch_size, image_queries, image_fit):
        """Scores of the queries `query_ids` (the rows of `similarity`): ITM margin + ITC on their top k, -100 else."""
        k = min(k_test, similarity.shape[1])
        top_similarity, top_index = similarity.topk(k, dim=1)
        queries = query_ids.repeat_interleave(k)
        candidates = top_index.reshape(-1)
        image_index, text_index = (queries, candidates) if image_queries else (candidates, queries)
        itm = [similarity.new_zeros(0)]
        for start in range(0, queries.numel(), pair_batch_size):
            image_part = image_index[start : start + pair_batch_size]
            text_part = text_index[start : start + pair_batch_size]
            knowledge = texts["knowledge"][text_part] if "knowledge" in texts else None
            knowledge_mask = texts["knowledge_mask"][text_part] if "knowledge_mask" in texts else None
            logits, _ = self._itm_scores(
                images["tokens"][image_part],
                texts["tokens"][text_part],
                texts["mask"][text_part],
                knowledge,
                knowledge_mask,
                image_fit=None if image_fit is None else image_fit.select(image_part),
            )
            itm.append((logits[:, 1] - logits[:, 0]).to(similarity.dtype))
        scores = torch.full_like(similarity, -100.0)
        return scores.scatter(1, top_index, torch.cat(itm).view(-1, k) + top_similarity)


__all__ = [
    "VKOODPreTrainedModel",
    "VKOODModel",
    "VKOODForQuestionAnswering",
    "VKOODForImagesAndTextClassification",
    "VKOODForImageTextRetrieval",
    "VKOODModelOutput",
    "VKOODClassificationOutput",
    "VKOODRetrievalOutput",
]

"""VK-OOD models (Hub remote code: imports torch, transformers, the standard library and its flat siblings only).

VKOODModel encodes the image, the text and the knowledge items, gates the knowledge with the implicit OOD layer
and fuses [text ; gated knowledge] with the image through METER-style co-attention layers. Task heads here: VQA
(VKOODForQuestionAnswering) and NLVR2 (VKOODForImagesAndTextClassification); retrieval is in retrieval_vkood.py, the
generative head in generation_vkood.py.
"""

import inspect
import math
import sys

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import logging

from .classifier_vkood import build_classifier
from .configuration_vkood import VKOODConfig
from .contrastive_vkood import VKOODLogitScale
from .fusion_vkood import VKOODFusionLayer, VKOODPooler, key_bias
from .ood_vkood import ImplicitOODLayer
from .outputs_vkood import (
    FUSION_ATTENTIONS,
    STANDARD_FIELDS,
    VKOODClassificationOutput,
    VKOODModelOutput,
    fused_fields,
)

logger = logging.get_logger(__name__)

NON_FINITE_PIXELS = "pixel_values contains NaN or Inf; check the image files and the image processor"


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
    # compared with the first one, not collected in a set: under torch.export a dynamic batch size is not hashable
    batch = next(iter(given.values())).shape[0] if given else None
    if any(tensor.shape[0] != batch for tensor in given.values()):
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


def selected_states(output_hidden_states, count):
    """The indices of the `count` hidden states that `output_hidden_states` keeps: all for True, else the given index
    or indices (negative ones from the end; out of range ones select nothing), as transformers reads them."""
    if isinstance(output_hidden_states, bool):
        return set(range(count))
    indices = [output_hidden_states] if isinstance(output_hidden_states, int) else output_hidden_states
    return {i % count for i in indices if -count <= i < count}


def _builds_transformers_masks(model):
    """Whether `model`'s module builds its attention masks with transformers' `create_bidirectional_mask`, which
    takes an already prepared 4D mask as it is."""
    return (
        getattr(sys.modules.get(type(model).__module__), "create_bidirectional_mask", None) is create_bidirectional_mask
    )


def transformer_blocks(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's list of transformer blocks (BERT's `encoder.layer`, CLIP's `encoder.layers`, ...)."""
    for module in encoder.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(isinstance(block, GradientCheckpointingLayer) for block in module)
        ):
            return module
    raise ValueError(f"{type(encoder).__name__} has no list of transformer blocks")


def lora_target_regex(backbones, projections, layers=None) -> str:
    """PEFT `target_modules` regex of the attention `projections` inside the modules named `backbones`, in every
    transformer block or only in blocks `layers` (`layer.N` in BERT-style modules, `layers.N` in CLIP/ViT-style)."""
    if not backbones:
        raise ValueError(
            "LoRA needs pretrained backbones, and this model has none (config.pretrained_backbones is empty, e.g. "
            "it was built from configs): fine-tune it in full"
        )
    blocks = "" if layers is None else r"layers?\.(" + "|".join(str(layer) for layer in layers) + r")\..*"
    return rf"(.*\.)?({'|'.join(backbones)})\..*{blocks}\.({'|'.join(projections)})"


def check_knowledge_encoder(encoder: nn.Module, layers: int | None):
    """Refuse `knowledge_encoder_layers` for a text encoder whose first blocks cannot be run alone: the knowledge path
    calls its `embeddings`, builds the mask as transformers' bidirectional encoders do and calls the blocks."""
    if layers is None:
        return
    if getattr(encoder.config, "is_decoder", False) or not hasattr(encoder, "embeddings"):
        raise ValueError(
            f"knowledge_encoder_layers needs a bidirectional encoder with `embeddings` and a block list (BERT "
            f"family); {type(encoder).__name__} is not one: set it to None"
        )
    if not _builds_transformers_masks(encoder):
        raise ValueError(f"knowledge_encoder_layers: {type(encoder).__name__} does not build transformers' masks")
    transformer_blocks(encoder)


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
    # Units that `device_map` never splits: a co-attention layer, and the OOD layer (its forward reads tau itself, a
    # direct parameter that accelerate's hooks load only with the whole layer).
    _no_split_modules = ["VKOODFusionLayer", "ImplicitOODLayer"]
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
            init.constant_(module.threshold, self.config.ood_config.threshold)
            init.constant_(module.threshold_calibrated, False)
        elif isinstance(module, VKOODLogitScale):
            init.constant_(module.log_scale, math.log(1 / 0.07))

    # Attention projections that LoRA adapts: CLIP and most ViTs name them q_proj/k_proj/v_proj, BERT-family
    # encoders query/key/value. Fusion attention is new and trained in full, never adapted.
    lora_projections = ("query", "key", "value", "q_proj", "k_proj", "v_proj")

    def lora_target_modules(self, projections=None, layers=None):
        """PEFT `target_modules` regex: the attention `projections` (default `lora_projections`) of the backbones
        that hold pretrained weights (`config.pretrained_backbones`), in every transformer block or only in blocks
        `layers` (numbered `layer.N` in BERT/RoBERTa, `layers.N` in CLIP/ViT)."""
        return lora_target_regex(self.config.pretrained_backbones, projections or self.lora_projections, layers)

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
        `kwargs` set VKOODConfig fields (`num_labels`, `hidden_size`, `ood_config`, ...).
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

    def __init__(self, config: VKOODConfig, add_pooling_layer: bool = True):
        """`add_pooling_layer=False` (as in BERT) leaves the poolers out, and `pooler_output` None: for a head that
        reads the fused states only (the generative one), where unused pooler weights would break DDP."""
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config, **backbone_kwargs(config.vision_config))
        self.text_model = AutoModel.from_config(config.text_config, **backbone_kwargs(config.text_config))
        check_knowledge_encoder(self.text_model, config.knowledge_encoder_layers)
        vision_width = getattr(config.vision_config, "hidden_size", None) or config.vision_config.hidden_sizes[-1]
        self.image_projection = nn.Linear(vision_width, config.hidden_size)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.hidden_size)
        self.knowledge_projection = nn.Linear(config.text_config.hidden_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(len(config.token_types), config.hidden_size)
        self.ood = ImplicitOODLayer(config.ood_config, config.hidden_size)
        self.fusion_layers = nn.ModuleList([VKOODFusionLayer(config) for _ in range(config.num_fusion_layers)])
        self.text_pooler = VKOODPooler(config) if add_pooling_layer else None
        self.image_pooler = VKOODPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        """The text backbone's word embeddings: questions and knowledge items are both its tokens, so resizing them
        (`resize_token_embeddings`, which every head inherits) resizes the vocabulary of both."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.text_model.set_input_embeddings(value)

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
        resize = {"interpolate_pos_encoding": True} if self.config.interpolate_pos_encoding else {}
        hidden = self.vision_model(pixel_values=pixel_values, **resize).last_hidden_state
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

    def _knowledge_states(self, input_ids, attention_mask):
        """Text-encoder states of knowledge item rows (R, Lk, W): through every block, or with
        `config.knowledge_encoder_layers` N through the embeddings and the first N blocks only, each block called as
        the encoder calls it (so gradient checkpointing, FSDP units and PEFT adapters apply as they do there)."""
        layers = self.config.knowledge_encoder_layers
        if layers is None:
            return self._text_states(input_ids, attention_mask)
        encoder = self.text_model
        input_ids = input_ids.masked_fill(attention_mask == 0, self.config.text_config.pad_token_id or 0)
        hidden = encoder.embeddings(input_ids=input_ids)
        mask = create_bidirectional_mask(
            encoder.config, hidden, attention_mask, allow_is_bidirectional_skip=not self._fixed_shapes(input_ids)
        )
        for block in transformer_blocks(encoder)[:layers]:
            hidden = block(hidden, mask)
        return hidden

    def _encode_distinct(self, input_ids, attention_mask, states=None):
        """Text-encoder states of each distinct (tokens, mask) row, encoded once: questions and knowledge items
        repeat a lot within a batch (easy-VQA has 107 distinct questions). Returns (states, mask, inverse) with
        `states[inverse]` the states of every input row; `states` computes them (default: `_text_states`).
        Data-dependent shapes: the CPU path only."""
        keyed = input_ids.masked_fill(attention_mask == 0, -1)
        unique, inverse = torch.unique(keyed, dim=0, return_inverse=True)
        unique_mask = (unique != -1).long()
        return (states or self._text_states)(unique, unique_mask), unique_mask, inverse

    def encode_text(self, input_ids, attention_mask=None):
        """Text tokens projected to the fusion width, (B, L, H)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._fixed_shapes(input_ids):
            return self.text_projection(self._text_states(input_ids, attention_mask))
        states, _, inverse = self._encode_distinct(input_ids, attention_mask)
        return self.text_projection(states[inverse])

    def encode_knowledge(self, knowledge_input_ids, knowledge_attention_mask=None, knowledge_mask=None):
        """One vector per knowledge item, (B, M, H): mean-pooled text-encoder states of each item (`_knowledge_states`:
        all blocks, or the first `config.knowledge_encoder_layers`).

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
            states = self._knowledge_states(knowledge_input_ids.reshape(-1, length), encoder_mask)
            weights = (flat_mask * valid.unsqueeze(-1)).unsqueeze(-1).to(states.dtype)
            pooled = ((states * weights).sum(1) / weights.sum(1).clamp_min(1.0)).to(dtype)
        elif items and length:
            flat_ids = knowledge_input_ids.reshape(-1, length)[valid]
            flat_mask = knowledge_attention_mask.reshape(-1, length)[valid]
            if flat_ids.shape[0]:
                states, unique_mask, inverse = self._encode_distinct(flat_ids, flat_mask, self._knowledge_states)
                weights = unique_mask.unsqueeze(-1).to(states.dtype)
                item_vectors = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
                pooled = pooled.index_put((valid.nonzero().squeeze(-1),), item_vectors[inverse].to(dtype))
        return self.knowledge_projection(pooled.view(batch, items, width))

    def encode_inputs(
        self,
        input_ids,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        pixel_values=None,
    ):
        """The input preamble of every head: check the inputs (`pixel_values` only for its batch size), then encode the
        text (B, L, H) and the knowledge items (B, M, H). Returns (text tokens, text mask, knowledge or None,
        knowledge item mask or None); the image is encoded by the caller (NLVR2 encodes two per row)."""
        check_inputs(
            pixel_values, input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask, knowledge_mask
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if knowledge_input_ids is None:
            # A batch without knowledge is a batch of zero items: the knowledge projection still runs (on nothing,
            # an exact zero gradient), so that DDP sees the same parameters used whatever a batch holds.
            knowledge_input_ids = input_ids.new_zeros(input_ids.shape[0], 0, 0)
            knowledge_attention_mask = knowledge_mask = None
        knowledge_mask = knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
        knowledge = self.encode_knowledge(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
        return self.encode_text(input_ids, attention_mask), attention_mask, knowledge, knowledge_mask

    def token_type_table(self, device):
        """Every row of the token-type embeddings, (T, H): the module called (not its weight read), so that
        accelerate's hooks load it when it is offloaded (`device_map`); `torch.arange` needs no host copy."""
        return self.token_type_embeddings(torch.arange(len(self.config.token_types), device=device))

    def fuse(
        self,
        image_tokens,
        text_tokens,
        text_mask,
        knowledge_tokens=None,
        knowledge_mask=None,
        knowledge_relevance=None,
        gate_forcing=None,
        output_attentions=None,
        output_hidden_states=None,
        image_fit=None,
        image_types=None,
    ):
        """OOD-gate the knowledge against the image, then run the co-attention layers over both streams.

        Training only: `gate_forcing` (a share in [0, 1]) with `knowledge_relevance` (B, M), the items that state the
        answer, teacher-forces the gate the fusion sees (`ImplicitOODLayer.forward`). `output_attentions` /
        `output_hidden_states` (default: the config's) add the fields described in `VKOODModelOutput`, which this
        always returns. `image_fit`: the OOD layer's `fit_images` of each row's image, when an image's mixture is
        fitted once for several rows. `image_types` (B, H): the token-type embedding added to each row's image tokens
        (default: the "image" row; NLVR2 gives its second images the "second_image" row)."""
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        implementation = self.config._attn_implementation
        if output_attentions and implementation != "eager":
            # transformers' sdpa attention warns and returns no probabilities; this model warns and computes this
            # call's attention in eager, so that what was asked for is returned.
            logger.warning_once(
                f"output_attentions=True: {implementation!r} attention does not compute the attention probabilities, "
                "so this call runs the fusion attention in eager (same result, slower); load with "
                'attn_implementation="eager" or call model.set_attn_implementation("eager") to make it the default'
            )
            implementation = "eager"
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
            knowledge_mask=knowledge_mask,
            knowledge_relevance=knowledge_relevance,
            gate_forcing=gate_forcing,
            image_fit=image_fit,
        )
        dtype = text_tokens.dtype
        knowledge_tokens = knowledge_tokens * ood.gate.to(dtype).unsqueeze(-1)
        types = self.token_type_table(image_tokens.device)
        row = self.config.token_types.index
        text_states = torch.cat([text_tokens + types[row("text")], knowledge_tokens + types[row("knowledge")]], dim=1)
        image_type = types[row("image")] if image_types is None else image_types[:, None]
        image_states = image_tokens + image_type
        # Gated-out items get an attention bias of log(gate): a hard 0 removes them, a soft gate down-weights them.
        minimum = torch.finfo(dtype).min
        log_gate = ood.log_gate.clamp_min(minimum).masked_fill(knowledge_mask == 0, minimum)
        text_bias = torch.cat([key_bias(text_mask, dtype), log_gate.to(dtype)[:, None, None, :]], dim=-1)
        image_bias = None
        text_history, image_history, attentions = [text_states], [image_states], []
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
            kept = selected_states(output_hidden_states, len(text_history))
            requested.update(
                text_hidden_states=tuple(state if i in kept else None for i, state in enumerate(text_history)),
                image_hidden_states=tuple(state if i in kept else None for i, state in enumerate(image_history)),
            )
        requested.update(
            {standard: requested[stream] for standard, stream in STANDARD_FIELDS.items() if stream in requested}
        )
        pooled = None
        if self.text_pooler is not None:
            pooled = torch.cat([self.text_pooler(text_states), self.image_pooler(image_states)], dim=-1)
        return VKOODModelOutput(
            last_hidden_state=text_states,
            image_last_hidden_state=image_states,
            pooler_output=pooled,
            ood_scores=ood.scores,
            ood_gate=ood.gate,
            ood_iterations=ood.iterations,
            ood_residual=ood.residual,
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
        gate_forcing=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Encode, gate and fuse; a `VKOODModelOutput` (its tuple with `return_dict=False`). `knowledge_relevance` and
        `gate_forcing` as in `fuse`; `output_attentions`, `output_hidden_states` and `return_dict` default to the
        config's values, as in transformers' models."""
        if pixel_values is None or input_ids is None:
            raise ValueError("VK-OOD needs both `pixel_values` and `input_ids`")
        text, attention_mask, knowledge, knowledge_mask = self.encode_inputs(
            input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask, knowledge_mask, pixel_values
        )
        output = self.fuse(
            self.encode_image(pixel_values),
            text,
            attention_mask,
            knowledge,
            knowledge_mask,
            knowledge_relevance,
            gate_forcing,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return self._returned(output, return_dict)


class VKOODForQuestionAnswering(VKOODPreTrainedModel):
    """VQAv2 / OK-VQA / easy-VQA: a classifier over the answer vocabulary, BCE on the soft VQA scores.

    `labels` (B, num_labels) holds each answer's soft score in [0, 1]; the loss is the mean BCE scaled by the
    vocabulary size, as in METER and the bottom-up VQA recipe, so its size does not shrink with the vocabulary.
    """

    def __init__(self, config: VKOODConfig):
        super().__init__(config)
        self.vkood = VKOODModel(config)
        self.classifier = build_classifier(config, pairs=1)
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
        gate_forcing=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """`knowledge_relevance` and `gate_forcing` (training only) as in `VKOODModel.fuse`; `output_attentions`,
        `output_hidden_states` and `return_dict` as in `VKOODModel.forward`."""
        outputs = self.vkood(
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
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * labels.shape[-1]
        output = VKOODClassificationOutput(
            loss=loss, logits=logits, pooler_output=outputs.pooler_output, **fused_fields(outputs)
        )
        return self._returned(output, return_dict)


class VKOODForImagesAndTextClassification(VKOODPreTrainedModel):
    """One sentence, `config.num_images` images (`pixel_values` (B, num_images, C, H, W)); each image is fused with the
    sentence and its knowledge, the pooled outputs are concatenated and classified; the loss on `labels` follows
    `config.problem_type` as in transformers' sequence classifiers (cross-entropy on class indices by default).
    NLVR2: 2 images, 2 classes (False, True), METER's pair method (with a "second_image" token type, the second image
    gets that row); SNLI-VE: 1 image, 3 classes."""

    def __init__(self, config: VKOODConfig):
        super().__init__(config)
        self.vkood = VKOODModel(config)
        self.num_images = config.num_images
        self.classifier = build_classifier(config, pairs=self.num_images)
        second = "second_image" if "second_image" in config.token_types else "image"
        # the token-type row of each image of an example (plain ints: indexing with them needs no device tensor)
        self.image_rows = [config.token_types.index("image" if i == 0 else second) for i in range(self.num_images)]
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
        """`output_attentions`, `output_hidden_states` and `return_dict` as in `VKOODModel.forward`; with one image per
        example `pixel_values` may also be (B, C, H, W)."""
        if pixel_values is not None and pixel_values.dim() == 4 and self.num_images == 1:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values is None or pixel_values.dim() != 5 or pixel_values.shape[1] != self.num_images:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(f"pixel_values must have shape (B, {self.num_images}, C, H, W), got {shape}")
        base = self.vkood
        # The sentence and its knowledge are encoded once and shared by both images.
        text, attention_mask, knowledge, knowledge_mask = base.encode_inputs(
            input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask, knowledge_mask, pixel_values
        )
        per_image = lambda tensor: None if tensor is None else tensor.repeat_interleave(self.num_images, 0)
        types = base.token_type_table(pixel_values.device)
        outputs = base.fuse(
            base.encode_image(pixel_values.flatten(0, 1)),
            per_image(text),
            per_image(attention_mask),
            per_image(knowledge),
            per_image(knowledge_mask),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            image_types=torch.stack([types[row] for row in self.image_rows]).repeat(pixel_values.shape[0], 1),
        )
        batch = pixel_values.shape[0]
        pooled = outputs.pooler_output.reshape(batch, -1)
        logits = self.classifier(pooled)
        # `config.problem_type` as transformers' sequence classifiers read it: set, or inferred (and then stored) from
        # num_labels and the labels' dtype: one label regresses, integer labels are classes, others multi-label
        loss = None if labels is None else ForSequenceClassificationLoss(labels, logits.float(), self.config)
        per_pair = lambda tensor: tensor.reshape(batch, self.num_images, *tensor.shape[1:])
        output = VKOODClassificationOutput(
            loss=loss, logits=logits, pooler_output=pooled, **fused_fields(outputs, per_pair)
        )
        return self._returned(output, return_dict)


__all__ = [
    "VKOODPreTrainedModel",
    "VKOODModel",
    "VKOODForQuestionAnswering",
    "VKOODForImagesAndTextClassification",
    "VKOODModelOutput",
    "VKOODClassificationOutput",
]

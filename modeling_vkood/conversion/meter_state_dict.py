"""METER's state dict (github zdou0830/METER, `METERTransformerSS`) read as a vkood model: which task it holds, the
VKOODConfig its shapes and saved hyper-parameters describe, and its weights under vkood's names.

METER's modules map one to one onto vkood's: the CLIP tower (OpenAI names, q/k/v packed in `in_proj`, the first
blocks only, `ln_post` on every token) onto transformers' `CLIPVisionModel`, the RoBERTa encoder onto itself, the
co-attention layers (`BertCrossLayer`: self-attention, cross-attention, feed-forward, each with a post-LN) onto
`VKOODFusionBlock`, the poolers, the token-type table, and the heads (`vqa_classifier`, `nlvr2_classifier`,
`snli_classifier`: Linear-LayerNorm-GELU-Linear, vkood's "meter" classifier; `itm_score`; `rank_output`).
"""

import re
from dataclasses import dataclass

import torch

# Task of a METER checkpoint, told by its heads (in this order: a retrieval model also holds the ITM head).
TASK_HEADS = (
    ("vqa", "vqa_classifier."),
    ("nlvr2", "nlvr2_classifier."),
    ("snli", "snli_classifier."),
    ("irtr", "rank_output."),
    ("pretrain", "itm_score."),
)
# SNLI-VE's classes in the order of `snli_classifier`'s outputs (METER's write_snli.py); NLVR2's (its "True" is 1).
SNLI_LABELS = ("contradiction", "neutral", "entailment")
NLVR2_LABELS = ("False", "True")
# Weights METER's forward never reads: CLIP's text-side leftovers in its `CLIP` class (and `token_embedding` in the
# checkpoints written before METER deleted it), CLIP's output projection, RoBERTa's pooler and position-id buffer.
UNUSED_KEYS = re.compile(
    r"^(vit_model\.(positional_embedding|ln_final\..*|token_embedding\..*|text_projection|logit_scale|visual\.proj)"
    r"|text_transformer\.(pooler\..*|embeddings\.position_ids))$"
)
# The MLM head of the pre-training checkpoints: kept beside the model (see `convert_meter`), not in it.
MLM_PREFIX = "mlm_score."
# METER's module prefixes: a key under one of them that maps nowhere makes the checkpoint unconvertible; keys
# outside them (modules other projects added to METER's layout) are named and dropped.
METER_PREFIXES = (
    "vit_model.",
    "text_transformer.",
    "cross_modal_",
    "token_type_embeddings.",
    "vqa_classifier.",
    "nlvr2_classifier.",
    "snli_classifier.",
    "itm_score.",
    "rank_output.",
    MLM_PREFIX,
)

VISION_BLOCK = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
VISION_TOP = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
CROSS_LAYER = {
    "attention.self.query": "self_attention.query",
    "attention.self.key": "self_attention.key",
    "attention.self.value": "self_attention.value",
    "attention.output.dense": "self_attention.output",
    "attention.output.LayerNorm": "self_norm",
    "crossattention.self.query": "cross_attention.query",
    "crossattention.self.key": "cross_attention.key",
    "crossattention.self.value": "cross_attention.value",
    "crossattention.output.dense": "cross_attention.output",
    "crossattention.output.LayerNorm": "cross_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
HEAD_KEYS = {
    "vqa_classifier.": "classifier.",
    "nlvr2_classifier.": "classifier.",
    "snli_classifier.": "classifier.",
    "itm_score.fc.": "itm_head.",
    "rank_output.": "rank_output.",
}


def detect_task(state_dict: dict) -> str:
    """pretrain, vqa, nlvr2, snli or irtr, from the heads present; a ValueError when there is none."""
    for task, prefix in TASK_HEADS:
        if any(key.startswith(prefix) for key in state_dict):
            return task
    raise ValueError(
        "no METER head in this checkpoint (none of " + ", ".join(prefix for _, prefix in TASK_HEADS) + "): "
        "not a METER model"
    )


def _count(state_dict: dict, pattern: str) -> int:
    """How many distinct indices the `(\\d+)` of `pattern` takes among the keys."""
    found = {match.group(1) for key in state_dict if (match := re.match(pattern, key))}
    return len(found)


def vision_config(state_dict: dict) -> dict:
    """transformers' CLIPVisionConfig of METER's tower: sizes from the shapes, OpenAI CLIP's rules for the rest
    (64-wide heads, QuickGELU, LayerNorm eps 1e-5); the depth is the blocks METER kept (one fewer than CLIP's)."""
    conv = state_dict["vit_model.visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state_dict["vit_model.visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return {
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": state_dict["vit_model.visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count(state_dict, r"vit_model\.visual\.transformer\.resblocks\.(\d+)\."),
        "num_attention_heads": width // 64,
        "num_channels": conv.shape[1],
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


def text_config(state_dict: dict, base_config: dict) -> dict:
    """The text encoder's config: `base_config` (the pretrained encoder's config METER built it from, e.g.
    roberta-base's) with every size the state dict shows."""
    embeddings = "text_transformer.embeddings."
    config = dict(base_config)
    config.update(
        vocab_size=state_dict[embeddings + "word_embeddings.weight"].shape[0],
        hidden_size=state_dict[embeddings + "word_embeddings.weight"].shape[1],
        max_position_embeddings=state_dict[embeddings + "position_embeddings.weight"].shape[0],
        type_vocab_size=state_dict[embeddings + "token_type_embeddings.weight"].shape[0],
        num_hidden_layers=_count(state_dict, r"text_transformer\.encoder\.layer\.(\d+)\."),
        intermediate_size=state_dict["text_transformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
    )
    return config


def fusion_config(state_dict: dict, hyper: dict) -> dict:
    """VKOODConfig fields of the fusion (sizes from the shapes; heads and dropout from METER's hyper-parameters; the
    activation and LayerNorm eps of METER's BertConfig defaults)."""
    hidden = state_dict["cross_modal_text_transform.weight"].shape[0]
    return {
        "hidden_size": hidden,
        "num_fusion_layers": _count(state_dict, r"cross_modal_text_layers\.(\d+)\."),
        "num_attention_heads": int(hyper.get("num_heads", hidden // 64)),
        "intermediate_size": state_dict["cross_modal_text_layers.0.intermediate.dense.weight"].shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": float(hyper.get("drop_rate", 0.1)),
        "attention_probs_dropout_prob": float(hyper.get("drop_rate", 0.1)),
    }


def _vision_key(rest: str, state_dict_value: torch.Tensor) -> dict:
    """vkood weights of one key under `vit_model.visual.` (the packed q/k/v split in three)."""
    if rest in VISION_TOP:
        return {VISION_TOP[rest]: state_dict_value}
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", rest)
    if match is None:
        match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", rest)
        if match is None:
            return {}
        block, kind = match.groups()
        query, key, value = state_dict_value.chunk(3, dim=0)
        prefix = f"encoder.layers.{block}.self_attn."
        return {f"{prefix}q_proj.{kind}": query, f"{prefix}k_proj.{kind}": key, f"{prefix}v_proj.{kind}": value}
    block, module, kind = match.groups()
    if module not in VISION_BLOCK:
        return {}
    return {f"encoder.layers.{block}.{VISION_BLOCK[module]}.{kind}": state_dict_value}


def _mapped(key: str, value: torch.Tensor) -> dict:
    """{vkood key: tensor} of one METER key ({} when it maps nowhere); base-model keys carry no `vkood.` prefix yet."""
    if key.startswith("vit_model.visual."):
        return {f"vision_model.{name}": tensor for name, tensor in _vision_key(key[17:], value).items()}
    if key.startswith("text_transformer."):
        return {"text_model." + key[len("text_transformer.") :]: value}
    for side in ("text", "image"):
        if key.startswith(f"cross_modal_{side}_transform."):
            return {f"{side}_projection." + key.rsplit(".", 1)[1]: value}
        if key.startswith(f"cross_modal_{side}_pooler.dense."):
            return {f"{side}_pooler.dense." + key.rsplit(".", 1)[1]: value}
        match = re.fullmatch(rf"cross_modal_{side}_layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if match and match.group(2) in CROSS_LAYER:
            layer, module, kind = match.groups()
            return {f"fusion_layers.{layer}.{side}_block.{CROSS_LAYER[module]}.{kind}": value}
    return {}


@dataclass
class ConvertedWeights:
    """The METER weights under vkood's names: `base` (of `VKOODModel`), `head` (of the task model, outside the base),
    the token-type rows, the MLM head's weights, and the keys left out (`unused`: never read by METER's forward;
    `extra`: outside METER's modules)."""

    base: dict
    head: dict
    token_types: torch.Tensor
    mlm: dict
    unused: list
    extra: list


def convert_weights(state_dict: dict) -> ConvertedWeights:
    """Every METER key mapped, or a ValueError naming the keys under METER's modules that map nowhere."""
    base, head, mlm, unused, extra, unmapped = {}, {}, {}, [], [], []
    token_types = None
    for key, value in state_dict.items():
        if UNUSED_KEYS.match(key):
            unused.append(key)
        elif key.startswith(MLM_PREFIX):
            mlm[key[len(MLM_PREFIX) :]] = value
        elif key == "token_type_embeddings.weight":
            token_types = value
        elif any(key.startswith(prefix) for prefix in HEAD_KEYS):
            prefix = next(prefix for prefix in HEAD_KEYS if key.startswith(prefix))
            head[HEAD_KEYS[prefix] + key[len(prefix) :]] = value
        elif mapped := _mapped(key, value):
            base.update(mapped)
        elif key.startswith(METER_PREFIXES):
            unmapped.append(key)
        else:
            extra.append(key)
    if unmapped:
        raise ValueError(f"cannot map these METER weights onto vkood: {sorted(unmapped)}")
    if token_types is None:
        raise ValueError("the checkpoint has no token_type_embeddings.weight: not a METER model")
    return ConvertedWeights(base, head, token_types, mlm, sorted(unused), sorted(extra))


__all__ = [
    "ConvertedWeights",
    "NLVR2_LABELS",
    "SNLI_LABELS",
    "convert_weights",
    "detect_task",
    "fusion_config",
    "text_config",
    "vision_config",
]

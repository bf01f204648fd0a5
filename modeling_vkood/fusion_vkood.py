"""VK-OOD's co-attention fusion (METER): multi-head attention through transformers' attention interface, the
co-attention layer in which the [text ; knowledge] stream and the image stream attend to themselves and to each other,
and the poolers (Hub remote code: torch and transformers only)."""

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def key_bias(mask, dtype):
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


__all__ = ["VKOODAttention", "VKOODFusionBlock", "VKOODFusionLayer", "VKOODPooler", "key_bias"]

"""A training-time cache of a text encoder's frozen lower blocks, kept per distinct token row across steps.

With LoRA on the top blocks only (the embedded default adapts MiniLM's blocks 4 and 5), the embeddings and the blocks
below the lowest adapted one never change during a run, and with their dropout off they are a pure function of the
token row. easy-VQA has 107 distinct questions and a few hundred distinct knowledge items, so after the first steps
every row the text encoder sees has been through those blocks before: their outputs are looked up instead of
recomputed, and only the adapted blocks run. The results are those of the uncached encoder (the real tokens' states;
padded positions are zero, and masked as keys in every later block).

The lookup is vectorised: one `torch.unique` over the cached and the incoming keys matches rows; it reads the host
(how many rows are new), so it is a speed-up of the CPU path, like the distinct-text encoding it sits under.
Installing patches the `forward` of the frozen block instances only; module names, parameters and the state dict
stay as they are, so checkpoints are unchanged, and `remove()` restores the plain encoder.
"""

import contextlib

import torch
from torch import nn

from modeling_vkood.modeling_vkood import transformer_blocks


def leading_frozen_blocks(encoder: nn.Module) -> int:
    """How many blocks from the bottom have no trainable parameter (0 when the embeddings are trained)."""
    if any(p.requires_grad for name, p in encoder.named_parameters() if "embeddings" in name):
        return 0
    count = 0
    for block in transformer_blocks(encoder):
        if any(p.requires_grad for p in block.parameters()):
            break
        count += 1
    return count


class FrozenTextPrefixCache:
    """Outputs of the first `num_blocks` blocks of `encoder` per distinct (token ids, attention mask) row.

    At most `capacity` rows are kept; when a new row would exceed it the cache starts again empty. `hits` and
    `misses` count the rows looked up and the rows computed. Every pass must run at least the cached blocks (the
    first returns their joint output): `for_model` caches no more blocks than a VK-OOD model's knowledge items take.
    """

    @classmethod
    def for_model(cls, model: nn.Module, capacity: int = 16384) -> "FrozenTextPrefixCache":
        """The cache of a `VKOODModel`'s text encoder: its leading frozen blocks, at most the
        `config.knowledge_encoder_layers` blocks that knowledge items go through."""
        encoder = model.text_model
        num_blocks = leading_frozen_blocks(encoder)
        if model.config.knowledge_encoder_layers is not None:
            num_blocks = min(num_blocks, model.config.knowledge_encoder_layers)
        return cls(encoder, num_blocks=num_blocks, capacity=capacity)

    def __init__(self, encoder: nn.Module, num_blocks: int | None = None, capacity: int = 16384):
        frozen = leading_frozen_blocks(encoder)
        num_blocks = frozen if num_blocks is None else num_blocks
        if num_blocks < 1 or num_blocks > frozen:
            raise ValueError(
                f"can cache only frozen blocks: {frozen} leading block(s) of the text encoder (and its "
                f"embeddings) have no trainable parameter, asked for {num_blocks}"
            )
        above = {id(m) for block in transformer_blocks(encoder)[num_blocks:] for m in block.modules()}
        random = [m for m in encoder.modules() if isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in above]
        attention_dropout = getattr(encoder.config, "attention_probs_dropout_prob", 0.0) or getattr(
            encoder.config, "attention_dropout", 0.0
        )
        if random or attention_dropout:
            raise ValueError(
                "the text encoder has active dropout, so its frozen blocks are not a function of the "
                "tokens: set --backbone_dropout 0 to cache them"
            )
        self.encoder = encoder
        self.blocks = list(transformer_blocks(encoder)[:num_blocks])
        self.capacity = capacity
        self.hits = self.misses = 0
        self._input_ids = None  # (R, L) token ids of the embeddings call in progress
        self._keys = self._values = None  # (C, Lc) and (C, Lc, W)
        if not hasattr(encoder, "embeddings"):
            raise ValueError(f"{type(encoder).__name__} has no `embeddings` to key the cached rows by")
        # The token ids are read where every pass starts (the encoder's own forward, or a pass through its first
        # blocks only, as knowledge items take), and which of them are masked from the mask the first block gets.
        self._hook = encoder.embeddings.register_forward_pre_hook(self._remember_ids, with_kwargs=True)
        self._patch()

    def _patch(self):
        self.blocks[0].forward = self._first_block
        for block in self.blocks[1:]:
            block.forward = self._pass_through

    def _unpatch(self):
        for block in self.blocks:
            del block.forward

    def remove(self):
        """Restore the plain encoder."""
        self._hook.remove()
        self._unpatch()
        self._keys = self._values = self._input_ids = None

    @contextlib.contextmanager
    def paused(self):
        """The plain encoder inside the block, the cache and its contents back after it (for comparisons)."""
        self._unpatch()
        try:
            yield self
        finally:
            self._patch()

    def _remember_ids(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("the frozen-block cache needs input_ids (it keys rows by their tokens)")
        self._input_ids = input_ids

    def _row_keys(self, attention_mask):
        """(R, L) keys of the rows in progress: token ids, -1 where `attention_mask` (the first block's: None, (R, L)
        or a prepared (R, 1, L, L)) masks the position as a key."""
        input_ids = self._input_ids
        if attention_mask is None:
            return input_ids
        if attention_mask.dim() == 2:
            valid = attention_mask.bool()
        else:  # a prepared (R, 1, L, L) mask: the keys every query may attend to
            keys = attention_mask[:, 0, 0]
            valid = keys if keys.dtype == torch.bool else keys == 0
        return input_ids.masked_fill(~valid.expand_as(input_ids), -1)

    @staticmethod
    def _pass_through(hidden_states, *args, **kwargs):
        return hidden_states

    def _first_block(self, hidden_states, attention_mask=None, *args, **kwargs):
        """The output of all cached blocks: looked up for rows seen before, computed (then kept) for the others."""
        row_keys, length = self._row_keys(attention_mask), hidden_states.shape[1]
        if self._keys is None:
            self._keys = row_keys.new_empty(0, length)
            self._values = hidden_states.new_empty(0, length, hidden_states.shape[-1])
        width = max(length, self._keys.shape[1])
        self._keys = nn.functional.pad(self._keys, (0, width - self._keys.shape[1]), value=-1)
        self._values = nn.functional.pad(self._values, (0, 0, 0, width - self._values.shape[1]))
        row_keys = nn.functional.pad(row_keys, (0, width - length), value=-1)
        row_slot, new_rows = self._lookup(row_keys)
        if len(new_rows) > self.capacity:  # more distinct rows than the cache holds: compute, keep nothing
            self.misses += len(new_rows)
            return self._compute(torch.arange(len(row_keys)), hidden_states, attention_mask, args, kwargs, row_keys)
        if len(new_rows):
            if len(self._keys) + len(new_rows) > self.capacity:
                self._keys, self._values = self._keys[:0], self._values[:0]
            states = self._compute(new_rows, hidden_states, attention_mask, args, kwargs, row_keys)
            self._keys = torch.cat([self._keys, row_keys[new_rows]])
            self._values = torch.cat([self._values, nn.functional.pad(states, (0, 0, 0, width - length))])
            self.misses += len(new_rows)
            self.hits += len(row_keys) - int((row_slot < 0).sum())
            row_slot, _ = self._lookup(row_keys)
        else:
            self.hits += len(row_keys)
        return self._values[row_slot, :length]

    def _lookup(self, row_keys):
        """(slot in the cache of each row, -1 if absent; the first row of each distinct absent key)."""
        cached = len(self._keys)
        distinct, inverse = torch.unique(torch.cat([self._keys, row_keys]), dim=0, return_inverse=True)
        slot = torch.full((len(distinct),), -1, dtype=torch.long, device=inverse.device)
        slot[inverse[:cached]] = torch.arange(cached, device=inverse.device)
        row_ids = inverse[cached:]
        row_slot = slot[row_ids]
        rows = torch.arange(len(row_ids), device=row_ids.device)
        first_row = torch.full_like(slot, len(row_ids)).scatter_reduce(0, row_ids, rows, "amin")
        return row_slot, first_row[torch.unique(row_ids[row_slot < 0])]

    def _compute(self, rows, hidden_states, attention_mask, args, kwargs, row_keys):
        """The cached blocks' output for `rows` of this call, padded positions zeroed (they never matter)."""
        states = hidden_states[rows]
        if attention_mask is not None and attention_mask.shape[0] > 1:
            attention_mask = attention_mask[rows]
        with torch.no_grad():
            for block in self.blocks:
                states = type(block).forward(block, states, attention_mask, *args, **kwargs)
        real = row_keys[rows, : states.shape[1]] >= 0
        return (states * real.unsqueeze(-1).to(states.dtype)).to(self._values.dtype)

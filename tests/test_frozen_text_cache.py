"""FrozenTextPrefixCache: the text encoder gives the states it gives without the cache, and computes each row once."""

import pytest
import torch
from transformers import AutoModel

from modeling_vkood.training.frozen_text_cache import FrozenTextPrefixCache, leading_frozen_blocks


@pytest.fixture(scope="module")
def encoder(minilm_path):
    """The real MiniLM with its two top blocks trainable (as LoRA on blocks 4 and 5 leaves it) and dropout off."""
    model = AutoModel.from_pretrained(minilm_path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.requires_grad_(False)
    for block in model.encoder.layer[4:]:
        block.requires_grad_(True)
    return model.train()


def token_rows(rows, length, seed):
    """Right-padded random token rows (pad id 0) of 2..length real tokens, with their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (rows, length), generator=generator)
    mask = (torch.arange(length) < torch.randint(2, length + 1, (rows, 1), generator=generator)).long()
    return ids.masked_fill(mask == 0, 0), mask


def pad_to(ids, mask, length):
    return (
        torch.nn.functional.pad(ids, (0, length - ids.shape[1])),
        torch.nn.functional.pad(mask, (0, length - mask.shape[1])),
    )


def real_states(encoder, ids, mask):
    return encoder(input_ids=ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1)


def plain_states(encoder, cache, ids, mask):
    with cache.paused():
        return real_states(encoder, ids, mask)


def test_cached_states_equal_the_plain_encoders_and_each_distinct_row_is_computed_once(encoder):
    short, long = token_rows(6, 7, seed=0), token_rows(5, 12, seed=1)
    # Rows seen before come back at another padded length and among repeats and new rows.
    mixed = [torch.cat(parts) for parts in zip(pad_to(*short, 12), long, pad_to(short[0][:2], short[1][:2], 12))]
    expected = [real_states(encoder, *batch) for batch in (short, long, mixed)]
    cache = FrozenTextPrefixCache(encoder)
    assert len(cache.blocks) == 4
    try:
        for batch, reference in zip((short, long, mixed, short), (*expected, expected[0])):
            torch.testing.assert_close(real_states(encoder, *batch), reference, rtol=0, atol=2e-5)
        assert (cache.misses, cache.hits) == (6 + 5, 13 + 6)  # the mixed batch and the last one only hit
        grads = torch.autograd.grad(real_states(encoder, *long).sum(), list(encoder.encoder.layer[4].parameters()))
        assert all(g.abs().sum() > 0 for g in grads)  # the trainable blocks above the cache still learn
    finally:
        cache.remove()
    assert "forward" not in vars(encoder.encoder.layer[0])  # the plain encoder is back


def test_a_full_cache_starts_again_and_a_batch_larger_than_it_is_computed_without_it(encoder):
    first, second = token_rows(4, 6, seed=2), token_rows(4, 6, seed=3)
    cache = FrozenTextPrefixCache(encoder, capacity=6)
    try:
        for batch in (first, second):  # 4 + 4 > 6: the second batch empties the cache first
            torch.testing.assert_close(
                real_states(encoder, *batch), plain_states(encoder, cache, *batch), rtol=0, atol=2e-5
            )
        assert cache.misses == 8 and len(cache._keys) == 4
        big = token_rows(9, 6, seed=4)
        torch.testing.assert_close(real_states(encoder, *big), plain_states(encoder, cache, *big), rtol=0, atol=2e-5)
        assert cache.misses == 17 and len(cache._keys) == 4  # computed, nothing kept
    finally:
        cache.remove()


def test_only_frozen_blocks_without_dropout_are_cached(minilm_path):
    model = AutoModel.from_pretrained(minilm_path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.requires_grad_(False)
    model.encoder.layer[2].requires_grad_(True)
    assert leading_frozen_blocks(model) == 2
    with pytest.raises(ValueError, match="only frozen blocks"):
        FrozenTextPrefixCache(model, num_blocks=3)
    model.embeddings.requires_grad_(True)
    with pytest.raises(ValueError, match="only frozen blocks"):
        FrozenTextPrefixCache(model)
    with_dropout = AutoModel.from_pretrained(minilm_path).requires_grad_(False)  # MiniLM's dropout is 0.1
    with pytest.raises(ValueError, match="backbone_dropout 0"):
        FrozenTextPrefixCache(with_dropout)

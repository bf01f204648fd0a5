"""`knowledge_encoder_layers`: knowledge items through the text encoder's first N blocks only.

The reference is transformers' own encoder cut to N blocks (a `BertModel` with `num_hidden_layers=N` holding the
first N blocks' weights), mean-pooled over the real tokens, on the CPU path and on the fixed-shape path.
"""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModel, BertConfig, BertModel

from modeling_vkood import VKOODForQuestionAnswering, VKOODModel
from modeling_vkood.training.frozen_text_cache import FrozenTextPrefixCache
from tests.utils.tiny import tiny_batch, tiny_vkood_config


def text_config(layers):
    return dict(
        model_type="bert",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        vocab_size=30522,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def padded_items():
    """tiny_batch's items with ragged lengths: some rows end in padding, one slot of example 0 is empty."""
    batch = tiny_batch(batch_size=3, items=4, item_length=6, seed=3)
    lengths = torch.tensor([[6, 2, 4, 0], [3, 6, 1, 5], [0, 0, 0, 0]])
    mask = (torch.arange(6) < lengths.unsqueeze(-1)).long()
    batch["knowledge_attention_mask"] = mask
    batch["knowledge_input_ids"] = batch["knowledge_input_ids"].masked_fill(mask == 0, 0)
    batch["knowledge_mask"] = (lengths > 0).long()
    return batch


def cut_encoder_vectors(model, batch, layers):
    """Item vectors from a transformers BertModel of `layers` blocks with the model's first blocks' weights."""
    reference = BertModel(BertConfig(**{**text_config(layers), "model_type": None}), add_pooling_layer=False)
    missing, unexpected = reference.load_state_dict(model.vkood.text_model.state_dict(), strict=False)
    assert not missing and all(".layer." in key or "pooler" in key for key in unexpected)
    reference.eval()
    ids, mask = batch["knowledge_input_ids"].flatten(0, 1), batch["knowledge_attention_mask"].flatten(0, 1)
    real = mask.any(-1)
    states = reference(input_ids=ids[real], attention_mask=mask[real]).last_hidden_state
    weights = mask[real].unsqueeze(-1).float()
    pooled = torch.zeros(ids.shape[0], 32)
    pooled[real] = (states * weights).sum(1) / weights.sum(1)
    return model.vkood.knowledge_projection(pooled.view(*batch["knowledge_mask"].shape, 32))


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["cpu_path", "fixed_shapes"])
def test_items_through_the_first_blocks_equal_transformers_encoder_cut_there(fixed_shapes):
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(
        tiny_vkood_config(text_config=text_config(3), knowledge_encoder_layers=1, num_labels=5)
    ).eval()
    model.vkood.force_fixed_shapes = fixed_shapes
    batch = padded_items()
    with torch.no_grad():
        vectors = model.vkood.encode_knowledge(
            batch["knowledge_input_ids"], batch["knowledge_attention_mask"], batch["knowledge_mask"]
        )
        expected = cut_encoder_vectors(model, batch, 1)
        all_blocks = cut_encoder_vectors(model, batch, 3)
    real = batch["knowledge_mask"].bool()
    torch.testing.assert_close(vectors[real], expected[real], rtol=1e-5, atol=1e-5)
    assert (vectors[real] - all_blocks[real]).abs().max() > 1e-3  # one block is not three


def test_all_blocks_is_the_model_without_the_setting_and_the_question_keeps_every_block():
    torch.manual_seed(0)
    config = tiny_vkood_config(text_config=text_config(3), num_labels=5)
    plain = VKOODForQuestionAnswering(config).eval()
    config_all = tiny_vkood_config(text_config=text_config(3), knowledge_encoder_layers=3, num_labels=5)
    config_one = tiny_vkood_config(text_config=text_config(3), knowledge_encoder_layers=1, num_labels=5)
    every, one = VKOODForQuestionAnswering(config_all).eval(), VKOODForQuestionAnswering(config_one).eval()
    every.load_state_dict(plain.state_dict())
    one.load_state_dict(plain.state_dict())
    batch = padded_items()
    with torch.no_grad():
        reference, same, cut = plain(**batch), every(**batch), one(**batch)
        torch.testing.assert_close(same.logits, reference.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(same.ood_scores, reference.ood_scores, rtol=1e-5, atol=1e-5)
        real = batch["knowledge_mask"].bool()
        assert (cut.ood_scores - reference.ood_scores)[real].abs().max() > 1e-3  # the items are scored anew
        question = {key: batch[key] for key in ("input_ids", "attention_mask")}
        torch.testing.assert_close(one.vkood.encode_text(**question), plain.vkood.encode_text(**question))


def test_items_train_the_blocks_they_go_through_only():
    torch.manual_seed(0)
    model = VKOODModel(tiny_vkood_config(text_config=text_config(3), knowledge_encoder_layers=2))
    batch = padded_items()
    model.encode_knowledge(
        batch["knowledge_input_ids"], batch["knowledge_attention_mask"], batch["knowledge_mask"]
    ).sum().backward()
    blocks = model.text_model.encoder.layer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters())
    assert all(p.grad is None for p in blocks[2].parameters())


def test_the_frozen_block_cache_serves_items_and_questions_alike(minilm_path):
    """Items through MiniLM's first 2 blocks with its first 4 frozen: the cached model's item vectors and question
    states equal the uncached ones, in interleaved calls (the cache keys rows by the ids each pass starts from)."""
    torch.manual_seed(0)
    config = tiny_vkood_config(knowledge_encoder_layers=2)
    config.text_config = AutoModel.from_pretrained(minilm_path).config
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    model = VKOODModel(config)
    model.text_model = AutoModel.from_pretrained(minilm_path, config=config.text_config)
    model.text_model.requires_grad_(False)
    model.text_model.encoder.layer[4:].requires_grad_(True)
    batch = padded_items()
    item_args = (batch["knowledge_input_ids"], batch["knowledge_attention_mask"], batch["knowledge_mask"])
    question = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        items, text = model.encode_knowledge(*item_args), model.encode_text(**question)
        cache = FrozenTextPrefixCache.for_model(model)
        assert len(cache.blocks) == 2  # 4 frozen blocks, but items stop after 2
        try:
            for _ in range(2):
                torch.testing.assert_close(model.encode_knowledge(*item_args), items, rtol=0, atol=2e-5)
                torch.testing.assert_close(model.encode_text(**question), text, rtol=0, atol=2e-5)
            assert cache.hits > 0
        finally:
            cache.remove()


def test_a_count_below_one_is_refused_and_one_above_the_encoders_depth_means_every_block():
    with pytest.raises(StrictDataclassClassValidationError, match="knowledge_encoder_layers must be None or positive"):
        tiny_vkood_config(knowledge_encoder_layers=0)
    torch.manual_seed(0)
    deep = VKOODModel(tiny_vkood_config(text_config=text_config(3), knowledge_encoder_layers=8)).eval()
    every = VKOODModel(tiny_vkood_config(text_config=text_config(3))).eval()
    every.load_state_dict(deep.state_dict())
    batch = padded_items()
    item_args = (batch["knowledge_input_ids"], batch["knowledge_attention_mask"], batch["knowledge_mask"])
    with torch.no_grad():
        torch.testing.assert_close(deep.encode_knowledge(*item_args), every.encode_knowledge(*item_args))

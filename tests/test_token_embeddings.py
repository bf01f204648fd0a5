"""Token embeddings the transformers way: every head's input embeddings are the text backbone's word embeddings
(questions and knowledge items are its tokens), and `resize_token_embeddings` grows them, and with them the generative
decoder's embeddings and tied output layer (answers come from the same tokenizer); the new tokens run and survive a
save/load round trip."""

import pytest
import torch

from modeling_vkood import VKOODForImageTextRetrieval, VKOODForQuestionAnswering, VKOODModel
from modeling_vkood.generation_vkood import VKOODForConditionalGeneration
from tests.utils.tiny import tiny_batch, tiny_decoder_config, tiny_vkood_config

VOCAB = 30522  # tiny_vkood_config's and tiny_decoder_config's
HEADS = {
    "base": (VKOODModel, {}),
    "vqa": (VKOODForQuestionAnswering, dict(num_labels=5)),
    "retrieval": (VKOODForImageTextRetrieval, {}),
    "generation": (VKOODForConditionalGeneration, dict(decoder_config=tiny_decoder_config())),
}


def new_token_batch(generative):
    """tiny_batch with the 3 new token ids in the question, a knowledge item and the decoder input."""
    batch = tiny_batch()
    batch["input_ids"][:, 1:4] = torch.arange(VOCAB, VOCAB + 3)
    batch["knowledge_input_ids"][0, 0, :3] = torch.arange(VOCAB, VOCAB + 3)
    if generative:
        batch["decoder_input_ids"] = torch.tensor([[101, VOCAB + 2, VOCAB]] * 3)
    return batch


@pytest.mark.parametrize("task", list(HEADS))
def test_resizing_grows_the_text_backbone_and_the_decoder_and_survives_a_round_trip(task, tmp_path):
    model_class, kwargs = HEADS[task]
    torch.manual_seed(0)
    model = model_class(tiny_vkood_config(**kwargs)).eval()
    base = model if task == "base" else model.vkood
    assert model.get_input_embeddings() is base.text_model.embeddings.word_embeddings
    embeddings = model.resize_token_embeddings(VOCAB + 3)
    assert embeddings is model.get_input_embeddings() and embeddings.num_embeddings == VOCAB + 3
    assert model.config.text_config.vocab_size == VOCAB + 3
    generative = task == "generation"
    if generative:
        decoder = model.text_decoder
        assert model.config.decoder_config.vocab_size == VOCAB + 3
        assert decoder.get_input_embeddings().num_embeddings == VOCAB + 3
        assert model.get_output_embeddings().out_features == VOCAB + 3
        assert model.get_output_embeddings().weight is decoder.get_input_embeddings().weight  # still tied
    batch = new_token_batch(generative)
    with torch.no_grad():
        output = model(**batch)
    model.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path).eval()
    assert reloaded.get_input_embeddings().num_embeddings == VOCAB + 3
    with torch.no_grad():
        again = reloaded(**batch)
    main = {"base": "pooler_output", "vqa": "logits", "retrieval": "logits_per_image", "generation": "logits"}[task]
    torch.testing.assert_close(getattr(again, main), getattr(output, main))
    if generative:
        assert output.logits.shape[-1] == VOCAB + 3
        assert reloaded.get_output_embeddings().weight is reloaded.text_decoder.get_input_embeddings().weight


def test_set_input_embeddings_replaces_the_text_backbone_word_embeddings():
    model = VKOODForQuestionAnswering(tiny_vkood_config(num_labels=5))
    replacement = torch.nn.Embedding(VOCAB, 32, padding_idx=0)
    model.set_input_embeddings(replacement)
    assert model.vkood.text_model.embeddings.word_embeddings is replacement
    assert model.get_input_embeddings() is replacement

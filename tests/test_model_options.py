"""The model options a converted METER checkpoint uses, each against the behaviour it must have: a token-type row per
stream (NLVR2's second image), SNLI-VE's single image, the position table resized for any image size, METER's
classifier layout and retrieval score."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from modeling_vkood import (
    VKOODConfig,
    VKOODForImagesAndTextClassification,
    VKOODForImageTextRetrieval,
    VKOODForQuestionAnswering,
)
from tests.utils.tiny import tiny_batch, tiny_vkood_config


def test_token_types_are_checked():
    with pytest.raises(StrictDataclassClassValidationError, match="token_types"):
        tiny_vkood_config(token_types=["text", "image"])
    with pytest.raises(StrictDataclassClassValidationError, match="token_types"):
        tiny_vkood_config(token_types=["text", "image", "knowledge", "third_image"])
    assert VKOODConfig().token_types == ["text", "image", "knowledge"]


def test_the_second_image_has_its_own_token_type_row():
    torch.manual_seed(0)
    config = tiny_vkood_config(num_labels=2, token_types=["text", "image", "second_image", "knowledge"])
    model = VKOODForImagesAndTextClassification(config).eval()
    batch = tiny_batch(pairs=True)
    with torch.no_grad():
        before = model(**batch, output_hidden_states=True)
        model.vkood.token_type_embeddings.weight[2] += 1.0
        after = model(**batch, output_hidden_states=True)
    first, second = (after.image_hidden_states[0] - before.image_hidden_states[0]).unbind(1)
    assert first.abs().max() == 0 and torch.allclose(second, torch.ones_like(second))
    torch.testing.assert_close(after.image_hidden_states[0][:, 0], before.image_hidden_states[0][:, 0])


def test_one_image_per_example_takes_plain_pixel_values():
    torch.manual_seed(0)
    model = VKOODForImagesAndTextClassification(tiny_vkood_config(num_labels=3, num_images=1)).eval()
    batch = tiny_batch()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        flat = model(**batch, labels=labels)
        nested = model(**{**batch, "pixel_values": batch["pixel_values"].unsqueeze(1)}, labels=labels)
    assert flat.logits.shape == (3, 3)
    torch.testing.assert_close(flat.logits, nested.logits, rtol=0, atol=0)
    torch.testing.assert_close(flat.loss, torch.nn.functional.cross_entropy(flat.logits, labels))


def test_interpolate_pos_encoding_takes_any_image_size():
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(tiny_vkood_config(num_labels=3)).eval()
    batch = tiny_batch()
    larger = {**batch, "pixel_values": torch.randn(3, 3, 48, 48)}
    with pytest.raises(ValueError, match="doesn't match model"):
        model(**larger)
    with torch.no_grad():
        native = model(**batch).logits
        model.config.interpolate_pos_encoding = True
        assert model(**larger).logits.shape == (3, 3)
        torch.testing.assert_close(model(**batch).logits, native, rtol=0, atol=0)  # the native size: the table


def test_meter_classifier_layout():
    model = VKOODForImagesAndTextClassification(tiny_vkood_config(num_labels=2, classifier_head="meter"))
    layers = [type(layer).__name__ for layer in model.classifier]
    assert layers == ["Linear", "LayerNorm", "GELU", "Linear"]  # METER's keys .0 .1 .3, no dropout
    assert model.classifier[0].weight.shape == (2 * 32, 4 * 32)  # 2 pairs x [text ; image] -> 2H


def test_rank_output_scores_pairs_and_ranks_the_gallery_by_it_alone():
    torch.manual_seed(0)
    model = VKOODForImageTextRetrieval(tiny_vkood_config(retrieval_score="rank_output", k_test=3)).eval()
    batch = tiny_batch()
    with torch.no_grad():
        output = model(**batch, return_loss=False)
        pooled = model.vkood(**batch).pooler_output
        torch.testing.assert_close(output.rank_scores, model.rank_output(pooled)[:, 0])
        images = model.encode_gallery_images(batch["pixel_values"])
        texts = model.encode_gallery_texts(
            batch["input_ids"],
            batch["attention_mask"],
            batch["knowledge_input_ids"],
            batch["knowledge_attention_mask"],
            batch["knowledge_mask"],
        )
        i2t, t2i = model.rank_gallery(images, texts)
    torch.testing.assert_close(i2t.diagonal(), output.rank_scores, rtol=1e-5, atol=1e-5)  # k_test covers all pairs
    torch.testing.assert_close(t2i, i2t.t(), rtol=1e-5, atol=1e-5)
    model.train()
    trained = model(**batch, image_ids=torch.tensor([0, 1, 2]), return_loss=True)
    assert torch.isfinite(trained.loss) and trained.loss > trained.itc_loss + trained.itm_loss  # + the rank term

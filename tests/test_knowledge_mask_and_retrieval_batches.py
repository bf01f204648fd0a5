"""`knowledge_mask=None` means "the items with real tokens" everywhere; retrieval's loss is defined on any batch."""

import pytest
import torch

from modeling_vkood import (
    VKOODForImagesAndTextClassification,
    VKOODForImageTextRetrieval,
    VKOODForQuestionAnswering,
    VKOODModel,
)
from tests.utils.tiny import tiny_batch, tiny_vkood_config


def processor_like_batch(pairs=False):
    """tiny_batch with the padded item slots as the processor writes them: all-zero attention rows."""
    batch = tiny_batch(pairs=pairs)
    batch["knowledge_attention_mask"] = batch["knowledge_attention_mask"] * batch["knowledge_mask"][..., None]
    return batch


@pytest.mark.parametrize(
    "model_class",
    [VKOODModel, VKOODForQuestionAnswering, VKOODForImagesAndTextClassification, VKOODForImageTextRetrieval],
)
def test_leaving_out_knowledge_mask_gives_the_processor_mask_result(model_class):
    torch.manual_seed(0)
    model = model_class(tiny_vkood_config(num_labels=3)).eval()
    batch = processor_like_batch(pairs=model_class is VKOODForImagesAndTextClassification)
    without = {k: v for k, v in batch.items() if k != "knowledge_mask"}
    extra = {"return_loss": False} if model_class is VKOODForImageTextRetrieval else {}
    with torch.no_grad():
        given, derived = model(**batch, **extra), model(**without, **extra)
    logits = "pooler_output" if model_class is VKOODModel else ("itm_logits" if extra else "logits")
    torch.testing.assert_close(derived[logits], given[logits])
    torch.testing.assert_close(derived.ood_gate, given.ood_gate)
    # the padded slots are gated to exactly 0 (the example without items, and the last slot of example 0)
    padded = batch["knowledge_mask"] == 0
    gate = derived.ood_gate if derived.ood_gate.dim() == 2 else derived.ood_gate[:, 0]
    assert padded.any() and (gate[padded] == 0).all()


def test_gallery_texts_derive_the_same_knowledge_mask():
    torch.manual_seed(0)
    model = VKOODForImageTextRetrieval(tiny_vkood_config()).eval()
    batch = processor_like_batch()
    args = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["knowledge_input_ids"],
        batch["knowledge_attention_mask"],
    )
    given, derived = model.encode_gallery_texts(*args, batch["knowledge_mask"]), model.encode_gallery_texts(*args)
    assert torch.equal(derived["knowledge_mask"], batch["knowledge_mask"])
    torch.testing.assert_close(derived["knowledge"], given["knowledge"])


def retrieval_batch(image_ids, seed=0):
    batch = {k: v[: len(image_ids)] for k, v in tiny_batch(batch_size=max(len(image_ids), 3), seed=seed).items()}
    batch["image_ids"] = torch.tensor(image_ids)
    # captions of the same image come with the same pixels
    first = {image: index for index, image in reversed(list(enumerate(image_ids)))}
    batch["pixel_values"] = batch["pixel_values"][[first[image] for image in image_ids]]
    return batch


@pytest.mark.parametrize("image_ids", [[5], [5, 5, 5], [1, 2, 2, 3]], ids=["one pair", "one image", "normal"])
def test_retrieval_loss_is_finite_and_trains_on_any_batch(image_ids):
    torch.manual_seed(0)
    model = VKOODForImageTextRetrieval(tiny_vkood_config())
    outputs = model(**retrieval_batch(image_ids), return_loss=True)
    assert torch.isfinite(outputs.loss) and torch.isfinite(outputs.itm_loss) and torch.isfinite(outputs.itc_loss)
    outputs.loss.backward()
    assert model.itm_head.weight.grad.abs().sum() > 0
    if len(set(image_ids)) == 1:
        # no negative exists: the ITM loss is that of the positive pairs alone
        itm_positive = torch.nn.functional.cross_entropy(
            outputs.itm_logits.float(), torch.ones(len(image_ids), dtype=torch.long)
        )
        assert outputs.itm_loss.item() == pytest.approx(itm_positive.item(), rel=1e-5)


def test_hard_negatives_never_pair_an_image_with_its_own_caption():
    torch.manual_seed(0)
    model = VKOODForImageTextRetrieval(tiny_vkood_config())
    image_ids = [1, 2, 2, 3]
    batch = retrieval_batch(image_ids)
    drawn = []
    original = torch.multinomial

    def recording(weights, num_samples, *args, **kwargs):
        drawn.append(original(weights, num_samples, *args, **kwargs).squeeze(1))
        return drawn[-1][:, None]

    torch.multinomial = recording
    try:
        model(**batch, return_loss=True)
    finally:
        torch.multinomial = original
    ids = torch.tensor(image_ids)
    negative_text, negative_image = drawn
    assert (ids[negative_text] != ids).all() and (ids[negative_image] != ids).all()

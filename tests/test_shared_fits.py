"""One OOD mixture per image: ITM's positive and negative pairs, and a gallery's re-ranked pairs, share their image's
fit (`ImplicitOODLayer.fit_images` / `ImageFit.select`), with the same numbers as fitting every pair's image anew."""

import pytest
import torch

from modeling_vkood import VKOODForImageTextRetrieval
from modeling_vkood.ood_vkood import ImageFit, ImplicitOODLayer
from modeling_vkood.training.ood_objectives import OODAlignmentLoss
from tests.utils.tiny import tiny_batch, tiny_ood_layer, tiny_vkood_config


@pytest.mark.parametrize("score, alignment", [("gem", "mean_direction"), ("log_likelihood", "gate")])
def test_a_shared_fit_scores_gates_and_trains_like_refitting_every_row(score, alignment):
    torch.manual_seed(0)
    layer = tiny_ood_layer(score=score).double().train()
    objective = OODAlignmentLoss(alignment)
    images = torch.randn(3, 6, 32, dtype=torch.float64, requires_grad=True)
    items = torch.randn(5, 4, 32, dtype=torch.float64)
    index = torch.tensor([0, 1, 2, 0, 2])
    relevance = torch.zeros(5, 4, dtype=torch.float64)
    relevance[:, 0] = 1.0
    refitted = layer(images[index], items, knowledge_relevance=relevance)
    refitted_alignment = objective.layer_loss(layer, refitted, None, relevance)
    refit_loss = refitted_alignment + (refitted.gate * torch.arange(4.0, dtype=torch.float64)).sum()
    refit_grads = torch.autograd.grad(refit_loss, [images, layer.projection.weight, layer.threshold])
    shared = layer(None, items, knowledge_relevance=relevance, image_fit=layer.fit_images(images).select(index))
    for field in ("scores", "gate", "means", "variances", "weights", "iterations"):
        torch.testing.assert_close(getattr(shared, field), getattr(refitted, field))
    shared_alignment = objective.layer_loss(layer, shared, None, relevance)
    torch.testing.assert_close(shared_alignment, refitted_alignment)
    shared_loss = shared_alignment + (shared.gate * torch.arange(4.0, dtype=torch.float64)).sum()
    for ours, reference in zip(
        torch.autograd.grad(shared_loss, [images, layer.projection.weight, layer.threshold]), refit_grads
    ):
        torch.testing.assert_close(ours, reference)


def test_image_fits_concatenate_by_chunks_and_refuse_a_row_count_that_does_not_match():
    torch.manual_seed(0)
    layer = tiny_ood_layer().double().eval()
    images = torch.randn(5, 6, 32, dtype=torch.float64)
    whole = layer.fit_images(images)
    chunked = ImageFit.cat([layer.fit_images(images[:2]), layer.fit_images(images[2:])])
    torch.testing.assert_close(chunked.mixture.means, whole.mixture.means)
    torch.testing.assert_close(chunked.reference, whole.reference)
    torch.testing.assert_close(chunked.direction, whole.direction)
    with pytest.raises(ValueError, match="2 images for 5 rows"):
        layer(None, torch.randn(5, 3, 32, dtype=torch.float64), image_fit=whole.select(torch.tensor([0, 1])))


def fitted_rows(monkeypatch):
    """The number of images each `fit_mixture` call fits, in order."""
    calls, fit = [], ImplicitOODLayer.fit_mixture

    def counting(self, points, mask=None):
        calls.append(points.shape[0])
        return fit(self, points, mask)

    monkeypatch.setattr(ImplicitOODLayer, "fit_mixture", counting)
    return calls


def test_itm_training_fits_each_image_once_for_its_positive_and_negative_pairs(monkeypatch):
    torch.manual_seed(0)
    model = VKOODForImageTextRetrieval(tiny_vkood_config()).train()
    batch = tiny_batch(batch_size=4)
    calls = fitted_rows(monkeypatch)
    output = model(**batch, return_loss=True)
    output.loss.backward()
    assert calls == [4]  # the 3 x 4 ITM pairs share the 4 images' fits (before: one fit of 12)
    assert model.vkood.ood.threshold.grad is not None and torch.isfinite(model.vkood.ood.threshold.grad).all()
    calls.clear()
    model(**{k: v for k, v in batch.items() if not k.startswith("knowledge")}, return_loss=True).loss.backward()
    assert calls == []  # no knowledge item: no EM


def test_rank_gallery_fits_each_gallery_image_once_with_the_scores_of_refitting_every_pair(monkeypatch):
    torch.manual_seed(0)
    model = VKOODForImageTextRetrieval(tiny_vkood_config(k_test=3)).eval()
    batch = tiny_batch(batch_size=5)
    images = model.encode_gallery_images(batch["pixel_values"])
    texts = model.encode_gallery_texts(
        batch["input_ids"],
        batch["attention_mask"],
        batch["knowledge_input_ids"],
        batch["knowledge_attention_mask"],
        batch["knowledge_mask"],
    )
    calls = fitted_rows(monkeypatch)
    shared = model.rank_gallery(images, texts, pair_batch_size=4)
    assert calls == [4, 1]  # 5 images in chunks of 4, for 2 x 15 re-ranked pairs
    calls.clear()
    monkeypatch.setattr(VKOODForImageTextRetrieval, "_fit_images", lambda self, *args, **kwargs: None)
    refitted = model.rank_gallery(images, texts, pair_batch_size=4)  # every pair's image fitted with the pair
    assert sum(calls) == 30
    for ours, reference in zip(shared, refitted):
        torch.testing.assert_close(ours, reference)

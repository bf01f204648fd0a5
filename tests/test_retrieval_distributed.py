"""Retrieval under torch.distributed, on two real gloo processes: the ITC loss sees the global batch (mean loss and
averaged gradients equal one process on the concatenated batch), and the sharded gallery evaluation equals the
one-process evaluation. Also: a retrieval training split has one row per caption; the logit scale is clamped."""

import math

import datasets
import pytest
import torch
from accelerate import Accelerator

from modeling_vkood.contrastive_vkood import VKOODLogitScale
from modeling_vkood.training import retrieval_eval
from modeling_vkood.training.data import one_row_per_caption
from tests.utils.paths import REPO_ROOT
from tests.utils.processes import run_two_ranks
from tests.utils.retrieval_fixtures import gallery_inputs, itc_batch, itc_gradients, tiny_retrieval_model


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, minilm_path):
    out = tmp_path / "two_processes.pt"
    run_two_ranks(REPO_ROOT / "tests" / "utils" / "distributed_retrieval_worker.py", str(out), minilm_path, timeout=300)
    distributed = torch.load(out, weights_only=False)  # written by the worker above: numpy score matrices

    model = tiny_retrieval_model().train()
    loss, grads = itc_gradients(model, itc_batch())
    torch.testing.assert_close(distributed["itc_loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    scores = []
    original = retrieval_eval.retrieval_recall
    retrieval_eval.retrieval_recall = lambda matrix, *args: scores.append(matrix) or original(matrix, *args)
    try:
        metrics = retrieval_eval.evaluate_retrieval(
            **gallery_inputs(model, minilm_path), accelerator=Accelerator(cpu=True)
        )
    finally:
        retrieval_eval.retrieval_recall = original
    assert distributed["metrics"] == metrics
    for two, one in zip(distributed["scores"], scores, strict=True):
        assert two.shape == one.shape == (5, 10)
        torch.testing.assert_close(torch.from_numpy(two), torch.from_numpy(one), rtol=1e-4, atol=1e-5)
    # k_test = 3 candidates re-ranked per query: image queries are the rows of i2t, text queries the columns of t2i.T
    image_to_text, text_to_image = (torch.from_numpy(matrix) > -100 for matrix in scores)
    assert (image_to_text.sum(1) == 3).all() and (text_to_image.sum(0) == 3).all()


def test_retrieval_training_split_has_one_row_per_caption():
    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(decode=False),
            "captions": datasets.List(datasets.Value("string")),
        }
    )
    split = datasets.Dataset.from_dict(
        {
            "image_id": [7, 8],
            "image": [{"path": "a.png", "bytes": None}, {"path": "b.png", "bytes": None}],
            "captions": [["one", "two", "three"], ["four"]],
        },
        features=features,
    )
    pairs = one_row_per_caption(split)
    assert pairs["image_id"] == [7, 7, 7, 8] and pairs["captions"] == [["one"], ["two"], ["three"], ["four"]]
    assert [image["path"] for image in pairs["image"]] == ["a.png", "a.png", "a.png", "b.png"]
    assert pairs.features == features


def test_logit_scale_is_clamped_at_100():
    scale = VKOODLogitScale()
    with torch.no_grad():
        scale.log_scale.fill_(math.log(500.0))
    assert scale().item() == 100.0
    with torch.no_grad():
        scale.log_scale.fill_(math.log(20.0))
    assert math.isclose(scale().item(), 20.0, rel_tol=1e-6)

"""The NLVR2 / SNLI-VE head honours `config.problem_type` as transformers' sequence classifiers do: regression (MSE),
single-label (cross-entropy, inferred for integer labels) and multi-label (BCE, inferred for float labels)."""

import pytest
import torch
from torch.nn import functional as F

from modeling_vkood import VKOODForImagesAndTextClassification
from tests.utils.tiny import tiny_batch, tiny_vkood_config

CASES = {  # problem_type given (None: inferred), num_labels, labels, loss of (logits, labels), problem_type after
    "single_label": (None, 2, torch.tensor([0, 1, 1]), F.cross_entropy, "single_label_classification"),
    "multi_label": (
        None,
        3,
        torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]]),
        F.binary_cross_entropy_with_logits,
        "multi_label_classification",
    ),
    "regression": (
        None,
        1,
        torch.tensor([0.5, -1.0, 2.0]),
        lambda logits, labels: F.mse_loss(logits.squeeze(), labels),
        "regression",
    ),
    "regression_set": ("regression", 2, torch.rand(3, 2), F.mse_loss, "regression"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pair_classifier_loss_follows_problem_type(case):
    problem_type, num_labels, labels, loss, after = CASES[case]
    torch.manual_seed(0)
    model = VKOODForImagesAndTextClassification(tiny_vkood_config(num_labels=num_labels, problem_type=problem_type))
    output = model(**tiny_batch(pairs=True), labels=labels)
    torch.testing.assert_close(output.loss, loss(output.logits.float(), labels))
    assert model.config.problem_type == after

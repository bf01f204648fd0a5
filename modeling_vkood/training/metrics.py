"""`compute_metrics` for the Trainer, on top of the official metrics in `modeling_vkood.evaluation`.

The Trainer keeps only the predicted class per example (`predicted_class`, its `preprocess_logits_for_metrics`), so
evaluation memory does not grow with the answer vocabulary; the references (raw human answers, NLVR2 identifiers)
come from the evaluation dataset, which the Trainer walks in order.
"""

import numpy as np
import torch

from modeling_vkood.evaluation import nlvr2_accuracy, vqa_accuracy
from modeling_vkood.knowledge import retrieval_cut


def predicted_class(logits, labels):
    """Argmax of the model's `logits` (the first output after the loss) for each example."""
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.argmax(-1)


def _predictions(eval_prediction, expected: int) -> np.ndarray:
    predictions = np.asarray(eval_prediction.predictions).reshape(-1)
    if predictions.shape[0] != expected:
        raise ValueError(f"{predictions.shape[0]} predictions for an evaluation set of {expected} examples")
    return predictions


class VQAMetrics:
    """Official VQA accuracy (percent) overall and per answer type: `vqa_accuracy`, `vqa_accuracy_<type>`."""

    def __init__(self, eval_dataset, id2label: dict[int, str]):
        self.answers = list(eval_dataset["answers"])
        self.answer_types = list(eval_dataset["answer_type"])
        self.id2label = id2label

    def __call__(self, eval_prediction) -> dict[str, float]:
        predictions = _predictions(eval_prediction, len(self.answers))
        scores = vqa_accuracy([self.id2label[int(i)] for i in predictions], self.answers, self.answer_types)
        per_type = {f"vqa_accuracy_{t.replace('/', '_')}": v for t, v in scores["per_answer_type"].items()}
        return {"vqa_accuracy": scores["overall"], **per_type}


class NLVR2Metrics:
    """NLVR2 accuracy and consistency (percent): `nlvr2_accuracy`, `nlvr2_consistency`."""

    def __init__(self, eval_dataset):
        self.labels = list(eval_dataset["label"])
        self.identifiers = list(eval_dataset["identifier"])

    def __call__(self, eval_prediction) -> dict[str, float]:
        predictions = _predictions(eval_prediction, len(self.labels))
        scores = nlvr2_accuracy(predictions.tolist(), self.labels, self.identifiers)
        return {"nlvr2_accuracy": scores["accuracy"], "nlvr2_consistency": scores["consistency"]}


__all__ = ["NLVR2Metrics", "VQAMetrics", "predicted_class"]


def knowledge_fit_labels(dataset, max_items: int) -> torch.Tensor | None:
    """`fits_image` of the items the collator encodes (each row cut to `max_items` as the processor cuts it,
    `retrieval_cut`), flat; None when the dataset does not label its items (only the knowledge-conditioned task
    does)."""
    knowledge = dataset.features.get("knowledge")
    item_features = getattr(knowledge, "feature", None)
    if not isinstance(item_features, dict) or "fits_image" not in item_features:
        return None
    return torch.tensor(
        [item["fits_image"] for row in dataset["knowledge"] for item in retrieval_cut(row, max_items)], dtype=torch.bool
    )


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for `positive` against the rest (Mann-Whitney, ties count half)."""
    positives, negatives = int(positive.sum()), int((~positive).sum())
    if not positives or not negatives:
        raise ValueError("AUROC needs both positive and negative items")
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    counts = counts.double()
    ranks = (counts.cumsum(0) - counts + (counts + 1) / 2)[inverse]  # 1-based ranks, the mean rank for ties
    return float((ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def ood_fit_metrics(scores: torch.Tensor, gates: torch.Tensor, fits: torch.Tensor) -> dict[str, float]:
    """How well the OOD layer tells the items that fit the image from the others: AUROC of the scores, and the
    fraction of each kind that the gate keeps (gate > 0.5)."""
    if len(scores) != len(fits):
        raise ValueError(
            f"{len(scores)} OOD scores for {len(fits)} labelled items: the collated items and the "
            "dataset's knowledge column are out of step"
        )
    kept = gates > 0.5
    return {
        "ood_auroc_fitting": auroc(scores, fits),
        "ood_kept_fraction_fitting": float(kept[fits].float().mean()),
        "ood_kept_fraction_not_fitting": float(kept[~fits].float().mean()),
    }

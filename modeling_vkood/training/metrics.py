"""`compute_metrics` for the Trainer, on top of the official metrics in `modeling_vkood.evaluation`.

The Trainer keeps only the predicted class per example (`predicted_class`, its `preprocess_logits_for_metrics`), so
evaluation memory does not grow with the answer vocabulary; the references (raw human answers, NLVR2 identifiers)
come from the evaluation dataset, which the Trainer walks in order.
"""

import numpy as np

from modeling_vkood.evaluation import nlvr2_accuracy, vqa_accuracy


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

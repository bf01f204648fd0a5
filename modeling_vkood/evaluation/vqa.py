"""Official VQA accuracy: min(1, matches/3) averaged over the leave-one-out subsets of the human answers."""

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .vqa_normalization import normalize_answer, normalize_references


def leave_one_out_accuracy(matches: int, num_answers: int) -> float:
    """Mean over the `num_answers` subsets that leave one human answer out of min(1, matches in subset / 3).

    Closed form of the official loop: the `matches` subsets that drop a matching answer see matches - 1, the
    others see all of them. For 10 answers this gives 0.3, 0.6, 0.9, 1.0 for 1, 2, 3, >=4 matches.
    """
    if num_answers == 1:
        # The official rule is undefined for one reference (every subset is empty and would score 0); a single
        # reference answer (easy-VQA) is scored by exact match instead.
        return float(matches)
    kept = matches * min(1.0, (matches - 1) / 3) if matches else 0.0
    return (kept + (num_answers - matches) * min(1.0, matches / 3)) / num_answers


def answer_scores(candidates: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Official accuracy (0..1) each candidate answer would score on one question with these raw human answers.

    Used both to score predictions and to derive soft training targets, so targets equal the metric.
    """
    if len(answers) == 0:
        raise ValueError("a question without reference answers cannot be scored (test splits have none)")
    references = normalize_references(list(answers))
    scores = []
    for candidate in candidates:
        candidate = normalize_answer(candidate)
        scores.append(leave_one_out_accuracy(sum(ref == candidate for ref in references), len(references)))
    return scores


def vqa_accuracy(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    answer_types: Sequence[str] | None = None,
) -> dict:
    """VQA accuracy in percent, identical to the official evaluation toolkit (unrounded).

    `references[i]` holds the raw human answers of question i (10 in VQAv2/OK-VQA). Returns
    {"overall": float, "per_answer_type": {type: float}} (the latter empty without `answer_types`).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    if answer_types is not None and len(answer_types) != len(predictions):
        raise ValueError(f"{len(answer_types)} answer types for {len(predictions)} questions")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    scores = np.array([answer_scores([p], r)[0] for p, r in zip(predictions, references)], dtype=np.float64)
    per_type: dict[str, list[int]] = defaultdict(list)
    for index, answer_type in enumerate(answer_types or ()):
        per_type[answer_type].append(index)
    return {
        "overall": 100.0 * float(scores.mean()),
        "per_answer_type": {t: 100.0 * float(scores[idx].mean()) for t, idx in sorted(per_type.items())},
    }

"""Official VQA accuracy (current `vqaEval.py`): min(1, matches/3) averaged over the leave-one-out subsets of the
human answers, per question, then averaged overall, per answer type and per question type."""

from collections import defaultdict
from collections.abc import Sequence

from .vqa_normalization import clean_answer, normalize_answer

# What the official toolkit prints: percentages rounded to 2 decimals (Python's round).
OFFICIAL_DECIMALS = 2


def comparable_answers(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """The prediction and the human answers in the form the official evaluation compares them.

    Everything is cleaned (newlines/tabs to spaces, stripped). Only when the cleaned human answers are not all
    identical are both the human answers and the prediction normalised (`normalize_answer`); when they are all
    identical the cleaned raw strings are compared, so "Yes" does not match ten "yes".
    """
    references = [clean_answer(answer) for answer in answers]
    if len(set(references)) > 1:
        return normalize_answer(prediction), [normalize_answer(answer) for answer in references]
    return clean_answer(prediction), references


def leave_one_out_accuracy(hits: Sequence[bool]) -> float:
    """Mean over the subsets that leave one human answer out of min(1, matching answers in the subset / 3).

    `hits[i]` says whether human answer i matches the prediction. The sum runs in the official order, so the
    value is bit-identical to the official one. (The official loop drops from each subset every answer record
    equal to the held-out one; records carry a unique `answer_id`, so that is exactly one answer.)
    """
    if len(hits) == 1:
        # The official rule is undefined for one reference (every subset is empty and would score 0); a single
        # reference answer (easy-VQA) is scored by exact match instead.
        return float(hits[0])
    matches = sum(hits)
    return sum(min(1.0, (matches - hit) / 3) for hit in hits) / len(hits)


def answer_scores(candidates: Sequence[str], answers: Sequence[str]) -> list[float]:
    """Official accuracy (0..1) each candidate answer would score on one question with these raw human answers.

    Used both to score predictions and to derive soft training targets, so targets equal the metric.
    """
    if len(answers) == 0:
        raise ValueError("a question without reference answers cannot be scored (test splits have none)")
    scores = []
    for candidate in candidates:
        prediction, references = comparable_answers(candidate, answers)
        scores.append(leave_one_out_accuracy([reference == prediction for reference in references]))
    return scores


def _percent(scores: list[float], decimals: int | None) -> float:
    value = 100 * sum(scores) / len(scores)  # the official expression, summed in question order
    return value if decimals is None else round(value, decimals)


def _grouped(scores: list[float], groups: Sequence[str] | None, decimals: int | None) -> dict[str, float]:
    per_group: dict[str, list[float]] = defaultdict(list)
    for score, group in zip(scores, groups or ()):
        per_group[group].append(score)
    return {group: _percent(values, decimals) for group, values in sorted(per_group.items())}


def vqa_accuracy(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    answer_types: Sequence[str] | None = None,
    question_types: Sequence[str] | None = None,
    decimals: int | None = None,
) -> dict:
    """VQA accuracy in percent, identical to the current official evaluation toolkit.

    `references[i]` holds the raw human answers of question i (10 in VQAv2/OK-VQA). Returns {"overall": float,
    "per_answer_type": {type: float}, "per_question_type": {type: float}} (the breakdowns empty without their
    types). Values are unrounded by default; `decimals=OFFICIAL_DECIMALS` rounds them as the toolkit reports them.
    """
    for name, values in (("answer types", answer_types), ("question types", question_types)):
        if values is not None and len(values) != len(predictions):
            raise ValueError(f"{len(values)} {name} for {len(predictions)} questions")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    scores = [answer_scores([prediction], answers)[0] for prediction, answers in zip(predictions, references)]
    return {
        "overall": _percent(scores, decimals),
        "per_answer_type": _grouped(scores, answer_types, decimals),
        "per_question_type": _grouped(scores, question_types, decimals),
    }

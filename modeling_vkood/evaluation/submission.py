"""Predictions in the official submission formats, checked before they are written.

- VQAv2 / OK-VQA: the results file of the VQA evaluation server and toolkit, a JSON list
  `[{"question_id": int, "answer": str}, ...]` with every question of the split exactly once (the toolkit's
  `loadRes` rejects a file whose question ids differ from the split's in any way).
- NLVR2: the CSV read by NLVR2's official `nlvr2/eval/metrics.py`: one `identifier,prediction` line per example,
  prediction "True" or "False", no header line (that script reads every line as a prediction).
"""

import csv
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

NLVR2_LABELS = ("False", "True")


def _check_complete(ids: Sequence, expected: Iterable | None, what: str) -> None:
    """Each id once and, when `expected` is given, exactly the expected ids; the error names what is wrong."""
    repeated = [key for key, count in Counter(ids).items() if count > 1]
    if repeated:
        raise ValueError(f"{len(repeated)} {what}s appear more than once, e.g. {repeated[:3]}")
    if expected is None:
        return
    expected = set(expected)
    missing, extra = sorted(expected - set(ids)), sorted(set(ids) - expected)
    if missing or extra:
        raise ValueError(
            f"the predictions must cover every {what} of the split exactly once: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(extra)} not in the split (e.g. {extra[:3]})"
        )


def _write_atomically(path: os.PathLike, write) -> Path:
    """Write through a temporary file and rename it, so a crash never leaves half a submission."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: never shared mid-write
    with open(temporary, "w", encoding="utf-8", newline="") as handle:
        write(handle)
    os.replace(temporary, path)
    return path


def vqa_results(question_ids: Sequence[int], answers: Sequence[str], expected_question_ids=None) -> list[dict]:
    """The VQA results list, after checking one string answer per question and the question set."""
    if len(question_ids) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(question_ids)} questions")
    ids = [int(question_id) for question_id in question_ids]  # numpy / torch integers become JSON numbers
    if any(not isinstance(answer, str) for answer in answers):
        raise ValueError("every answer must be a string")
    _check_complete(ids, None if expected_question_ids is None else map(int, expected_question_ids), "question_id")
    return [{"question_id": question_id, "answer": answer} for question_id, answer in zip(ids, answers)]


def write_vqa_results(path, question_ids, answers, expected_question_ids=None) -> Path:
    """Write the VQA results file (see `vqa_results`) to `path`; returns the path."""
    results = vqa_results(question_ids, answers, expected_question_ids)
    return _write_atomically(path, lambda handle: json.dump(results, handle))


def official_question_ids(questions_file: os.PathLike) -> list[int]:
    """Question ids of an official VQA questions file (`{"questions": [{"question_id": ...}, ...]}`)."""
    with open(questions_file, encoding="utf-8") as handle:
        return [question["question_id"] for question in json.load(handle)["questions"]]


def nlvr2_label(prediction) -> str:
    """ "True" / "False" for a class id (0 = False, 1 = True, NLVR2's ClassLabel order), bool or label string."""
    if isinstance(prediction, str) and prediction in NLVR2_LABELS:
        return prediction
    if not isinstance(prediction, str) and prediction in (0, 1):  # also True/False and numpy integers
        return NLVR2_LABELS[int(prediction)]
    raise ValueError(f"an NLVR2 prediction must be 0/1, a bool or 'True'/'False', got {prediction!r}")


def write_nlvr2_predictions(path, identifiers: Sequence[str], predictions: Sequence, expected_identifiers=None) -> Path:
    """Write NLVR2 predictions as `identifier,prediction` lines (see the module docstring); returns the path."""
    if len(identifiers) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(identifiers)} examples")
    if any("," in identifier or "\n" in identifier for identifier in identifiers):
        raise ValueError("an NLVR2 identifier cannot hold a comma or a newline in this CSV")
    _check_complete(list(identifiers), expected_identifiers, "identifier")
    rows = [(identifier, nlvr2_label(prediction)) for identifier, prediction in zip(identifiers, predictions)]
    return _write_atomically(path, lambda handle: csv.writer(handle, lineterminator="\n").writerows(rows))

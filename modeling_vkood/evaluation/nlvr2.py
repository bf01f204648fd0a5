"""NLVR2 accuracy and consistency, with the grouping of the official `nlvr2/eval/metrics.py`."""

from collections.abc import Sequence

import numpy as np


def _as_bool(label, what: str, index: int) -> bool:
    """Accept the label spellings in use: bool, 0/1 (ClassLabel ["False", "True"]), "True"/"False" any case."""
    if isinstance(label, str):
        lowered = label.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
    elif label in (0, 1):  # also matches True/False and numpy integers
        return bool(label)
    raise ValueError(f"{what}[{index}] = {label!r} is not a boolean label")


def sentence_key(identifier: str) -> str:
    """Group key of an example: its identifier `{split}-{set}-{pair}-{sentence}` without the pair number.

    The official script blanks the pair field, so every image pair written for the same sentence of the same
    set falls in one group; consistency asks that all of them are right.
    """
    parts = identifier.split("-")
    if len(parts) != 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not of the form split-set-pair-sentence")
    return f"{parts[0]}-{parts[1]}-{parts[3]}"


def nlvr2_accuracy(predictions: Sequence, references: Sequence, identifiers: Sequence[str]) -> dict:
    """{"accuracy": %, "consistency": %}: share of right examples, share of sentences right on all their pairs."""
    if not len(predictions) == len(references) == len(identifiers):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references, {len(identifiers)} ids")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    correct = np.array(
        [
            _as_bool(p, "predictions", i) == _as_bool(r, "references", i)
            for i, (p, r) in enumerate(zip(predictions, references))
        ]
    )
    _, group = np.unique([sentence_key(identifier) for identifier in identifiers], return_inverse=True)
    wrong_per_group = np.bincount(group, weights=~correct)
    return {
        "accuracy": 100.0 * float(correct.mean()),
        "consistency": 100.0 * float((wrong_per_group == 0).mean()),
    }

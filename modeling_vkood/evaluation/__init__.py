"""Official metrics as plain functions (numpy only), `evaluate` modules that call them, and the writers of
prediction files in the official submission formats (`submission`).

`evaluate.load(metric_path("vqa_accuracy"))` loads the matching module offline from this package.
"""

from pathlib import Path

from .nlvr2 import nlvr2_accuracy
from .retrieval import retrieval_recall
from .submission import write_nlvr2_predictions, write_vqa_results
from .vqa import OFFICIAL_DECIMALS, answer_scores, vqa_accuracy
from .vqa_normalization import clean_answer, normalize_answer

EVALUATE_MODULES = ("vqa_accuracy", "nlvr2_accuracy", "retrieval_recall")


def metric_path(name: str) -> str:
    """Folder of the `evaluate` module `name`, for `evaluate.load(metric_path(name))`."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown metric {name!r}; choose one of {EVALUATE_MODULES}")
    return str(Path(__file__).parent / "evaluate_modules" / name)


__all__ = [
    "EVALUATE_MODULES",
    "OFFICIAL_DECIMALS",
    "answer_scores",
    "clean_answer",
    "metric_path",
    "nlvr2_accuracy",
    "normalize_answer",
    "retrieval_recall",
    "vqa_accuracy",
    "write_nlvr2_predictions",
    "write_vqa_results",
]

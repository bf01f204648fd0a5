"""`evaluate` wrapper of `modeling_vkood.evaluation.vqa_accuracy` (official VQA accuracy, percent)."""

import datasets
import evaluate

from modeling_vkood.evaluation import vqa_accuracy

_DESCRIPTION = """Official VQA accuracy, as the current VQA evaluation toolkit (vqaEval.py, commit a013f00) computes it:
where the human answers of a question disagree, they and the prediction are normalised (punctuation, then digits,
articles and contractions), otherwise the stripped strings are compared; each question scores min(1, matches/3)
averaged over the leave-one-out subsets of its human answers."""
_KWARGS = """
Args:
    predictions (list of str): one predicted answer per question.
    references (list of list of str): the raw human answers of each question.
    answer_types (list of str, optional): answer type of each question, for the per-answer-type breakdown.
    question_types (list of str, optional): question type of each question, for the per-question-type breakdown.
    decimals (int, optional): round as the toolkit reports (2); unrounded by default.
Returns:
    overall (float): accuracy in percent; per_answer_type, per_question_type (dict): accuracy per type.
"""
_CITATION = """@inproceedings{goyal2017making,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR}, year={2017}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class VqaAccuracy(evaluate.Metric):
    """Official VQA accuracy; the maths live in the plain function."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, answer_types=None, question_types=None, decimals=None):
        return vqa_accuracy(predictions, references, answer_types, question_types, decimals)

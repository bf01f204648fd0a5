"""`evaluate` wrapper of `modeling_vkood.evaluation.nlvr2_accuracy` (accuracy and consistency, percent)."""

import datasets
import evaluate

from modeling_vkood.evaluation import nlvr2_accuracy

_DESCRIPTION = """NLVR2 accuracy and consistency (share of sentences whose every image pair is answered right),
grouped as the official NLVR2 evaluation script does."""
_KWARGS = """
Args:
    predictions (list of int): 1 = True, 0 = False.
    references (list of int): gold labels, same coding.
    identifiers (list of str): NLVR2 identifiers `split-set-pair-sentence`, for consistency.
Returns:
    accuracy (float) and consistency (float), in percent.
"""
_CITATION = """@inproceedings{suhr2019corpus,
  title={A Corpus for Reasoning about Natural Language Grounded in Photographs},
  author={Suhr, Alane and Zhou, Stephanie and Zhang, Ally and Zhang, Iris and Bai, Huajun and Artzi, Yoav},
  booktitle={ACL}, year={2019}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Nlvr2Accuracy(evaluate.Metric):
    """NLVR2 accuracy and consistency; the maths live in the plain function."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, identifiers):
        return nlvr2_accuracy(predictions, references, identifiers)

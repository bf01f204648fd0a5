"""`evaluate` wrapper of `modeling_vkood.evaluation.retrieval_recall` (R@1/5/10 both directions, percent)."""

import datasets
import evaluate
import numpy as np

from modeling_vkood.evaluation import retrieval_recall

_DESCRIPTION = """Image-text retrieval recall@1/5/10 for image->text and text->image, and their mean r_mean.
One example per text query: its similarity to every image, and the index of the image it describes."""
_KWARGS = """
Args:
    predictions (list of list of float): predictions[t][i] = similarity of text t and image i (n_texts x n_images).
    references (list of int): references[t] = index of the image that text t describes.
Returns:
    i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, r_mean (floats, percent).
"""
_CITATION = """@inproceedings{karpathy2015deep,
  title={Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li}, booktitle={CVPR}, year={2015}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RetrievalRecall(evaluate.Metric):
    """Retrieval recall; the maths live in the plain function (which takes the image x text matrix)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        return retrieval_recall(np.asarray(predictions).T, references)

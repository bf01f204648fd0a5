"""Image-text retrieval recall@K in both directions from one similarity matrix."""

from collections.abc import Sequence

import numpy as np


def retrieval_recall(scores, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@K in percent for image->text (i2t) and text->image (t2i) retrieval, and their mean `r_mean`.

    `scores[i, t]` is the similarity of image i and text t (n_images x n_texts); `text_to_image[t]` is the image
    that text t describes (Karpathy test sets: 5 captions per image). An image query is a hit at K when any of
    its captions ranks within the top K texts; a text query when its image ranks within the top K images.
    Ties count against the query (rank = number of wrong candidates scoring at least as high as the best right
    one), so a model that gives every pair the same score gets no credit.
    """
    scores = np.asarray(scores, dtype=np.float64)
    gt = np.asarray(text_to_image, dtype=np.int64)
    if scores.ndim != 2 or gt.shape != (scores.shape[1],):
        raise ValueError(f"scores {scores.shape} must be n_images x n_texts with one image per text ({gt.shape})")
    if gt.size and (gt.min() < 0 or gt.max() >= scores.shape[0]):
        raise ValueError("text_to_image holds an image index outside the score matrix")
    positive = np.zeros(scores.shape, dtype=bool)
    positive[gt, np.arange(gt.size)] = True
    captionless = np.flatnonzero(~positive.any(axis=1))
    if captionless.size:
        raise ValueError(f"images {captionless[:10].tolist()} have no caption in text_to_image")

    best_positive = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    i2t_rank = ((scores >= best_positive) & ~positive).sum(axis=1)
    t2i_rank = ((scores >= scores[gt, np.arange(gt.size)]) & ~positive).sum(axis=0)

    result = {}
    for direction, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            result[f"{direction}_r{k}"] = 100.0 * float((ranks < k).mean())
    result["r_mean"] = float(np.mean(list(result.values())))
    return result

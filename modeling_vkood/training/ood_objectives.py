"""Training objectives of the implicit OOD layer, kept beside the model (as open_clip keeps `ClipLoss`) because
inference does not need them: the alignment losses that teach the layer which knowledge fits the image, and the
data-dependent start of its threshold.

The losses read the layer's own outputs (`ImplicitOODOutput`: scores, projected items, the images' fits), captured
during the training forward by `capture_ood_outputs`, with the batch's `knowledge_relevance` (B, M): 1 for the items
that state the training answer (the pseudo-relevance of retrieval-augmented VQA). Alignments (`--ood_alignment`):
- "contrastive": an InfoNCE over each question's candidates: the relevant items must outscore the others;
- "gate": that InfoNCE plus a class-balanced BCE of the gate against the relevance on detached scores (the InfoNCE
  orders the scores, the BCE places tau);
- "mean_direction": every projected item pulled towards its image's mean direction (the robustness study's
  regulariser; needs no relevance).
The first two can add the cross-image term (`--ood_cross_image_weight`): each relevant item must score higher under
its own image's mixture than under the batch's other images'.
"""

from contextlib import contextmanager

import torch
from torch.nn import functional as F

from ..ood_vkood import ImplicitOODLayer

OOD_ALIGNMENTS = ("contrastive", "gate", "mean_direction")
# The alignments trained on `knowledge_relevance`.
RELEVANCE_ALIGNMENTS = ("contrastive", "gate")


def relevance_contrastive_loss(scores, knowledge_mask, knowledge_relevance, temperature=1.0):
    """-log sum_pos softmax(scores / temperature) over each example's real items: under its image's mixture, the items
    that state the example's answer must outscore its other candidates (MMFT's alignment, with the layer's density
    as the similarity and the retrieved candidates as the negatives).

    The scores see the image and the item, never the question: when different questions about one image are answered
    by different items that all fit it, the optimum scores every fitting item alike and the others low, so the loss
    teaches fit to the image, not the answer. Examples without a positive contribute nothing."""
    absent = torch.finfo(scores.dtype).min / 4  # large and finite: no NaN gradients from padded items
    logits = (scores / temperature).masked_fill(knowledge_mask == 0, absent)
    positive = knowledge_relevance.to(scores.dtype) * knowledge_mask
    has_positive = positive.sum(1) > 0
    per_example = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(positive == 0, absent), 1)
    # where, not a product: with no item at all (M = 0) per_example is -inf - (-inf)
    return torch.where(has_positive, per_example, 0.0).sum() / has_positive.sum().clamp_min(1)


def cross_image_contrastive_loss(layer, knowledge_points, image_fit, knowledge_mask, knowledge_relevance, temperature):
    """InfoNCE over the batch's images: every relevant item is scored under each row's mixture (`layer.score`), and
    its own row's image must win, -log softmax over rows of (score / temperature).

    The candidates of one question differ only in their concept; the other images of the same forward add negatives
    that differ in what they show (a larger batch gives more). Two rows of one image give equal logits, whose
    gradients cancel; images that show the item's concept too raise the loss's floor. `knowledge_points` (B, M, d')
    projected items, `image_fit` the rows' fits. Examples without a positive contribute nothing."""
    rows, items, dim = knowledge_points.shape
    every_item = knowledge_points.reshape(1, rows * items, dim).expand(rows, rows * items, dim)
    logits = layer.score(every_item, image_fit) / temperature  # (images, items of the whole batch)
    own_row = torch.arange(rows, device=logits.device).repeat_interleave(items)
    per_item = torch.logsumexp(logits, 0) - logits.gather(0, own_row.unsqueeze(0)).squeeze(0)
    positive = (knowledge_relevance.to(logits.dtype) * knowledge_mask).reshape(-1)
    return (per_item * positive).sum() / positive.sum().clamp_min(1.0)


def gate_relevance_loss(gate_logits, knowledge_mask, knowledge_relevance):
    """Class-balanced binary cross-entropy of the gate against the relevance: per example, the mean BCE of its
    positives plus that of its other real items, so that one positive among ten candidates weighs as much as the ten.

    An item that fits the image but states another question's answer is a positive in some examples and a negative in
    others; the balance puts its optimal gate above 1/2, while an item about what the image does not show is never a
    positive and goes to 0. Examples without a positive contribute nothing."""
    positive = knowledge_relevance.to(gate_logits.dtype) * knowledge_mask
    negative = (1.0 - positive) * knowledge_mask
    has_positive = (positive.sum(1) > 0).to(gate_logits.dtype)
    positive_term = (F.softplus(-gate_logits) * positive).sum(1) / positive.sum(1).clamp_min(1.0)
    negative_term = (F.softplus(gate_logits) * negative).sum(1) / negative.sum(1).clamp_min(1.0)
    return ((positive_term + negative_term) * has_positive).sum() / has_positive.sum().clamp_min(1.0)


def mean_direction_loss(image_direction, knowledge_points, knowledge_mask):
    """1 - cos(item, its image's mean direction) on the hypersphere of the projection, averaged over real items."""
    cosine = torch.einsum("bmd,bd->bm", F.normalize(knowledge_points, dim=-1), image_direction)
    return ((1.0 - cosine) * knowledge_mask).sum() / knowledge_mask.sum().clamp_min(1.0)


class OODAlignmentLoss:
    """The OOD layer's alignment objective, `weight` x (its loss terms), as a trainer loss term: a batch mean, like
    the heads' losses, so the sum keeps the Trainer's loss contract. Called with what `capture_ood_outputs` recorded
    during the forward: each (layer, its keyword inputs, its `ImplicitOODOutput`)."""

    needs_ood_outputs = True

    def __init__(self, kind="gate", weight=1.0, temperature=1.0, cross_image_weight=0.0):
        if kind not in OOD_ALIGNMENTS:
            raise ValueError(f"--ood_alignment must be one of {OOD_ALIGNMENTS}, got {kind!r}")
        if weight < 0 or cross_image_weight < 0 or not temperature > 0:
            raise ValueError(
                "--ood_alignment_weight and --ood_cross_image_weight must be >= 0 and --ood_alignment_temperature "
                f"> 0, got {weight}, {cross_image_weight}, {temperature}"
            )
        if cross_image_weight > 0 and kind not in RELEVANCE_ALIGNMENTS:
            raise ValueError(
                f"--ood_cross_image_weight needs an --ood_alignment among {RELEVANCE_ALIGNMENTS} (its positives are "
                f"the relevant items), got {kind!r}"
            )
        self.kind, self.weight, self.temperature, self.cross_image_weight = (
            kind,
            weight,
            temperature,
            cross_image_weight,
        )

    def layer_loss(self, layer, output, knowledge_mask, knowledge_relevance):
        """The unweighted loss of one call of `layer` that gave `output`."""
        points = output.knowledge_points
        mask = torch.ones(points.shape[:2], device=points.device) if knowledge_mask is None else knowledge_mask
        mask = mask.to(points.dtype)
        if self.kind == "mean_direction":
            if output.image_fit is None:  # no knowledge item
                return points.new_zeros(())
            return mean_direction_loss(output.image_fit.direction, points, mask)
        if knowledge_relevance is None:
            return points.new_zeros(())
        loss = relevance_contrastive_loss(output.scores, mask, knowledge_relevance, self.temperature)
        if self.cross_image_weight > 0 and output.image_fit is not None:
            cross = cross_image_contrastive_loss(
                layer, points, output.image_fit, mask, knowledge_relevance, self.temperature
            )
            loss = loss + self.cross_image_weight * cross
        if self.kind == "gate":
            # on detached scores: the BCE places tau, the InfoNCE orders the scores
            loss = loss + gate_relevance_loss(layer.gate_logits(output.scores.detach()), mask, knowledge_relevance)
        return loss

    def __call__(self, model, outputs, batch, unwrapped=None, ood_outputs=()):
        total = None
        for layer, inputs, output in ood_outputs:
            loss = self.layer_loss(layer, output, inputs.get("knowledge_mask"), inputs.get("knowledge_relevance"))
            total = loss if total is None else total + loss
        if total is None:  # no OOD layer ran
            return outputs.loss.new_zeros(())
        return self.weight * total


@contextmanager
def capture_ood_outputs(model):
    """Record every call of the model's OOD layers (PEFT's trained copy included) while the block runs: yields a list
    that fills with (layer, keyword inputs, `ImplicitOODOutput`)."""
    records = []

    def record(layer, args, kwargs, output):
        records.append((layer, kwargs, output))

    handles = [
        module.register_forward_hook(record, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, ImplicitOODLayer)
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def calibrate_threshold(layer, scores, quantile):
    """Data-dependent start of tau (as ActNorm's): the `quantile` of the scores of real items, so that the knowledge
    path starts open (knowledge encoded by a text model starts far from the image tokens; with every gate at 0 no
    gradient would reach it).

    `scores` (any shape) holds this process's real-item scores, possibly none. Under torch.distributed this is a
    collective, so EVERY rank must call it: the scores of all ranks are gathered and the quantile is taken over their
    union, so every replica gets the same tau, equal to a single process's on the same examples. Call it before the
    optimizer (and any ZeRO/FSDP wrapper) exists, so that the optimizer's master copy starts from it. Returns tau, or
    None when no process had a real item (tau and the calibrated flag are then left as they are)."""
    scores = scores.detach().float().reshape(-1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        count = torch.tensor([scores.numel()], device=scores.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        torch.distributed.all_gather(counts, count)
        counts = [int(c) for c in counts]
        if max(counts) == 0:
            return None
        padded = torch.cat([scores, scores.new_zeros(max(counts) - scores.numel())])
        gathered = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(gathered, padded)
        scores = torch.cat([part[:n] for part, n in zip(gathered, counts)])
    if scores.numel() == 0:
        return None
    threshold = torch.quantile(scores, quantile)
    layer.set_threshold(threshold)
    return threshold.item()

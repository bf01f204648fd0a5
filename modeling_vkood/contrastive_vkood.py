"""Image-text contrastive learning of the retrieval head (ITC, as in ALBEF / CLIP): the learnable temperature, the
symmetric InfoNCE over the global batch, and the hard negatives that ITM is trained on (Hub remote code: torch only)."""

import math

import torch
from torch import nn
from torch.nn import functional as F


class VKOODLogitScale(nn.Module):
    """The learnable ITC temperature as log scale (CLIP's 1/0.07 start), in a module of its own so that LoRA runs
    can list it in PEFT's `modules_to_save`: a bare parameter on the task model would stay frozen. The scale is
    clamped to at most 100, as CLIP does, so that the contrastive logits cannot grow without bound."""

    max_scale = 100.0

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(
            torch.full((1,), math.log(1 / 0.07))
        )  # (1,): DeepSpeed ZeRO cannot broadcast 0-dim

    def forward(self):
        return self.log_scale.exp().clamp(max=self.max_scale)


class _GatherWithGradient(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands every process the summed gradient of its own slice: each
    process's loss also depends on the features of the others (as contrastive keys)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank, ctx.size = torch.distributed.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def _world():
    """(rank, world size) of the torch.distributed run, (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def contrastive_loss(image_embeds, text_embeds, scale, image_ids=None, gather=False):
    """Symmetric InfoNCE (ITC); with `gather` under torch.distributed, this process's pairs against the global batch.

    Each process scores its B images against the texts of every process and its B texts against every image
    (ALBEF/CLIP: the negatives come from the global batch); pairs whose `image_ids` agree (several captions of one
    image) are all positives, with equal target weight. The mean of the processes' losses equals the loss of one
    process holding the global batch, and so do the gradients that DDP averages. Every process must hold the same
    batch size (the Trainer's data loaders keep batches even across processes).
    """
    batch, device = image_embeds.shape[0], image_embeds.device
    rank, world = _world() if gather else (0, 1)
    all_images, all_texts, all_ids = image_embeds, text_embeds, image_ids
    if world > 1:
        all_images, all_texts = _GatherWithGradient.apply(image_embeds), _GatherWithGradient.apply(text_embeds)
        if image_ids is not None:
            parts = [torch.empty_like(image_ids) for _ in range(world)]
            torch.distributed.all_gather(parts, image_ids.contiguous())
            all_ids = torch.cat(parts)
    if image_ids is None:  # each pair is its own image: its position in the global batch
        image_ids = torch.arange(batch, device=device) + rank * batch
        all_ids = torch.arange(all_images.shape[0], device=device)
    positives = (image_ids[:, None] == all_ids[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-F.log_softmax(scale * image_embeds @ all_texts.t(), 1) * targets, 1).mean()
        + torch.sum(-F.log_softmax(scale * text_embeds @ all_images.t(), 1) * targets, 1).mean()
    )


@torch.no_grad()
def draw_hard_negatives(logits_per_image, positives):
    """For each image a text, and for each text an image, drawn with probability softmax(similarity) among its
    non-positives (ALBEF's hard negatives for ITM). `logits_per_image` (B, B) ITC similarities, `positives` (B, B)
    True where image i and text j match. Returns (negative_text (B,), negative_image (B,), has_text_negative (B,),
    has_image_negative (B,)): a row without any negative (a batch of one image, or every caption about the same image)
    draws an arbitrary index with uniform weights and its `has_*` is False, so its pair can be left out of the loss."""
    logits = logits_per_image.detach().float().masked_fill(positives, float("-inf"))
    has_text_negative = (~positives).any(1)
    has_image_negative = (~positives).any(0)
    text_weights = torch.where(has_text_negative[:, None], logits.softmax(1), 1.0)
    image_weights = torch.where(has_image_negative[:, None], logits.t().softmax(1), 1.0)
    negative_text = torch.multinomial(text_weights, 1).squeeze(1)
    negative_image = torch.multinomial(image_weights, 1).squeeze(1)
    return negative_text, negative_image, has_text_negative, has_image_negative


__all__ = ["VKOODLogitScale", "contrastive_loss", "draw_hard_negatives"]

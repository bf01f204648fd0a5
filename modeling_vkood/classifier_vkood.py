"""The classifiers of the VQA and NLVR2 heads over the pooled [text ; image] of each fused pair (Hub remote code:
torch only)."""

import torch
from torch import nn
from torch.nn import functional as F


class VKOODGatedProductHead(nn.Module):
    """Classifier over [text ; image ; text * image] of each fused pair through a GeGLU layer (GELU(gate) * value).

    METER's MLP over [text ; image] adds its inputs before the nonlinearity, so an answer that depends on a product
    of three features (the colour named in the question, the colour in the image, and a "not": "is there not a red
    shape?") only shows up in its gradient at second order, and training sits on the answer prior (the easy-VQA recipe's
    runs, benchmarks/README.md). Here the elementwise product and the gate make that function trilinear in the pooled
    vectors: learnable from the start.
    """

    def __init__(self, hidden_size, pairs, num_labels, dropout):
        super().__init__()
        self.hidden_size, self.pairs = hidden_size, pairs
        width, inner = 3 * pairs * hidden_size, 2 * pairs * hidden_size
        self.gate = nn.Linear(width, inner)
        self.value = nn.Linear(width, inner)
        self.norm = nn.LayerNorm(inner)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(inner, num_labels)

    def forward(self, pooled):
        """`pooled` (B, pairs * 2H): the pooler outputs [text ; image] of each fused pair, concatenated."""
        text, image = pooled.unflatten(-1, (self.pairs, 2, self.hidden_size)).unbind(-2)
        features = torch.cat([text, image, text * image], dim=-1).flatten(1)
        return self.output(self.dropout(self.norm(F.gelu(self.gate(features)) * self.value(features))))


def build_classifier(config, pairs):
    """The task classifier over the pooled outputs of `pairs` fused (text, image) pairs (`config.classifier_head`)."""
    if config.classifier_head == "gated_product":
        return VKOODGatedProductHead(config.hidden_size, pairs, config.num_labels, config.classifier_dropout)
    width = 2 * pairs * config.hidden_size
    if config.classifier_head == "meter":  # METER's layout (module indices 0, 1, 3), no dropout
        return nn.Sequential(
            nn.Linear(width, 2 * config.hidden_size),
            nn.LayerNorm(2 * config.hidden_size),
            nn.GELU(),
            nn.Linear(2 * config.hidden_size, config.num_labels),
        )
    return nn.Sequential(
        nn.Linear(width, width),
        nn.LayerNorm(width),
        nn.GELU(),
        nn.Dropout(config.classifier_dropout),
        nn.Linear(width, config.num_labels),
    )


__all__ = ["VKOODGatedProductHead", "build_classifier"]

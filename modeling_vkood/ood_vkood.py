"""The implicit differentiable OOD layer of VK-OOD (Hub remote code: torch, transformers and stdlib only).

Per example, a diagonal-covariance Gaussian mixture is fitted by EM to the image tokens (the in-distribution set),
seen as a fixed point theta* = T(theta*; Z). Every knowledge item gets the GEM energy of Morteza & Li (AAAI 2022)
under that mixture, and a gate sigmoid((score - tau) / temperature) that lets the fusion ignore outliers.
Everything is batched: no Python loop over samples, tokens or components; only the EM iterations are a loop.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils import ModelOutput


@dataclass
class GaussianMixtureOutput(ModelOutput):
    """A batch of fitted mixtures; `iterations` is the EM step count, `residual` the last relative change per example."""

    weights: torch.FloatTensor | None = None  # (B, K)
    means: torch.FloatTensor | None = None  # (B, K, d')
    variances: torch.FloatTensor | None = None  # (B, K, d')
    iterations: torch.LongTensor | None = None  # ()
    residual: torch.FloatTensor | None = None  # (B,)


@dataclass
class ImplicitOODOutput(GaussianMixtureOutput):
    """Mixture fields plus the standardised GEM `scores`, the `gate` and its stable `log_gate` per item (B, M), and
    `alignment_loss`: mean (1 - cosine) between each real item and its image's mean direction in the projection."""

    scores: torch.FloatTensor | None = None
    gate: torch.FloatTensor | None = None
    log_gate: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None


def _pack(weights, means, variances):
    return torch.cat([weights.unsqueeze(-1), means, variances], dim=-1)


def _unpack(theta):
    dim = (theta.shape[-1] - 1) // 2
    return theta[..., 0], theta[..., 1 : 1 + dim], theta[..., 1 + dim :]


def _features(points):
    """[x, x^2]: with it the E step and the M step are one batched matmul each (no (B, N, K, d) tensor)."""
    return torch.cat([points, points.square()], dim=-1)


class EMProblem(NamedTuple):
    """What every EM step of one fit reuses: the point features, the mask and the masked global moments."""

    features: torch.Tensor  # (B, N, 2d') = [x, x^2]
    mask: torch.Tensor  # (B, N), 1 for real points
    global_moments: torch.Tensor  # (B, 2d') mean of [x, x^2] over the real points


def em_problem(points, mask):
    features = _features(points)
    count = mask.sum(1, keepdim=True).clamp_min(1.0)
    return EMProblem(features, mask, torch.einsum("bn,bnf->bf", mask, features) / count)


def mahalanobis_sq(features, means, variances):
    """Squared Mahalanobis distance of each point (given as `_features`) to each component, (B, N, K)."""
    precision = variances.reciprocal()
    coefficients = torch.cat([-2.0 * means * precision, precision], dim=-1)  # (B, K, 2d)
    dist = features @ coefficients.transpose(1, 2) + (means.square() * precision).sum(-1).unsqueeze(1)
    return dist.clamp_min(0.0)


def component_log_prob(features, weights, means, variances):
    """log w_k + log N(x | mu_k, diag var_k) for every point and component, (B, N, K)."""
    dim = means.shape[-1]
    log_norm = -0.5 * (dim * math.log(2 * math.pi) + variances.log().sum(-1))  # (B, K)
    log_weights = weights.clamp_min(torch.finfo(weights.dtype).tiny).log()
    return (log_weights + log_norm).unsqueeze(1) - 0.5 * mahalanobis_sq(features, means, variances)


def mixture_log_likelihood(points, mask, weights, means, variances):
    """Mean log-likelihood of the real points of each example under its mixture, (B,)."""
    per_point = torch.logsumexp(component_log_prob(_features(points), weights, means, variances), dim=-1)
    return (per_point * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def m_step(problem, resp, variance_floor):
    """Weights, means and diagonal variances from responsibilities (B, N, K).

    A pseudo-count of 10 machine epsilons carrying the example's global mean and variance keeps empty components
    (fewer tokens than components, fully padded rows) finite, as scikit-learn's `nk + 10 * eps` does; the variance
    floor is added, like scikit-learn's `reg_covar`, so the map stays smooth for the implicit gradient.
    """
    pseudo = 10 * torch.finfo(problem.features.dtype).eps
    resp = resp * problem.mask.unsqueeze(-1)
    mass = resp.sum(1) + pseudo  # (B, K)
    moments = (resp.transpose(1, 2) @ problem.features + pseudo * problem.global_moments.unsqueeze(1)) / mass.unsqueeze(-1)
    means, second = moments.chunk(2, dim=-1)
    variances = (second - means.square()).clamp_min(0.0) + variance_floor
    return mass / mass.sum(-1, keepdim=True), means, variances


def _em_step(problem, weights, means, variances, variance_floor):
    resp = torch.softmax(component_log_prob(problem.features, weights, means, variances), dim=-1)
    return m_step(problem, resp, variance_floor)


def em_step(points, mask, weights, means, variances, variance_floor):
    """One EM application T(theta; Z): log-domain E step (softmax of log-probabilities), then the M step."""
    return _em_step(em_problem(points, mask), weights, means, variances, variance_floor)


def initial_mixture(problem, num_components, variance_floor):
    """Deterministic start: the real tokens, in order, cut into K contiguous groups (spatial bands for patches)."""
    mask = problem.mask
    rank = mask.cumsum(1) - 1.0  # position of each real token among the real tokens
    count = mask.sum(1, keepdim=True).clamp_min(1.0)
    group = torch.div(rank.clamp_min(0.0) * num_components, count, rounding_mode="floor").long().clamp_max(num_components - 1)
    resp = F.one_hot(group, num_components).to(problem.features.dtype)
    return m_step(problem, resp, variance_floor)


def gem_score(points, mixture):
    """Standardised GEM energy of each point, (B, M).

    GEM(x) = log sum_k exp(-1/2 (x - mu_k)^T Sigma_k^-1 (x - mu_k)), by logsumexp. For an in-distribution point the
    squared distance is about chi^2(d'), mean d' and deviation sqrt(2 d'); (GEM + d'/2) / sqrt(d'/2) is thus near 0
    for inliers and very negative for outliers whatever d', so one threshold tau serves every projection width.
    """
    dim = points.shape[-1]
    energy = torch.logsumexp(-0.5 * mahalanobis_sq(_features(points), mixture.means, mixture.variances), dim=-1)
    return (energy + 0.5 * dim) / math.sqrt(0.5 * dim)


def log_likelihood(points, mixture):
    """log sum_k w_k N(x | mu_k, diag var_k) of each point under its example's mixture, (B, M): the density itself,
    with the weights and the log-determinants that GEM leaves out (scikit-learn's `GaussianMixture.score_samples`)."""
    log_prob = component_log_prob(_features(points), mixture.weights, mixture.means, mixture.variances)
    return torch.logsumexp(log_prob, dim=-1)


def log_likelihood_score(points, mixture, context_points, context_mask):
    """Mixture log-likelihood of each item relative to the example's own image tokens, (B, M).

    (log p(x) - mean log p(image token)) / sqrt(d'/2): 0 for an item as likely as the image's tokens, and on the
    scale of the standardised GEM (the log-density of an inlier varies by about sqrt(d'/2)), so the same threshold
    and temperature apply.
    """
    dim = points.shape[-1]
    reference = mixture_log_likelihood(context_points, context_mask, mixture.weights, mixture.means, mixture.variances)
    return (log_likelihood(points, mixture) - reference.unsqueeze(-1)) / math.sqrt(0.5 * dim)


def _relative_change(new, old):
    return (new - old).flatten(1).norm(dim=1) / old.flatten(1).norm(dim=1).clamp_min(1e-12)


class ImplicitOODLayer(nn.Module):
    """Scores and gates knowledge items by how well they fit a Gaussian mixture of the image tokens.

    Gradient modes (`config.ood_gradient`):
    - "last_iterate" (paper): the solver runs without a graph; one differentiable step T(stop_grad(theta*); Z)
      carries the gradient, so memory does not grow with the iteration count.
    - "implicit": implicit function theorem; the backward solves the adjoint fixed point u = g + (dT/dtheta)^T u.
    - "unrolled": autograd through every iteration (the reference the other two are tested against).
    """

    def __init__(self, config):
        super().__init__()
        self.num_components = config.ood_num_components
        self.max_iter = config.ood_max_iter
        self.tol = config.ood_tol
        self.variance_floor = config.ood_variance_floor
        self.gradient_mode = config.ood_gradient
        self.temperature = config.ood_temperature
        self.hard_gate = config.ood_hard_gate
        self.use_gate = config.use_ood_gate
        self.score_kind = config.ood_score
        self.alignment_kind = config.ood_alignment
        self.alignment_temperature = config.ood_alignment_temperature
        self.projection = nn.Linear(config.hidden_size, config.ood_projection_dim)
        # Shape (1,), not 0-dim: DeepSpeed ZeRO broadcasts parameters through `view(torch.uint8)`, which 0-dim tensors refuse.
        self.threshold = nn.Parameter(torch.full((1,), float(config.ood_threshold)))
        self.calibration_quantile = config.ood_calibration_quantile
        # Saved with the weights, so a trained or reloaded model is never re-calibrated.
        self.register_buffer("threshold_calibrated", torch.tensor(config.ood_calibration_quantile is None))
        # Share of the relevance labels in the gate the fusion sees, training only (a schedule sets it: see
        # `relevance_forced_gate`); 0 outside training, not saved.
        self.relevance_forcing = 0.0

    def _solve(self, problem, start):
        """Iterate T from `start` until every example's relative change is below tol, or max_iter."""
        state = start
        residual = torch.zeros(problem.mask.shape[0], dtype=problem.features.dtype, device=problem.features.device)
        iterations = 0
        for iterations in range(1, self.max_iter + 1):
            new_state = _em_step(problem, *state, self.variance_floor)
            residual = _relative_change(_pack(*new_state), _pack(*state))
            state = new_state
            if bool((residual < self.tol).all()):
                break
        return state, iterations, residual

    def fit_mixture(self, points, mask=None):
        """Fit the mixture to already-projected points (B, N, d'); `mask` is 1 for real points."""
        if mask is None:
            mask = torch.ones(points.shape[:2], dtype=points.dtype, device=points.device)
        mask = mask.to(points.dtype)
        differentiable = torch.is_grad_enabled() and points.requires_grad
        unrolled = differentiable and self.gradient_mode == "unrolled"
        problem = em_problem(points, mask)  # built once: the solver and the differentiable step share it
        with torch.set_grad_enabled(unrolled):
            start = initial_mixture(problem, self.num_components, self.variance_floor)
            state, iterations, residual = self._solve(problem, start)
        if differentiable and not unrolled:
            state = self._attach_gradient(problem, state)
        weights, means, variances = state
        return GaussianMixtureOutput(
            weights=weights,
            means=means,
            variances=variances,
            iterations=torch.tensor(iterations, device=points.device),
            residual=residual,
        )

    def _attach_gradient(self, problem, state):
        """One differentiable step from the detached fixed point; in implicit mode its gradient is IFT-corrected."""
        theta_star = _pack(*state).detach().requires_grad_(self.gradient_mode == "implicit")
        theta = _pack(*_em_step(problem, *_unpack(theta_star), self.variance_floor))
        if self.gradient_mode == "implicit":
            theta.register_hook(self._adjoint_hook(theta, theta_star))
        return _unpack(theta)

    def _adjoint_hook(self, theta, theta_star):
        solving = []  # non-empty while the vector-Jacobian products below flow back through `theta` itself

        def solve_adjoint(grad):
            if solving or grad is None:
                return grad
            solving.append(True)
            # u = g + J^T u with J = dT/dtheta at theta*: a contraction where EM converges, solved by iteration.
            adjoint = grad
            for _ in range(self.max_iter):
                (vjp,) = torch.autograd.grad(theta, theta_star, adjoint, retain_graph=True)
                new_adjoint = grad + vjp
                change = (new_adjoint - adjoint).norm() / new_adjoint.norm().clamp_min(1e-30)
                adjoint = new_adjoint
                if bool(change < self.tol):
                    break
            solving.clear()
            return adjoint

        return solve_adjoint

    gem_score = staticmethod(gem_score)

    def project(self, hidden):
        """Shared projection to d', then per-vector standardisation: bounded scale whatever the input magnitude."""
        dtype = hidden.dtype
        projected = F.linear(hidden, self.projection.weight.to(dtype), self.projection.bias.to(dtype))
        return F.layer_norm(projected, projected.shape[-1:])

    def score(self, item_points, mixture, context_points, context_mask):
        """Per-item OOD score under the example's mixture (`config.ood_score`): "gem" (paper) or "log_likelihood"."""
        if self.score_kind == "log_likelihood":
            return log_likelihood_score(item_points, mixture, context_points, context_mask)
        return gem_score(item_points, mixture)

    def forward(self, context, items, context_mask=None, items_mask=None, items_relevance=None):
        """context (B, N, H) image tokens; items (B, M, H) knowledge vectors; masks 1/True for real entries.

        `items_relevance` (B, M), training only: 1 for the items that state the example's answer (the contrastive
        alignment's positives; see `contrastive_alignment_loss`)."""
        dtype = torch.float64 if context.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=context.device.type, enabled=False):
            context_points = self.project(context.to(dtype))
            item_points = self.project(items.to(dtype))
            if context_mask is None:
                context_mask = torch.ones(context.shape[:2], device=context.device)
            if items_mask is None:
                items_mask = torch.ones(items.shape[:2], device=items.device)
            items_mask, context_mask = items_mask.to(dtype), context_mask.to(dtype)
            mixture = self.fit_mixture(context_points, context_mask)
            scores = self.score(item_points, mixture, context_points, context_mask) * items_mask
            gate_logits = (scores - self.threshold.to(dtype)) / self.temperature
            if not self.use_gate:
                log_gate = torch.zeros_like(scores)
            elif self.hard_gate and not self.training:
                log_gate = torch.where(scores > self.threshold, 0.0, float("-inf")).to(dtype)
            else:
                # logsigmoid, not log(sigmoid): finite gradients even for items far outside the mixture
                log_gate = F.logsigmoid(gate_logits)
            log_gate = log_gate.masked_fill(items_mask == 0, float("-inf"))
            if self.training and self.relevance_forcing > 0 and items_relevance is not None:
                log_gate = self.relevance_forced_gate(log_gate, items_mask, items_relevance)
            gate = log_gate.exp()
            if self.alignment_kind == "contrastive":
                alignment_loss = self.contrastive_alignment_loss(scores, items_mask, items_relevance)
            elif self.alignment_kind == "gate":
                # The InfoNCE orders the scores; the BCE, on detached scores, places tau (on the scores too, it
                # slowed their ordering: AUROC 0.71 against 0.91 after 300 steps on knowledge-VQA).
                cut = (scores.detach() - self.threshold.to(dtype)) / self.temperature
                alignment_loss = self.contrastive_alignment_loss(scores, items_mask, items_relevance)
                alignment_loss = alignment_loss + self.gate_relevance_loss(cut, items_mask, items_relevance)
            else:
                alignment_loss = self.alignment_loss(context_points, context_mask, item_points, items_mask)
        return ImplicitOODOutput(
            weights=mixture.weights,
            means=mixture.means,
            variances=mixture.variances,
            iterations=mixture.iterations,
            residual=mixture.residual,
            scores=scores,
            gate=gate,
            log_gate=log_gate,
            alignment_loss=alignment_loss,
        )

    def relevance_forced_gate(self, log_gate, items_mask, items_relevance):
        """log of (1 - s) * gate + s * relevance, s = `relevance_forcing`: the gate teacher-forced by the items that
        state the training answer. A fusion trained from scratch behind a gate that is still learning which items
        fit the image learns to ignore the knowledge (it then stays at the answer prior); forced first, it learns to
        read the selected item, and a schedule hands the selection over to the learned gate."""
        share = self.relevance_forcing
        forced = math.log1p(-share) + log_gate if share < 1 else torch.full_like(log_gate, float("-inf"))
        relevant = (items_relevance.to(log_gate.dtype) * items_mask) > 0
        return torch.where(relevant, torch.logaddexp(forced, log_gate.new_tensor(math.log(share))), forced)

    @property
    def needs_calibration(self) -> bool:
        """True until `calibrate_threshold` has set tau (a saved, trained or reloaded model never needs it)."""
        return self.use_gate and not bool(self.threshold_calibrated)

    @torch.no_grad()
    def calibrate_threshold(self, scores):
        """Data-dependent start (as ActNorm's): tau = the `calibration_quantile` of the scores of real items.

        `scores` (any shape) holds this process's real-item scores, possibly none. Under torch.distributed this is a
        collective, so EVERY rank must call it: the scores of all ranks are gathered and the quantile is taken over
        their union, so every replica gets the same tau, equal to a single process's on the same examples. Call it
        before the optimizer (and any ZeRO/FSDP wrapper) exists, so that the optimizer's master copy starts from it.
        Returns tau, or None when no process had a real item (tau and the calibrated flag are then left as they are).
        """
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
        threshold = torch.quantile(scores, self.calibration_quantile)
        self.threshold.copy_(threshold.to(self.threshold.device, self.threshold.dtype))
        self.threshold_calibrated.fill_(True)
        return threshold.item()

    def contrastive_alignment_loss(self, scores, items_mask, items_relevance):
        """Image-text contrastive loss on the OOD scores themselves (MMFT's alignment, with the layer's own density
        as the similarity and the retrieved candidates as the negatives): under each image's mixture, the items that
        state the example's answer (`items_relevance`: the pseudo-relevance of retrieval-augmented VQA, from the
        training answers) must outscore its other candidates: -log sum_pos softmax(scores / temperature).

        The scores see the image and the item, never the question; so when different questions about one image are
        answered by different items that all fit it (its shape's fact, its colour's fact), the optimum scores every
        fitting item alike and the others low: the loss teaches fit to the image, not the answer. Examples without
        a positive, or without relevance, contribute nothing.
        """
        if items_relevance is None:
            return scores.new_zeros(())
        absent = torch.finfo(scores.dtype).min / 4  # large and finite: no NaN gradients from padded items
        logits = (scores / self.alignment_temperature).masked_fill(items_mask == 0, absent)
        positive = items_relevance.to(scores.dtype) * items_mask
        has_positive = positive.sum(1) > 0
        per_example = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(positive == 0, absent), 1)
        weight = has_positive.to(scores.dtype)
        return (per_example * weight).sum() / weight.sum().clamp_min(1.0)

    @staticmethod
    def gate_relevance_loss(gate_logits, items_mask, items_relevance):
        """Class-balanced binary cross-entropy of the gate against the pseudo-relevance: per example, the mean BCE of
        its positives (the items that state the training answer) plus that of its other real items, so that one
        positive among ten candidates weighs as much as the ten. `ood_alignment="gate"` applies it to detached
        scores, so that it places tau while the contrastive loss orders the scores.

        An item that fits the image but states another question's answer is a positive in some examples and a
        negative in others; the balance puts its optimal gate above 1/2 (at 1/(1 + 1/10) for one positive in eleven
        candidates, counting it positive in half its examples), while an item about what the image does not show is
        never a positive and goes to 0. Examples without a positive, or without relevance, contribute nothing.
        """
        if items_relevance is None:
            return gate_logits.new_zeros(())
        positive = items_relevance.to(gate_logits.dtype) * items_mask
        negative = (1.0 - positive) * items_mask
        has_positive = (positive.sum(1) > 0).to(gate_logits.dtype)
        positive_term = (F.softplus(-gate_logits) * positive).sum(1) / positive.sum(1).clamp_min(1.0)
        negative_term = (F.softplus(gate_logits) * negative).sum(1) / negative.sum(1).clamp_min(1.0)
        return ((positive_term + negative_term) * has_positive).sum() / has_positive.sum().clamp_min(1.0)

    @staticmethod
    def alignment_loss(context_points, context_mask, item_points, items_mask):
        """Cross-modal alignment on the hypersphere: 1 - cos(item, mean image direction), averaged over real items."""
        image_direction = F.normalize((context_points * context_mask.unsqueeze(-1)).sum(1), dim=-1)
        cosine = torch.einsum("bmd,bd->bm", F.normalize(item_points, dim=-1), image_direction)
        return ((1.0 - cosine) * items_mask).sum() / items_mask.sum().clamp_min(1.0)


__all__ = ["ImplicitOODLayer", "ImplicitOODOutput", "GaussianMixtureOutput", "gem_score", "log_likelihood", "log_likelihood_score"]

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
    """A batch of fitted mixtures. `iterations` (B,) counts the EM steps applied to each example (it stops changing
    once that example has converged); `residual` (B,) is the relative change of its EM statistics that one more step
    would make (below `ood_tol` for a converged example)."""

    weights: torch.FloatTensor | None = None  # (B, K)
    means: torch.FloatTensor | None = None  # (B, K, d')
    variances: torch.FloatTensor | None = None  # (B, K, d')
    iterations: torch.LongTensor | None = None  # (B,)
    residual: torch.FloatTensor | None = None  # (B,)


@dataclass
class ImplicitOODOutput(GaussianMixtureOutput):
    """Mixture fields plus the standardised GEM `scores`, the `gate` and its stable `log_gate` per item (B, M), and
    `alignment_loss`: mean (1 - cosine) between each real item and its image's mean direction in the projection."""

    scores: torch.FloatTensor | None = None
    gate: torch.FloatTensor | None = None
    log_gate: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None


def _features(points):
    """[x, x^2]: with it a squared distance to every component is one batched matmul (no (B, N, K, d) tensor)."""
    return torch.cat([points, points.square()], dim=-1)


class EMProblem(NamedTuple):
    """What every EM step of one fit reuses, laid out so that the E step and the M step are one batched matmul each.

    The EM state is the tensor of sufficient statistics S (B, K, 1 + 2d'): per component its mass, sum of x and sum
    of x^2 + floor over the responsibilities, each plus a pseudo-count carrying the example's global moments. The
    variance floor rides in the second moments (mass * floor), so the M step adds no floor of its own. Components
    come first (responsibilities are (B, K, N)): on the CPU a softmax over a short last axis and a matmul with K
    output columns are several times slower.
    """

    # (B, 2d' + 1, N) = [x, -x^2/2, -1/2]^T: the E step's logits are [mu/var, 1/var, sum(log var + mu^2/var)] @ design
    design: torch.Tensor
    # (B, N, 1 + 2d') = mask * [1, x, x^2 + floor]: the M step's S = resp @ statistics_design
    statistics_design: torch.Tensor
    prior: torch.Tensor  # (B, 1, 1 + 2d') = pseudo-count * [1, global mean of x, global mean of x^2 + floor]
    mask: torch.Tensor  # (B, N), 1 for real points
    variance_floor: float  # added to every variance (scikit-learn's `reg_covar`)


def em_problem(points, mask, variance_floor):
    """The EM problem of points (B, N, d') with `mask` (B, N), 1 for real points, and the variance floor.

    A pseudo-count of 10 machine epsilons carrying the example's global mean and variance keeps empty components
    (fewer tokens than components, fully padded rows) finite, as scikit-learn's `nk + 10 * eps` does.
    """
    pseudo = 10 * torch.finfo(points.dtype).eps
    ones = torch.ones_like(points[..., :1])
    squares = points.square()
    moments = torch.cat([ones, points, squares + variance_floor], dim=-1) * mask.unsqueeze(-1)  # (B, N, 1 + 2d')
    count = mask.sum(1, keepdim=True).clamp_min(1.0)
    prior = moments.sum(1) / count
    prior = torch.cat([torch.ones_like(count), prior[:, 1:]], dim=-1) * pseudo
    design = torch.cat([points, -0.5 * squares, -0.5 * ones], dim=-1).transpose(1, 2)
    return EMProblem(design, moments, prior.unsqueeze(1), mask, variance_floor)


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


def _responsibilities(problem, log_mass, means, variances):
    """E step, log domain: softmax over components of log w_k + log N(x | mu_k, var_k) up to a per-point constant
    (2 pi and the weights' normaliser cancel in the softmax), (B, K, N). `log_mass` (B, K, 1), the others (B, K, d')."""
    precision = variances.reciprocal()
    coefficient = means * precision
    constant = torch.addcmul(variances.log(), means, coefficient).sum(-1, keepdim=True)
    coefficients = torch.cat([coefficient, precision, constant], dim=-1)
    return torch.softmax(torch.baddbmm(log_mass, coefficients, problem.design), dim=1)


def _statistics(problem, resp):
    """M step, first half: the sufficient statistics S (B, K, 1 + 2d') of responsibilities (B, K, N)."""
    return torch.baddbmm(problem.prior, resp, problem.statistics_design)


def _parameters(problem, statistics):
    """M step, second half: log mass (B, K, 1), means and variances (B, K, d') of statistics S. The variance floor
    (in S's second moments) is added to every variance, like scikit-learn's `reg_covar`, so the map stays smooth for
    the implicit gradient: var = max(E[x^2] - mu^2, 0) + floor."""
    dim = (statistics.shape[-1] - 1) // 2
    mass, first, second = statistics.split([1, dim, dim], dim=-1)
    means = first / mass
    variances = torch.addcmul(second / mass, means, means, value=-1.0).clamp_min(problem.variance_floor)
    return mass.log(), means, variances


def _em_update(problem, statistics):
    """One EM application T on the sufficient statistics: parameters, E step, statistics."""
    return _statistics(problem, _responsibilities(problem, *_parameters(problem, statistics)))


def _mixture(problem, statistics):
    """(weights (B, K), means (B, K, d'), variances (B, K, d')) of statistics S."""
    _, means, variances = _parameters(problem, statistics)
    mass = statistics[..., 0]
    return mass / mass.sum(-1, keepdim=True), means, variances


def em_step(points, mask, weights, means, variances, variance_floor):
    """One EM application T(theta; Z) to theta = (weights (B, K), means, variances (B, K, d')): log-domain E step,
    then the M step."""
    problem = em_problem(points, mask, variance_floor)
    log_weights = weights.clamp_min(torch.finfo(weights.dtype).tiny).log().unsqueeze(-1)
    resp = _responsibilities(problem, log_weights, means, variances)
    return _mixture(problem, _statistics(problem, resp))


def _initial_statistics(problem, num_components):
    """Deterministic start: the real tokens, in order, cut into K contiguous groups (spatial bands for patches)."""
    mask = problem.mask
    rank = mask.cumsum(1) - 1.0  # position of each real token among the real tokens
    count = mask.sum(1, keepdim=True).clamp_min(1.0)
    group = torch.div(rank.clamp_min(0.0) * num_components, count, rounding_mode="floor").clamp_max(num_components - 1)
    components = torch.arange(num_components, device=mask.device, dtype=group.dtype)
    return _statistics(problem, (components.unsqueeze(-1) == group.unsqueeze(1)).to(mask.dtype))  # one-hot, no sync


def initial_mixture(problem, num_components):
    """The deterministic start as (weights, means, variances)."""
    return _mixture(problem, _initial_statistics(problem, num_components))


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
    reference = mixture_log_likelihood(context_points, context_mask, mixture.weights, mixture.means, mixture.variances)
    return relative_log_likelihood(points, mixture, reference)


def relative_log_likelihood(points, mixture, reference):
    """`log_likelihood_score` given the mean log-likelihood of the image's own tokens, `reference` (B,)."""
    return (log_likelihood(points, mixture) - reference.unsqueeze(-1)) / math.sqrt(0.5 * points.shape[-1])


def _statistics_scale(statistics):
    """Per example, the norm of its statistics S (B, K, F) summed over the components, over sqrt(K), (B, 1, 1).

    EM keeps that sum (every point's responsibilities add up to 1), so the scale is fixed for the whole fit, and no
    split of the mass over K components has a smaller norm (Cauchy-Schwarz): a change measured against it is never
    smaller than the same change relative to the current statistics.
    """
    total = torch.linalg.vector_norm(statistics.sum(1, keepdim=True), dim=(1, 2), keepdim=True)
    return total / math.sqrt(statistics.shape[1])


def _relative_change(new, old):
    """||new - old|| / ||old|| per example, shaped (B, 1, 1) like the (B, K, F) statistics it compares."""
    norm = lambda tensor: torch.linalg.vector_norm(tensor, dim=(1, 2), keepdim=True)  # noqa: E731
    return norm(new - old) / norm(old).clamp_min(1e-30)


def _no_mixture(points):
    """The fit of zero components (no EM ran): empty weights, means and variances sliced from the points (B, N, d'),
    on their device, dtype and autograd graph; 0 iterations and residual 0 per example."""
    empty = points[:, :0]
    zeros = points.new_zeros(points.shape[0])
    return GaussianMixtureOutput(
        weights=empty[..., 0], means=empty, variances=empty, iterations=zeros.long(), residual=zeros
    )


_MIXTURE_FIELDS = ("weights", "means", "variances", "iterations", "residual")


class ImageFit(NamedTuple):
    """What the layer keeps of each image to score knowledge against it, fitted once per image and shared by every
    pair the image is in (ITM's positive and negative pairs, a gallery's re-ranked pairs): the mixture, the mean
    log-likelihood of the image's own tokens (`reference` (B,), the "log_likelihood" score's zero) and the mean
    direction of its projected tokens (`direction` (B, d'), the "mean_direction" alignment's target)."""

    mixture: GaussianMixtureOutput
    reference: torch.Tensor
    direction: torch.Tensor

    def select(self, index):
        """The fits of the images `index` (a LongTensor), e.g. one row per pair."""
        mixture = GaussianMixtureOutput(**{field: getattr(self.mixture, field)[index] for field in _MIXTURE_FIELDS})
        return ImageFit(mixture, self.reference[index], self.direction[index])

    @staticmethod
    def cat(fits):
        """The fits of consecutive chunks of images, as one."""

        def joined(get):
            return torch.cat([get(fit) for fit in fits])

        mixture = GaussianMixtureOutput(
            **{field: joined(lambda fit, field=field: getattr(fit.mixture, field)) for field in _MIXTURE_FIELDS}
        )
        return ImageFit(mixture, joined(lambda fit: fit.reference), joined(lambda fit: fit.direction))


class ImplicitOODLayer(nn.Module):
    """Scores and gates knowledge items by how well they fit a Gaussian mixture of the image tokens.

    Gradient modes (`config.ood_gradient`):
    - "last_iterate" (paper): the solver runs without a graph; one differentiable step T(stop_grad(theta*); Z)
      carries the gradient, so memory does not grow with the iteration count.
    - "implicit": implicit function theorem; the backward solves the adjoint fixed point u = g + (dT/dtheta)^T u.
    - "unrolled": autograd through every iteration (the reference the other two are tested against).

    The solver is a fixed-shape loop on the device: an example whose next step would change its statistics by less
    than tol (relative) is frozen (`torch.where`; its state, residual and iteration count stop changing), and the
    host reads whether all have converged only every `config.ood_convergence_check_every` iterations (0: never, a
    fixed budget of `ood_max_iter`), each read being a host synchronisation. An example's fit therefore does not
    depend on the rest of its batch.
    """

    def __init__(self, config):
        super().__init__()
        self.num_components = config.ood_num_components
        self.max_iter = config.ood_max_iter
        self.tol = config.ood_tol
        self.check_every = config.ood_convergence_check_every
        self.variance_floor = config.ood_variance_floor
        self.gradient_mode = config.ood_gradient
        self.temperature = config.ood_temperature
        self.hard_gate = config.ood_hard_gate
        self.use_gate = config.use_ood_gate
        self.score_kind = config.ood_score
        self.alignment_kind = config.ood_alignment
        self.alignment_temperature = config.ood_alignment_temperature
        self.cross_image_weight = config.ood_cross_image_weight
        self.projection = nn.Linear(config.hidden_size, config.ood_projection_dim)
        # Shape (1,), not 0-dim: DeepSpeed ZeRO broadcasts parameters through `view(torch.uint8)`, which 0-dim tensors refuse.
        self.threshold = nn.Parameter(torch.full((1,), float(config.ood_threshold)))
        self.calibration_quantile = config.ood_calibration_quantile
        # Saved with the weights, so a trained or reloaded model is never re-calibrated.
        self.register_buffer("threshold_calibrated", torch.tensor(config.ood_calibration_quantile is None))
        # Share of the relevance labels in the gate the fusion sees, training only (a schedule sets it: see
        # `relevance_forced_gate`); 0 outside training, not saved.
        self.relevance_forcing = 0.0
        self._known_calibrated = None  # (the flag tensor, its version) once it was read True: no further host reads

    def _may_stop(self, step, active):
        """Whether the host stops the loop after `step`: only every `check_every` steps does it read `active` (a
        host synchronisation), and never after the last step, which ends the loop anyway."""
        if not self.check_every or step % self.check_every or step >= self.max_iter:
            return False
        return not bool(active.any())

    def _solve(self, problem, statistics):
        """Iterate T from `statistics`; an example whose next step would change its statistics by less than tol
        (relative to their scale, `_statistics_scale`) is converged and frozen, and the loop ends when every example
        is, or after max_iter. Returns the statistics, the EM steps applied to each example (B,) and the relative
        change one more step would make (B,). Per iteration: the EM step, one difference, one norm, one comparison,
        one `where` and the counter."""
        scale = _statistics_scale(statistics)
        threshold = self.tol * scale
        change = torch.zeros_like(scale)
        iterations = torch.zeros_like(scale, dtype=torch.long)
        for step in range(1, self.max_iter + 1):
            new_statistics = _em_update(problem, statistics)
            # A frozen example's statistics no longer change, so neither does its `change`: it stays converged.
            change = torch.linalg.vector_norm(new_statistics - statistics, dim=(1, 2), keepdim=True)
            active = change >= threshold
            statistics = torch.where(active, new_statistics, statistics)
            iterations = iterations + active
            if self._may_stop(step, active):
                break
        return statistics, iterations.flatten(), (change / scale).flatten()

    def fit_mixture(self, points, mask=None):
        """Fit the mixture to already-projected points (B, N, d'); `mask` is 1 for real points."""
        if mask is None:
            mask = torch.ones(points.shape[:2], dtype=points.dtype, device=points.device)
        mask = mask.to(points.dtype)
        differentiable = torch.is_grad_enabled() and points.requires_grad
        unrolled = differentiable and self.gradient_mode == "unrolled"
        # built once: the solver and the differentiable step share it
        problem = em_problem(points, mask, self.variance_floor)
        with torch.set_grad_enabled(unrolled):
            statistics, iterations, residual = self._solve(problem, _initial_statistics(problem, self.num_components))
        if differentiable and not unrolled:
            statistics = self._attach_gradient(problem, statistics)
        weights, means, variances = _mixture(problem, statistics)
        return GaussianMixtureOutput(
            weights=weights, means=means, variances=variances, iterations=iterations, residual=residual
        )

    def _attach_gradient(self, problem, statistics):
        """One differentiable step from the detached fixed point; in implicit mode its gradient is IFT-corrected."""
        theta_star = statistics.detach().requires_grad_(self.gradient_mode == "implicit")
        theta = _em_update(problem, theta_star)
        if self.gradient_mode == "implicit":
            theta.register_hook(self._adjoint_hook(theta, theta_star))
        return theta

    def _adjoint_hook(self, theta, theta_star):
        solving = []  # non-empty while the vector-Jacobian products below flow back through `theta` itself

        def solve_adjoint(grad):
            if solving or grad is None:
                return grad
            solving.append(True)
            # u = g + J^T u with J = dT/dtheta at theta*: a contraction where EM converges, solved by iteration,
            # with the forward solver's rules: converged examples frozen, the host looking every `check_every` steps.
            adjoint = grad
            active = torch.ones_like(grad[:, :1, :1], dtype=torch.bool)
            for step in range(1, self.max_iter + 1):
                (vjp,) = torch.autograd.grad(theta, theta_star, adjoint, retain_graph=True)
                new_adjoint = grad + vjp
                change = _relative_change(new_adjoint, adjoint)
                adjoint = torch.where(active, new_adjoint, adjoint)
                active = active & (change >= self.tol)
                if self._may_stop(step, active):
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

    def score(self, item_points, fit):
        """Per-item OOD score under the example's mixture (`config.ood_score`): "gem" (paper) or "log_likelihood"."""
        if self.score_kind == "log_likelihood":
            return relative_log_likelihood(item_points, fit.mixture, fit.reference)
        return gem_score(item_points, fit.mixture)

    @staticmethod
    def _dtype(tensor):
        return torch.float64 if tensor.dtype == torch.float64 else torch.float32

    def fit_images(self, context, context_mask=None):
        """The `ImageFit` of each image: context (B, N, H) image tokens, `context_mask` 1/True for real ones."""
        dtype = self._dtype(context)
        with torch.autocast(device_type=context.device.type, enabled=False):
            points = self.project(context.to(dtype))
            mask = torch.ones(points.shape[:2], device=points.device) if context_mask is None else context_mask
            mask = mask.to(dtype)
            mixture = self.fit_mixture(points, mask)
            if self.score_kind == "log_likelihood":
                reference = mixture_log_likelihood(points, mask, mixture.weights, mixture.means, mixture.variances)
            else:
                reference = points.new_zeros(points.shape[0])
            direction = F.normalize((points * mask.unsqueeze(-1)).sum(1), dim=-1)
        return ImageFit(mixture, reference, direction)

    def forward(self, context, items, context_mask=None, items_mask=None, items_relevance=None, image_fit=None):
        """context (B, N, H) image tokens; items (B, M, H) knowledge vectors; masks 1/True for real entries.

        `items_relevance` (B, M), training only: 1 for the items that state the example's answer (the contrastive
        alignment's positives; see `contrastive_alignment_loss`). `image_fit`: the `fit_images` of each row's image,
        when it was fitted once for several rows (`context` is then not read)."""
        dtype = self._dtype(items)
        with torch.autocast(device_type=items.device.type, enabled=False):
            item_points = self.project(items.to(dtype))
            items_mask = torch.ones(items.shape[:2], device=items.device) if items_mask is None else items_mask
            items_mask = items_mask.to(dtype)
            if items.shape[1] == 0:  # no knowledge item (a static shape): nothing to score, so no EM
                # the empty mixture hangs on the image's graph where there is one (its gradient is then a zero)
                mixture = _no_mixture(item_points if context is None else self.project(context.to(dtype)))
                direction = item_points.new_zeros(item_points.shape[0], item_points.shape[-1])
                scores = item_points.sum(-1)  # (B, 0), from the items like the scores it stands for
            else:
                fit = self.fit_images(context, context_mask) if image_fit is None else image_fit
                if fit.reference.shape[0] != items.shape[0]:
                    raise ValueError(f"image_fit holds {fit.reference.shape[0]} images for {items.shape[0]} rows")
                mixture, direction = fit.mixture, fit.direction
                scores = self.score(item_points, fit) * items_mask
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
            if self.alignment_kind == "mean_direction":
                alignment_loss = self.alignment_loss(direction, item_points, items_mask)
            else:
                alignment_loss = self.contrastive_alignment_loss(scores, items_mask, items_relevance)
                if self.cross_image_weight > 0 and items.shape[1] > 0:
                    cross = self.cross_image_alignment_loss(item_points, fit, items_mask, items_relevance)
                    alignment_loss = alignment_loss + self.cross_image_weight * cross
                if self.alignment_kind == "gate":
                    # The InfoNCE orders the scores; the BCE, on detached scores, places tau (on the scores too, it
                    # slowed their ordering: AUROC 0.71 against 0.91 after 300 steps on knowledge-VQA).
                    cut = (scores.detach() - self.threshold.to(dtype)) / self.temperature
                    alignment_loss = alignment_loss + self.gate_relevance_loss(cut, items_mask, items_relevance)
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
        """True until `calibrate_threshold` has set tau (a saved, trained or reloaded model never needs it).

        Reading the flag is a host synchronisation; once it was read True, that answer is kept host-side for as long
        as the flag tensor is the same object at the same version (`load_state_dict`, `from_pretrained` and
        `_init_weights` write or replace it, and the next read looks again)."""
        if not self.use_gate:
            return False
        flag = self.threshold_calibrated
        if flag.is_inference():  # inference tensors keep no version counter: read it every time
            return not bool(flag)
        known = self._known_calibrated
        if known is not None and known[0] is flag and known[1] == flag._version:
            return False
        if not bool(flag):
            return True
        self._known_calibrated = (flag, flag._version)
        return False

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
        # where, not a product: with no item at all (M = 0) per_example is -inf - (-inf)
        return torch.where(has_positive, per_example, 0.0).sum() / has_positive.sum().clamp_min(1)

    def cross_image_alignment_loss(self, item_points, fit, items_mask, items_relevance):
        """InfoNCE over the batch's images: every item that states its row's training answer is scored under each
        row's mixture, and its own row's image must win, -log softmax over rows of (score / temperature).

        The within-question InfoNCE contrasts candidates that differ only in their concept; here the negatives
        are the other images of the same forward (of this process and micro-batch: a larger batch gives more).
        Two rows of one image give equal logits, whose gradients cancel; images that show the item's concept too
        are negatives it cannot beat through its concept: they raise the loss's floor and add a little noise.
        `item_points` (B, M, d') projected items, `fit` the rows' fits. Examples without a positive, or without
        relevance, contribute nothing.
        """
        if items_relevance is None:
            return item_points.new_zeros(())
        rows, items, dim = item_points.shape
        every_item = item_points.reshape(1, rows * items, dim).expand(rows, rows * items, dim)
        logits = self.score(every_item, fit) / self.alignment_temperature  # (images, items of the whole batch)
        own_row = torch.arange(rows, device=logits.device).repeat_interleave(items)
        per_item = torch.logsumexp(logits, 0) - logits.gather(0, own_row.unsqueeze(0)).squeeze(0)
        positive = (items_relevance.to(logits.dtype) * items_mask).reshape(-1)
        return (per_item * positive).sum() / positive.sum().clamp_min(1.0)

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
    def alignment_loss(image_direction, item_points, items_mask):
        """Cross-modal alignment on the hypersphere: 1 - cos(item, mean image direction), averaged over real items."""
        cosine = torch.einsum("bmd,bd->bm", F.normalize(item_points, dim=-1), image_direction)
        return ((1.0 - cosine) * items_mask).sum() / items_mask.sum().clamp_min(1.0)


__all__ = [
    "ImplicitOODLayer",
    "ImplicitOODOutput",
    "GaussianMixtureOutput",
    "ImageFit",
    "gem_score",
    "log_likelihood",
    "log_likelihood_score",
    "relative_log_likelihood",
]

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
    """Mixture fields plus, per knowledge item (B, M): the `scores`, the `gate` and its stable `log_gate`. For the
    training objectives (`modeling_vkood.training.ood_objectives`): `knowledge_points` (B, M, d'), the projected
    items, and `image_fit`, the `ImageFit` of each row's image (None without knowledge items)."""

    scores: torch.FloatTensor | None = None
    gate: torch.FloatTensor | None = None
    log_gate: torch.FloatTensor | None = None
    knowledge_points: torch.FloatTensor | None = None
    image_fit: "ImageFit | None" = None


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


class InputDtypeLinear(nn.Linear):
    """A linear layer computed in its input's dtype (the OOD layer runs in float32 under a bf16 model). A module
    call, not a read of its weight: accelerate's hooks then load an offloaded weight (`device_map`)."""

    def forward(self, hidden):
        return F.linear(hidden, self.weight.to(hidden.dtype), self.bias.to(hidden.dtype))


class ImplicitOODLayer(nn.Module):
    """Scores and gates knowledge items by how well they fit a Gaussian mixture of the image tokens.

    Gradient modes (`ImplicitOODConfig.gradient`):
    - "last_iterate" (paper): the solver runs without a graph; one differentiable step T(stop_grad(theta*); Z)
      carries the gradient, so memory does not grow with the iteration count.
    - "implicit": implicit function theorem; the backward solves the adjoint fixed point u = g + (dT/dtheta)^T u.
    - "unrolled": autograd through every iteration (the reference the other two are tested against).

    The solver is a fixed-shape loop on the device: an example whose next step would change its statistics by less
    than tol (relative) is frozen (`torch.where`; its state, residual and iteration count stop changing), and the
    host reads whether all have converged only every `convergence_check_every` iterations (0: never, a fixed budget
    of `max_iter`), each read being a host synchronisation. An example's fit therefore does not depend on the rest of
    its batch.
    """

    def __init__(self, config, hidden_size):
        """`config`: an `ImplicitOODConfig`; `hidden_size`: the width of the image tokens and knowledge vectors."""
        super().__init__()
        self.num_components = config.num_components
        self.max_iter = config.max_iter
        self.tol = config.tol
        self.check_every = config.convergence_check_every
        self.variance_floor = config.variance_floor
        self.gradient_mode = config.gradient
        self.temperature = config.temperature
        self.hard_gate = config.hard_gate
        self.use_gate = config.use_gate
        self.score_kind = config.score
        self.projection = InputDtypeLinear(hidden_size, config.projection_dim)
        # Shape (1,), not 0-dim: DeepSpeed ZeRO broadcasts parameters through `view(torch.uint8)`, which 0-dim
        # tensors refuse.
        self.threshold = nn.Parameter(torch.full((1,), float(config.threshold)))
        # Whether tau was set from data (`set_threshold`); saved with the weights, so a trained or reloaded model is
        # never re-calibrated.
        self.register_buffer("threshold_calibrated", torch.tensor(False))
        self._known_calibrated = None  # (the flag tensor, its version) once it was read True: no further host reads

    def _may_stop(self, step, active):
        """Whether the host stops the loop after `step`: only every `check_every` steps does it read `active` (a
        host synchronisation), and never after the last step, which ends the loop anyway. Never under torch.compile
        or torch.export either (a read would break the graph): the full budget gives the same fit, as converged
        examples stay frozen."""
        if not self.check_every or step % self.check_every or step >= self.max_iter or torch.compiler.is_compiling():
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

    def project(self, hidden):
        """Shared projection to d', then per-vector standardisation: bounded scale whatever the input magnitude."""
        projected = self.projection(hidden)
        return F.layer_norm(projected, projected.shape[-1:])

    def score(self, knowledge_points, fit):
        """Per-item OOD score under the example's mixture (`ImplicitOODConfig.score`): "log_likelihood" or "gem"."""
        if self.score_kind == "log_likelihood":
            return relative_log_likelihood(knowledge_points, fit.mixture, fit.reference)
        return gem_score(knowledge_points, fit.mixture)

    @staticmethod
    def _dtype(tensor):
        return torch.float64 if tensor.dtype == torch.float64 else torch.float32

    def fit_images(self, image_tokens, image_mask=None):
        """The `ImageFit` of each image: `image_tokens` (B, N, H), `image_mask` 1/True for real ones."""
        dtype = self._dtype(image_tokens)
        with torch.autocast(device_type=image_tokens.device.type, enabled=False):
            points = self.project(image_tokens.to(dtype))
            mask = torch.ones(points.shape[:2], device=points.device) if image_mask is None else image_mask
            mask = mask.to(dtype)
            mixture = self.fit_mixture(points, mask)
            if self.score_kind == "log_likelihood":
                reference = mixture_log_likelihood(points, mask, mixture.weights, mixture.means, mixture.variances)
            else:
                reference = points.new_zeros(points.shape[0])
            direction = F.normalize((points * mask.unsqueeze(-1)).sum(1), dim=-1)
        return ImageFit(mixture, reference, direction)

    def forward(
        self,
        image_tokens,
        knowledge,
        image_mask=None,
        knowledge_mask=None,
        knowledge_relevance=None,
        gate_forcing=None,
        image_fit=None,
    ):
        """Score and gate each knowledge item against its row's image.

        `image_tokens` (B, N, H); `knowledge` (B, M, H) item vectors; masks 1/True for real entries. `image_fit`:
        the `fit_images` of each row's image, when it was fitted once for several rows (`image_tokens` is then not
        read). Training only: `gate_forcing` (a share s in [0, 1], float or 0-dim tensor) with `knowledge_relevance`
        (B, M), 1 for the items that state the example's answer, gives the fusion the gate (1 - s) * gate +
        s * relevance (see `forced_log_gate`)."""
        dtype = self._dtype(knowledge)
        with torch.autocast(device_type=knowledge.device.type, enabled=False):
            knowledge_points = self.project(knowledge.to(dtype))
            if knowledge_mask is None:
                knowledge_mask = torch.ones(knowledge.shape[:2], device=knowledge.device)
            knowledge_mask = knowledge_mask.to(dtype)
            fit = None
            if knowledge.shape[1] == 0:  # no knowledge item (a static shape): nothing to score, so no EM
                # the empty mixture hangs on the image's graph where there is one (its gradient is then a zero)
                images = knowledge_points if image_tokens is None else self.project(image_tokens.to(dtype))
                mixture = _no_mixture(images)
                scores = knowledge_points.sum(-1)  # (B, 0), from the items like the scores it stands for
            else:
                fit = self.fit_images(image_tokens, image_mask) if image_fit is None else image_fit
                if fit.reference.shape[0] != knowledge.shape[0]:
                    raise ValueError(f"image_fit holds {fit.reference.shape[0]} images for {knowledge.shape[0]} rows")
                mixture = fit.mixture
                scores = self.score(knowledge_points, fit) * knowledge_mask
            if not self.use_gate:
                # gate 1 exactly, but tau and the projection stay in the graph with a zero gradient: under DDP
                # (find_unused_parameters=False) the ablation then trains like the layer it ablates
                log_gate = 0.0 * self.gate_logits(scores)
            elif self.hard_gate and not self.training:
                log_gate = torch.where(scores > self.threshold, 0.0, float("-inf")).to(dtype)
            else:
                # logsigmoid, not log(sigmoid): finite gradients even for items far outside the mixture
                log_gate = F.logsigmoid(self.gate_logits(scores))
            log_gate = log_gate.masked_fill(knowledge_mask == 0, float("-inf"))
            if self.training and gate_forcing is not None and knowledge_relevance is not None:
                log_gate = forced_log_gate(log_gate, knowledge_mask, knowledge_relevance, gate_forcing)
        return ImplicitOODOutput(
            weights=mixture.weights,
            means=mixture.means,
            variances=mixture.variances,
            iterations=mixture.iterations,
            residual=mixture.residual,
            scores=scores,
            gate=log_gate.exp(),
            log_gate=log_gate,
            knowledge_points=knowledge_points,
            image_fit=fit,
        )

    def gate_logits(self, scores):
        """(score - tau) / temperature: the logits of the soft gate, in the scores' dtype."""
        return (scores - self.threshold.to(scores.dtype)) / self.temperature

    @property
    def needs_calibration(self) -> bool:
        """True while tau has not been set from data (`set_threshold`) and the score has no natural zero: GEM's
        energy depends on d' and on how far the encoders start apart, so training calibrates tau from the scores of
        its first examples; the log-likelihood score is relative to the image's own tokens and needs none. A saved,
        trained or reloaded model never needs it.

        Reading the flag is a host synchronisation; once it was read True, that answer is kept host-side for as long
        as the flag tensor is the same object at the same version (`load_state_dict`, `from_pretrained` and
        `_init_weights` write or replace it, and the next read looks again)."""
        if not self.use_gate or self.score_kind == "log_likelihood":
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
    def set_threshold(self, threshold):
        """Set tau from data (a float or a tensor) and mark it calibrated."""
        self.threshold.copy_(torch.as_tensor(threshold).to(self.threshold.device, self.threshold.dtype))
        self.threshold_calibrated.fill_(True)


def forced_log_gate(log_gate, knowledge_mask, knowledge_relevance, share):
    """log of (1 - s) * gate + s * relevance: the gate teacher-forced by the items that state the training answer.

    A fusion trained from scratch behind a gate that is still learning which items fit the image learns to ignore
    the knowledge; forced first, it learns to read the selected item, and a schedule (the trainer's gate forcing)
    hands the selection over to the learned gate. `share` s: a float or 0-dim tensor in [0, 1] (a tensor does not
    make torch.compile specialise on each value)."""
    share = torch.as_tensor(share, dtype=log_gate.dtype, device=log_gate.device)
    forced = torch.log1p(-share) + log_gate  # -inf for s = 1: only the relevance remains
    relevant = (knowledge_relevance.to(log_gate.dtype) * knowledge_mask) > 0
    return torch.where(relevant, torch.logaddexp(forced, share.log()), forced)


__all__ = [
    "ImplicitOODLayer",
    "forced_log_gate",
    "ImplicitOODOutput",
    "GaussianMixtureOutput",
    "ImageFit",
    "gem_score",
    "log_likelihood",
    "log_likelihood_score",
    "relative_log_likelihood",
]

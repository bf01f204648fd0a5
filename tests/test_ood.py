"""The implicit OOD layer: EM against scikit-learn, gradients against finite differences, GEM scores, edge cases."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture

from benchmarks.dispatch_counts import ops_per_iteration
from modeling_vkood.ood_vkood import (
    _em_update,
    _initial_statistics,
    em_problem,
    em_step,
    gem_score,
    initial_mixture,
    mixture_log_likelihood,
)
from modeling_vkood.training.ood_objectives import OODAlignmentLoss, calibrate_threshold
from tests.utils.tiny import tiny_ood_layer


def make_layer(**overrides):
    return tiny_ood_layer(**overrides).double()


def clustered_points(batch=3, count=60, dim=4, components=3, spread=4.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, components, dim, generator=generator, dtype=torch.float64) * spread
    labels = torch.arange(count) % components
    return centers[:, labels] + torch.randn(batch, count, dim, generator=generator, dtype=torch.float64)


def test_converged_mixture_is_a_fixed_point_of_sklearn_em():
    layer = make_layer(num_components=3, max_iter=1000, tol=1e-12)
    points = clustered_points()
    mask = torch.ones(points.shape[:2], dtype=torch.float64)
    mask[1, 45:] = 0  # padded tokens must not count
    mixture = layer.fit_mixture(points, mask)
    assert (mixture.residual < 1e-12).all()
    for b in range(points.shape[0]):
        real = points[b][mask[b] > 0].numpy()
        reference = GaussianMixture(3, covariance_type="diag", reg_covar=layer.variance_floor)
        reference.weights_ = mixture.weights[b].numpy().copy()
        reference.means_ = mixture.means[b].numpy().copy()
        reference.covariances_ = mixture.variances[b].numpy().copy()
        reference.precisions_cholesky_ = 1.0 / np.sqrt(reference.covariances_)
        _, log_resp = reference._e_step(real)
        reference._m_step(real, log_resp)
        np.testing.assert_allclose(reference.weights_, mixture.weights[b].numpy(), atol=1e-5)
        np.testing.assert_allclose(reference.means_, mixture.means[b].numpy(), atol=1e-5)
        np.testing.assert_allclose(reference.covariances_, mixture.variances[b].numpy(), atol=1e-5)
        ours = mixture_log_likelihood(
            points[b : b + 1],
            mask[b : b + 1],
            mixture.weights[b : b + 1],
            mixture.means[b : b + 1],
            mixture.variances[b : b + 1],
        )
        assert ours.item() == pytest.approx(reference.score(real), abs=1e-8)


@pytest.mark.slow
def test_log_likelihood_never_decreases():
    """EM's ascent property; the variance floor (scikit-learn's reg_covar) is a regulariser, so use a negligible one."""
    points = clustered_points(batch=4, count=80, dim=6, components=4, spread=1.5, seed=3)
    mask = torch.ones(points.shape[:2], dtype=torch.float64)
    mask[2, 70:] = 0
    state = initial_mixture(em_problem(points, mask, 1e-12), 4)
    history = [mixture_log_likelihood(points, mask, *state)]
    for _ in range(60):
        state = em_step(points, mask, *state, 1e-12)
        history.append(mixture_log_likelihood(points, mask, *state))
    steps = torch.stack(history).diff(dim=0)
    assert (steps >= -1e-10).all(), steps.min()
    assert (history[-1] > history[0]).all()


def test_batched_fit_equals_one_example_at_a_time():
    layer = make_layer(num_components=3, max_iter=300, tol=1e-12)
    points = clustered_points(batch=3, count=40)
    mask = torch.ones(points.shape[:2], dtype=torch.float64)
    mask[0, 30:] = 0
    batched = layer.fit_mixture(points, mask)
    for b in range(3):
        alone = layer.fit_mixture(points[b : b + 1, mask[b] > 0])
        torch.testing.assert_close(alone.means[0], batched.means[b], atol=1e-8, rtol=0)
        torch.testing.assert_close(alone.variances[0], batched.variances[b], atol=1e-8, rtol=0)


def _fit_fn(layer):
    def fit(points):
        mixture = layer.fit_mixture(points)
        return torch.cat([mixture.weights.flatten(), mixture.means.flatten(), mixture.variances.flatten()])

    return fit


def _separated_points():
    generator = torch.Generator().manual_seed(1)
    centers = torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    noise = 0.7 * torch.randn(2, 12, 2, generator=generator, dtype=torch.float64)
    return (centers[torch.arange(12) % 2] + noise).requires_grad_()


def test_implicit_gradient_matches_finite_differences():
    layer = make_layer(num_components=2, max_iter=3000, tol=1e-13, gradient="implicit")
    assert torch.autograd.gradcheck(
        _fit_fn(layer), (_separated_points(),), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True
    )


def test_implicit_equals_unrolled_at_convergence_and_last_iterate_is_one_step():
    points = _separated_points()
    weights = torch.randn(2 * 2 + 2 * 2 * 2 * 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gradients = {}
    for mode in ("implicit", "unrolled", "last_iterate"):
        layer = make_layer(num_components=2, max_iter=3000, tol=1e-13, gradient=mode)
        (gradients[mode],) = torch.autograd.grad((_fit_fn(layer)(points) * weights).sum(), points)
    torch.testing.assert_close(gradients["implicit"], gradients["unrolled"], atol=1e-7, rtol=1e-6)
    # last_iterate is the paper's cheap approximation: the Jacobian of a single EM step at theta*
    detached = make_layer(num_components=2, max_iter=3000, tol=1e-13)
    theta_star = detached.fit_mixture(points.detach())
    one_step = em_step(
        points,
        torch.ones(2, 12, dtype=torch.float64),
        theta_star.weights,
        theta_star.means,
        theta_star.variances,
        detached.variance_floor,
    )
    (expected,) = torch.autograd.grad((torch.cat([t.flatten() for t in one_step]) * weights).sum(), points)
    torch.testing.assert_close(gradients["last_iterate"], expected)


def _saved_bytes(mode, iterations):
    torch.manual_seed(0)  # unseeded, EM sometimes reached its fixed point exactly and that row stopped early
    layer = tiny_ood_layer(max_iter=iterations, tol=1e-30, gradient=mode)
    context = torch.randn(4, 50, 32, requires_grad=True)
    items = torch.randn(4, 6, 32, requires_grad=True)
    total = []

    def pack(tensor):
        total.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = layer(context, items)
    assert output.iterations.tolist() == [iterations] * 4  # per example, (B,)
    output.gate.sum().backward()
    assert torch.isfinite(context.grad).all()
    return sum(total)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["last_iterate", "implicit"])
def test_saved_memory_does_not_grow_with_iterations(mode):
    assert _saved_bytes(mode, 50) == _saved_bytes(mode, 5)


def test_unrolled_memory_grows_with_iterations():
    assert _saved_bytes("unrolled", 50) > 5 * _saved_bytes("unrolled", 5)


def test_gem_separates_inliers_from_far_points():
    generator = torch.Generator().manual_seed(0)
    dim, components = 16, 4
    centers = torch.randn(components, dim, generator=generator) * 3
    inliers = centers[torch.arange(400) % components] + torch.randn(400, dim, generator=generator)
    layer = tiny_ood_layer(num_components=components, projection_dim=dim)
    mixture = layer.fit_mixture(inliers[None, :300])
    held_out = inliers[None, 300:]
    far = torch.randn(1, 100, dim, generator=generator) * 3 + 12.0
    scores = torch.cat([gem_score(held_out, mixture), gem_score(far, mixture)], dim=1)[0]
    labels = np.r_[np.ones(100), np.zeros(100)]
    assert roc_auc_score(labels, scores.numpy()) >= 0.99


@pytest.mark.parametrize("dim", [4, 16, 64])
def test_score_is_standardised_whatever_the_width(dim):
    """Inliers of a fitted Gaussian score about N(0, 1) for every d', so one threshold serves every width."""
    generator = torch.Generator().manual_seed(dim)
    scale = torch.rand(dim, generator=generator) + 0.5
    points = torch.randn(1, 4000, dim, generator=generator, dtype=torch.float64) * scale
    layer = make_layer(num_components=1, variance_floor=1e-6)  # the floor is a regulariser: keep it out
    mixture = layer.fit_mixture(points[:, :3000])
    scores = gem_score(points[:, 3000:], mixture)
    assert abs(scores.mean().item()) < 0.15
    assert scores.std().item() == pytest.approx(1.0, abs=0.15)


def _degenerate_inputs():
    ones = torch.ones(2, 10, 32)
    yield "identical tokens", ones * 0.3, torch.randn(2, 3, 32), None, None
    yield "zero vectors", torch.zeros(2, 10, 32), torch.zeros(2, 3, 32), None, None
    yield "magnitude 1e4", torch.randn(2, 10, 32) * 1e4, torch.randn(2, 3, 32) * 1e4, None, None
    yield "one token", torch.randn(2, 1, 32), torch.randn(2, 3, 32), None, None
    yield "no items", torch.randn(2, 10, 32), torch.randn(2, 0, 32), None, None
    yield "all items masked", torch.randn(2, 10, 32), torch.randn(2, 3, 32), None, torch.zeros(2, 3)
    yield "fully padded context", torch.randn(2, 10, 32), torch.randn(2, 3, 32), torch.zeros(2, 10), None


@pytest.mark.parametrize("case", list(_degenerate_inputs()), ids=lambda case: case[0])
@pytest.mark.parametrize("mode", ["last_iterate", "implicit", "unrolled"])
def test_degenerate_inputs_stay_finite(case, mode):
    _, context, items, context_mask, items_mask = case
    layer = tiny_ood_layer(gradient=mode)
    context = context.clone().requires_grad_()
    items = items.clone().requires_grad_()
    output = layer(context, items, context_mask, items_mask)
    for name in ("scores", "gate", "weights", "means", "variances", "residual"):
        assert torch.isfinite(getattr(output, name)).all(), name
    assert output.gate.shape == items.shape[:2]
    (output.gate.sum() + output.means.sum()).backward()
    assert torch.isfinite(context.grad).all() and torch.isfinite(layer.threshold.grad).all()
    if items_mask is not None:
        assert (output.gate == 0).all()


def test_bf16_autocast_runs_em_in_float32():
    layer = tiny_ood_layer()
    context = torch.randn(2, 20, 32).bfloat16()
    items = torch.randn(2, 5, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(context, items)
    assert output.means.dtype == torch.float32 and torch.isfinite(output.scores).all()
    reference = layer(context.float(), items.float())
    torch.testing.assert_close(output.scores, reference.scores)


def test_same_input_same_output_and_hard_gate():
    layer = tiny_ood_layer(hard_gate=True).eval()
    context, items = torch.randn(3, 20, 32), torch.randn(3, 5, 32)
    first, second = layer(context, items), layer(context, items)
    assert torch.equal(first.scores, second.scores)
    assert set(first.gate.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(first.gate, (first.scores > layer.threshold).float())


def test_gate_follows_threshold_and_temperature():
    layer = tiny_ood_layer(temperature=2.0, threshold=-1.0)
    output = layer(torch.randn(2, 20, 32), torch.randn(2, 5, 32))
    expected = torch.sigmoid((output.scores + 1.0) / 2.0)
    torch.testing.assert_close(output.gate, expected)
    assert math.isclose(layer.threshold.item(), -1.0)


def test_mean_direction_loss_is_one_minus_cosine_to_the_image_direction():
    layer = tiny_ood_layer()
    context, items = torch.randn(2, 20, 32), torch.randn(2, 3, 32)
    items_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    output = layer(context, items, knowledge_mask=items_mask)
    image = torch.nn.functional.normalize(layer.project(context).mean(1), dim=-1)
    cosine = torch.nn.functional.cosine_similarity(layer.project(items), image[:, None], dim=-1)
    expected = ((1 - cosine) * items_mask).sum() / 3
    alignment = OODAlignmentLoss("mean_direction", weight=1.0)
    torch.testing.assert_close(alignment.layer_loss(layer, output, items_mask, None), expected)


def test_calibration_sets_tau_once_to_the_quantile_and_forward_never_writes_it():
    layer = tiny_ood_layer()
    context, items = torch.randn(3, 20, 32), torch.randn(3, 6, 32) * 3
    items_mask = torch.ones(3, 6)
    items_mask[2, 3:] = 0
    assert layer.needs_calibration
    first = layer.train()(context, items, knowledge_mask=items_mask)
    assert layer.threshold.item() == pytest.approx(-3.0) and layer.needs_calibration  # forward leaves tau alone
    real = first.scores[items_mask.bool()]
    tau = calibrate_threshold(layer, real, 0.25)
    expected = torch.quantile(real, 0.25)
    assert tau == pytest.approx(expected.item()) and layer.threshold.item() == pytest.approx(expected.item())
    assert not layer.needs_calibration and layer.threshold.requires_grad
    assert (layer(context, items, knowledge_mask=items_mask).gate[items_mask.bool()] > 0).float().mean() > 0.5
    assert calibrate_threshold(tiny_ood_layer(), torch.zeros(0), 0.25) is None
    reloaded = tiny_ood_layer()
    reloaded.load_state_dict(layer.state_dict())
    assert not reloaded.needs_calibration and reloaded.threshold.item() == pytest.approx(expected.item())
    # the log-likelihood score is relative to the image's own tokens: it has a zero, and tau needs no calibration
    assert not tiny_ood_layer(score="log_likelihood").needs_calibration


def _calibrate_on_rank(rank, world_size, init_file, scores_per_rank, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        layer = tiny_ood_layer()
        tau = calibrate_threshold(layer, scores_per_rank[rank], 0.3)
        nobody = calibrate_threshold(tiny_ood_layer(), torch.zeros(0), 0.3)
        results[rank] = (tau, layer.threshold.item(), bool(layer.threshold_calibrated), nobody)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_calibration_is_one_quantile_over_every_rank_and_a_rank_without_items_does_not_hang(tmp_path):
    """Two gloo processes; rank 1 has no real item (it used to return before the all_reduce and hang rank 0)."""
    scores = [torch.linspace(-5.0, 1.0, 7), torch.zeros(0)]  # rank 1's padding must not enter the quantile
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.start_processes(
            _calibrate_on_rank, args=(2, tmp_path / "init", scores, results), nprocs=2, start_method="spawn"
        )
        results = dict(results)
    expected = torch.quantile(torch.cat(scores), 0.3).item()
    assert results == {rank: (pytest.approx(expected), pytest.approx(expected), True, None) for rank in range(2)}


def test_variance_floor_bounds_how_far_a_score_can_fall():
    """Projected points lie on a sphere of radius sqrt(d'): squared distances are at most 4 d' / floor."""
    layer = tiny_ood_layer(variance_floor=0.1, projection_dim=16)
    output = layer(torch.randn(2, 30, 32), torch.randn(2, 8, 32) * 1e3)
    dim = 16
    bound = (-0.5 * 4 * dim / 0.1 + 0.5 * dim) / math.sqrt(0.5 * dim)
    assert (output.scores >= bound - 1e-4).all()


def _fit(check_every, max_iter=200, tol=1e-10, mode="last_iterate"):
    layer = make_layer(num_components=3, max_iter=max_iter, tol=tol, convergence_check_every=check_every, gradient=mode)
    points = clustered_points(batch=3, count=40, seed=4)
    points[1] = points[1, :1].expand(40, -1)  # identical tokens: converges at once, long before the others
    return layer.fit_mixture(points)


@pytest.mark.slow
def test_converged_examples_are_frozen_so_the_check_interval_changes_nothing():
    """A converged example stops changing: the host looking every step, every 7 or never (a fixed budget of 200)
    gives the very same mixture, and each example keeps its own iteration count."""
    every_step, every_7, never = _fit(1), _fit(7), _fit(0)
    assert every_step.iterations[1] < every_step.iterations[0] and (every_step.residual < 1e-10).all()
    for other in (every_7, never):
        for name in ("weights", "means", "variances", "iterations", "residual"):
            assert torch.equal(getattr(every_step, name), getattr(other, name)), name
    assert every_step.iterations.shape == (3,) and every_step.iterations.dtype == torch.long


def test_a_converged_example_is_converged_relative_to_its_own_statistics_too():
    """The stop rule measures a step's change against a fixed per-example scale that no split of the mass over the
    components undercuts: a converged example's next step also changes its current statistics by less than tol."""
    tol = 1e-6
    layer = make_layer(num_components=3, max_iter=500, tol=tol)
    points = clustered_points(batch=3, count=40, seed=4)
    problem = em_problem(points, torch.ones(points.shape[:2], dtype=points.dtype), layer.variance_floor)
    statistics, iterations, residual = layer._solve(problem, _initial_statistics(problem, 3))
    assert (residual < tol).all() and (iterations < 500).all()
    change = torch.linalg.vector_norm(_em_update(problem, statistics) - statistics, dim=(1, 2))
    relative = change / torch.linalg.vector_norm(statistics, dim=(1, 2))
    assert (relative <= residual).all() and (relative < tol).all()


def test_one_solver_iteration_dispatches_at_most_20_ops():
    """The EM step (15 ops: two batched matmuls, a softmax and the parameters) and the convergence bookkeeping (the
    difference, its norm, the comparison, the freezing `where` and the counter): kernel launches on an accelerator."""
    layer = make_layer(num_components=4, convergence_check_every=0, tol=1e-30)
    points = torch.randn(2, 17, 16, dtype=torch.float64)

    def fit(iterations):
        layer.max_iter = iterations
        layer.fit_mixture(points)

    with torch.no_grad():
        assert ops_per_iteration(fit) <= 20


def test_an_example_fit_does_not_depend_on_its_batch():
    batched = _fit(5)
    points = clustered_points(batch=3, count=40, seed=4)
    alone = make_layer(num_components=3, max_iter=200, tol=1e-10).fit_mixture(points[2:])
    assert alone.iterations.item() == batched.iterations[2].item()
    torch.testing.assert_close(alone.means[0], batched.means[2], rtol=0, atol=1e-12)


def _trained_calibrated_layer(**overrides):
    layer = tiny_ood_layer(tol=1e-30, **overrides).train()
    calibrate_threshold(layer, torch.randn(20), 0.5)
    assert not layer.needs_calibration  # read once here: from now on a host-side answer
    return layer


def _syncs_of_a_training_step(layer):
    from benchmarks.dispatch_counts import HostSyncCounter

    context, items = torch.randn(3, 20, 32, requires_grad=True), torch.randn(3, 5, 32, requires_grad=True)
    items_mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [0.0] * 5])
    alignment = OODAlignmentLoss("mean_direction")
    with HostSyncCounter() as syncs:
        assert not layer.needs_calibration
        output = layer(context, items, knowledge_mask=items_mask)
        loss = alignment.layer_loss(layer, output, items_mask, None)
        (output.gate.sum() + output.scores.sum() + loss).backward()
    assert torch.isfinite(context.grad).all()
    return syncs.events


@pytest.mark.parametrize("mode", ["last_iterate", "implicit", "unrolled"])
def test_training_step_host_synchronisations(mode):
    """After calibration: none with a fixed budget; one host read per `check_every` steps otherwise (forward and,
    in implicit mode, the adjoint solve), at most ceil(max_iter / k) each."""
    assert _syncs_of_a_training_step(_trained_calibrated_layer(gradient=mode, convergence_check_every=0)) == []
    events = _syncs_of_a_training_step(_trained_calibrated_layer(gradient=mode, max_iter=12, convergence_check_every=5))
    solves = 2 if mode == "implicit" else 1
    assert len(events) == solves * 2 <= solves * math.ceil(12 / 5)  # reads after steps 5 and 10, not after 12
    assert {name for name, _ in events} == {"_local_scalar_dense"} and all("_may_stop" in where for _, where in events)


def test_fixed_budget_implicit_gradient_equals_the_early_stopped_one():
    points = _separated_points()
    gradients = []
    for check_every in (0, 1):
        layer = make_layer(
            num_components=2, max_iter=400, tol=1e-13, gradient="implicit", convergence_check_every=check_every
        )
        (gradient,) = torch.autograd.grad(_fit_fn(layer)(points).square().sum(), points)
        gradients.append(gradient)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alignment", ["mean_direction", "contrastive", "gate"])
@pytest.mark.parametrize("score", ["gem", "log_likelihood"])
def test_no_knowledge_items_means_no_em(monkeypatch, alignment, score):
    from modeling_vkood import ood_vkood

    monkeypatch.setattr(ood_vkood, "_em_update", lambda *args: pytest.fail("EM ran without any item to score"))
    cross_image = 1.0 if alignment != "mean_direction" else 0.0
    objective = OODAlignmentLoss(alignment, cross_image_weight=cross_image)
    layer = tiny_ood_layer(score=score).train()
    context = torch.randn(2, 10, 32, requires_grad=True)
    relevance = torch.zeros(2, 0)
    output = layer(context, torch.randn(2, 0, 32), knowledge_relevance=relevance)
    assert output.scores.shape == output.gate.shape == output.log_gate.shape == (2, 0)
    assert output.iterations.tolist() == [0, 0] and output.residual.tolist() == [0.0, 0.0]
    assert output.means.shape == (2, 0, 8) and output.weights.shape == (2, 0)
    alignment_loss = objective.layer_loss(layer, output, None, relevance)
    assert torch.isfinite(alignment_loss) and alignment_loss == 0
    (alignment_loss + output.gate.sum()).backward()  # the layer's parameters stay in the graph (DDP)
    assert layer.threshold.grad is not None and layer.projection.weight.grad is not None


def test_needs_calibration_reads_the_flag_until_it_is_true_and_sees_every_reload():
    from benchmarks.dispatch_counts import HostSyncCounter

    layer = tiny_ood_layer()
    fresh_state = {key: value.clone() for key, value in layer.state_dict().items()}
    with HostSyncCounter() as syncs:
        assert layer.needs_calibration and layer.needs_calibration
    assert syncs.count == 2  # not calibrated yet: read each time
    calibrate_threshold(layer, torch.randn(10), 0.5)
    with HostSyncCounter() as syncs:
        assert not layer.needs_calibration
    assert syncs.count == 1
    with HostSyncCounter() as syncs:
        assert not layer.needs_calibration and not layer.needs_calibration
    assert syncs.count == 0
    calibrated_state = {key: value.clone() for key, value in layer.state_dict().items()}
    layer.load_state_dict(fresh_state)  # writes the flag in place: a new version
    assert layer.needs_calibration
    layer.load_state_dict(calibrated_state)
    assert not layer.needs_calibration
    layer.threshold_calibrated = torch.tensor(False)  # a replaced buffer (as a meta-device load does)
    assert layer.needs_calibration


# the paper's layer, and the knowledge-VQA recipe's (the log-likelihood score, trained on the relevance labels by the
# gate alignment with the cross-image term): (ImplicitOODConfig settings, OODAlignmentLoss or None)
LAYERS = {"paper": ({"score": "gem"}, None), "recipe": ({"score": "log_likelihood"}, ("gate", 1.0, 1.0, 1.0))}


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYERS)
def test_compiled_fixed_budget_layer_has_no_graph_break_and_matches_eager(name):
    """torch.compile(fullgraph=True) raises on any graph break; forward and backward (the layer and its training
    objective) must agree with eager."""
    settings, objective = LAYERS[name]
    torch.manual_seed(0)
    layer = tiny_ood_layer(max_iter=6, convergence_check_every=0, **settings).train()
    layer.set_threshold(torch.randn(10).quantile(0.1))
    alignment = OODAlignmentLoss(*objective) if objective else None
    context, items = torch.randn(2, 12, 32), torch.randn(2, 3, 32)
    relevance = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) if objective else None
    items_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])

    def run(context, items):
        output = layer(context, items, knowledge_mask=items_mask, knowledge_relevance=relevance)
        loss = (
            output.scores.new_zeros(())
            if alignment is None
            else alignment.layer_loss(layer, output, items_mask, relevance)
        )
        return output.scores, output.gate, output.means, output.iterations, loss

    def step(function):
        layer.zero_grad()
        inputs = [context.clone().requires_grad_(), items.clone().requires_grad_()]
        scores, gate, means, iterations, loss = function(*inputs)
        (gate.sum() + scores.sum() + means.sum() + loss).backward()
        return [
            scores,
            gate,
            means,
            iterations,
            loss,
            *(x.grad for x in inputs),
            layer.projection.weight.grad.clone(),
            layer.threshold.grad.clone(),
        ]

    compiled = step(torch.compile(run, fullgraph=True, backend="aot_eager"))
    eager = step(run)
    for ours, reference in zip(compiled, eager):
        torch.testing.assert_close(ours, reference)

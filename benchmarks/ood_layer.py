"""Speed and memory of the implicit OOD layer, side by side in one run; prints JSON.

- forward+backward milliseconds per gradient mode at the paper's shapes (B=32, N=197, H=768, d'=64, K=4, M=16);
- bytes saved for backward at 5 and 50 EM iterations per mode (the last-iterate claim: memory does not grow);
- ood_share_of_step: the layer's forward+backward time on the inputs of one full VKOODForQuestionAnswering
  training step (paper backbones CLIP-ViT-B/16 + RoBERTa-base, random weights), over that step's time;
- host_syncs: host synchronisations (`dispatch_counts.HostSyncCounter`, classified as on CUDA) of one OOD-layer
  forward (eval) and training step (after calibration), with the default check interval and with a fixed budget
  (`ood_convergence_check_every=0`), and of one whole-model eval forward with knowledge on the fixed-shape path;
- aten_ops: ops dispatched by one EM step (`_em_update`) and by one solver iteration (EM step + convergence
  bookkeeping: the op count of a fixed-budget fit of n + 1 iterations minus that of n).

- compiled (with --compile): eager vs torch.compile(fullgraph=True) forward+backward ms of the layer, at 1 intra-op
  thread and at the process's count (`--compile-threads`).

    python benchmarks/ood_layer.py [--device cuda --dtype bf16] [--step-batch 2] [--repeats 5] [--compile]

Writes the JSON to benchmarks/results/ood_layer/ood_layer_<device type>.json (or `--out`) and records the commit,
command and arguments in that folder's provenance.json (benchmarks/provenance.py).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from dispatch_counts import HostSyncCounter, OpCounter, ops_per_iteration  # noqa: I001 (this folder's sibling: run as a script)
from tqdm import tqdm

from modeling_vkood import ImplicitOODConfig, VKOODConfig, VKOODForQuestionAnswering
from modeling_vkood.ood_vkood import ImplicitOODLayer, _em_update, _initial_statistics, em_problem

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import provenance

MODES = ("last_iterate", "implicit", "unrolled")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device, repeats):
    """Median wall time (ms) of `function` after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


HIDDEN = 768  # the width of the image tokens and knowledge vectors (the paper's fusion)


def ood_layer(config, **settings):
    """The OOD layer of `config` (ImplicitOODConfig settings) updated by `settings`, on width-HIDDEN inputs."""
    return ImplicitOODLayer(ImplicitOODConfig(**{**config, **settings}), HIDDEN)


def layer_step(layer, context, items, autocast_dtype):
    context = context.detach().requires_grad_()
    items = items.detach().requires_grad_()
    with torch.autocast(context.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        output = layer(context, items)
    (output.gate.sum() + output.scores.sum()).backward()
    return output


def saved_bytes(config, iterations, mode, context, items):
    layer = ood_layer(config, max_iter=iterations, tol=1e-30, gradient=mode).to(context.device)
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = layer(context.detach().requires_grad_(), items.detach().requires_grad_())
    assert (output.iterations == iterations).all()
    return total[0]


def layer_syncs(config, context, items, training):
    """Host synchronisations of one forward (eval) or forward+backward (training, after calibration)."""
    layer = ood_layer(config).to(context.device).train(training)
    layer.set_threshold(torch.randn(16, device=context.device).quantile(0.1))  # tau set from data, as training does
    assert not layer.needs_calibration  # the one read of the flag: from now on answered host-side
    with HostSyncCounter() as syncs:
        if training:
            layer_step(layer, context, items, None)
        else:
            with torch.no_grad():
                layer(context, items)
    return syncs.count


def aten_ops(config, context):
    """(ops of one EM step, ops of one solver iteration) on the projected context tokens."""
    layer = ood_layer(config, convergence_check_every=0).to(context.device)
    with torch.no_grad():
        points = layer.project(context)
        problem = em_problem(points, torch.ones(points.shape[:2], device=points.device), layer.variance_floor)
        statistics = _initial_statistics(problem, layer.num_components)
        with OpCounter() as step:
            _em_update(problem, statistics)

        def fit(iterations):
            layer.max_iter = iterations
            layer.fit_mixture(points)

        return step.count, ops_per_iteration(fit)


def model_syncs(model, batch, check_every):
    """Host synchronisations of one eval forward of the whole model on the fixed-shape path."""
    base = model.vkood
    base.force_fixed_shapes, base.ood.check_every = True, check_every
    was_training = model.training
    model.eval()
    with torch.no_grad(), HostSyncCounter() as syncs:
        model(**{key: value for key, value in batch.items() if key != "labels"})
    model.train(was_training)
    base.force_fixed_shapes, base.ood.check_every = False, model.config.ood_config.convergence_check_every
    return syncs.count


def compiled_vs_eager(config, context, items, autocast_dtype, device, repeats, threads):
    """Forward+backward ms of the layer (last iterate, training, fixed EM budget: what compiles without a graph break)
    eager and under torch.compile(fullgraph=True), alternated so that a change of machine speed hits both alike, with
    `threads` intra-op threads (inductor writes the thread count into its CPU kernels: compiled anew for each)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    layer = ood_layer(config, convergence_check_every=0).to(device).train()
    layer.threshold_calibrated.fill_(True)
    compiled = torch.compile(layer, fullgraph=True)
    start = time.perf_counter()
    layer_step(compiled, context, items, autocast_dtype)
    compile_seconds = time.perf_counter() - start
    eager_ms, compiled_ms = [], []
    for _ in tqdm(range(repeats), desc=f"eager vs compiled, {threads} thread(s)"):
        eager_ms.append(timed(lambda: layer_step(layer, context, items, autocast_dtype), device, 1))
        compiled_ms.append(timed(lambda: layer_step(compiled, context, items, autocast_dtype), device, 1))
    torch.set_num_threads(previous)
    eager, fast = statistics.median(eager_ms), statistics.median(compiled_ms)
    return {
        "threads": threads,
        "eager_ms": eager,
        "compiled_ms": fast,
        "speedup": eager / fast,
        "compile_seconds": compile_seconds,
        "em_iterations": layer.max_iter,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype of the full step")
    parser.add_argument("--step-batch", type=int, default=2, help="batch of the full training step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile(layer, fullgraph=True) against eager (inductor; minutes on a CPU)",
    )
    parser.add_argument(
        "--compile-threads",
        type=int,
        nargs="+",
        help="intra-op thread counts of the compiled-vs-eager timing (default: 1 and this process's)",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: benchmarks/results/ood_layer/ood_layer_<device type>.json)"
    )
    args = parser.parse_args()
    run = provenance.begin(args)
    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    torch.manual_seed(0)

    shapes = dict(batch=32, tokens=197, hidden=768, items=16)
    config = dict(projection_dim=64, num_components=4, score="gem")  # the paper's layer, on width-768 tokens
    context = torch.randn(shapes["batch"], shapes["tokens"], shapes["hidden"], device=device)
    items = torch.randn(shapes["batch"], shapes["items"], shapes["hidden"], device=device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "layer_shapes": {**shapes, "projection": 64, "components": 4},
    }

    per_mode = {}
    for mode in tqdm(MODES, desc="gradient modes"):
        layer = ood_layer(config, gradient=mode).to(device)
        output = layer_step(layer, context, items, autocast_dtype)
        per_mode[mode] = {
            "forward_backward_ms": timed(
                lambda layer=layer: layer_step(layer, context, items, autocast_dtype), device, args.repeats
            ),
            "em_iterations_max": int(output.iterations.max()),
            "saved_bytes_5_iter": saved_bytes(config, 5, mode, context, items),
            "saved_bytes_50_iter": saved_bytes(config, 50, mode, context, items),
        }
        per_mode[mode]["memory_ratio_50_over_5"] = (
            per_mode[mode]["saved_bytes_50_iter"] / per_mode[mode]["saved_bytes_5_iter"]
        )
    for mode in MODES:
        per_mode[mode]["time_vs_last_iterate"] = (
            per_mode[mode]["forward_backward_ms"] / per_mode["last_iterate"]["forward_backward_ms"]
        )
    result["modes"] = per_mode
    if args.compile:
        threads = args.compile_threads or sorted({1, torch.get_num_threads()})
        result["compiled"] = [
            compiled_vs_eager(config, context, items, autocast_dtype, device, args.repeats, count) for count in threads
        ]
    check_every = ImplicitOODConfig().convergence_check_every
    result["host_syncs"] = {
        "ood_convergence_check_every": check_every,
        "ood_max_iter": ImplicitOODConfig().max_iter,
        "ood_layer_eval_forward": layer_syncs(config, context, items, training=False),
        "ood_layer_eval_forward_fixed_budget": layer_syncs(
            {**config, "convergence_check_every": 0}, context, items, False
        ),
        "ood_layer_training_step": layer_syncs(config, context, items, training=True),
        "ood_layer_training_step_fixed_budget": layer_syncs(
            {**config, "convergence_check_every": 0}, context, items, True
        ),
    }
    ops_per_step, ops_per_iteration = aten_ops(config, context)
    result["aten_ops"] = {"per_em_step": ops_per_step, "per_solver_iteration": ops_per_iteration}

    model = VKOODForQuestionAnswering(VKOODConfig(num_labels=3129, ood_config=config)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = {
        "pixel_values": torch.randn(args.step_batch, 3, 224, 224, device=device),
        "input_ids": torch.randint(5, 50000, (args.step_batch, 32), device=device),
        "knowledge_input_ids": torch.randint(5, 50000, (args.step_batch, 16, 16), device=device),
        "labels": torch.rand(args.step_batch, 3129, device=device),
    }
    captured = {}
    model.vkood.ood.register_forward_hook(
        lambda module, inputs, output: captured.update(context=inputs[0], items=inputs[1])
    )

    def train_step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result["host_syncs"]["model_eval_forward_fixed_shapes"] = model_syncs(model, batch, check_every)
    result["host_syncs"]["model_eval_forward_fixed_shapes_fixed_budget"] = model_syncs(model, batch, 0)
    step_ms = timed(train_step, device, args.repeats)
    ood_ms = timed(
        lambda: layer_step(model.vkood.ood, captured["context"], captured["items"], autocast_dtype),
        device,
        args.repeats,
    )
    result["full_step"] = {
        "batch": args.step_batch,
        "backbones": "clip-vit-base-patch16 + roberta-base shapes (random weights), 6 fusion layers, M=16",
        "step_ms": step_ms,
        "ood_layer_ms": ood_ms,
        "ood_share_of_step": ood_ms / step_ms,
    }
    out = args.out or REPO_ROOT / "benchmarks" / "results" / "ood_layer" / f"ood_layer_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    provenance.record(out.parent, run, outputs=[out])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

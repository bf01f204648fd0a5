"""PNG figures for the output folder: training/evaluation curves and the OOD score distributions."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(log_history: list[dict], path: Path, metric: str | None = None) -> Path:
    """Training loss per logged step; evaluation loss and `metric` (e.g. eval_vqa_accuracy) per evaluation."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evals = [entry for entry in log_history if "eval_loss" in entry or (metric and metric in entry)]
    panels = 1 + bool(metric and any(metric in entry for entry in evals))
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    loss_axis = axes[0][0]
    if train:
        loss_axis.plot(*zip(*train), label="train loss")
    eval_loss = [(entry["step"], entry["eval_loss"]) for entry in evals if "eval_loss" in entry]
    if eval_loss:
        loss_axis.plot(*zip(*eval_loss), "o-", label="eval loss")
    loss_axis.set(xlabel="step", ylabel="loss", title="loss")
    if train or eval_loss:
        loss_axis.legend()
    if panels == 2:
        points = [(entry["step"], entry[metric]) for entry in evals if metric in entry]
        axes[0][1].plot(*zip(*points), "o-")
        axes[0][1].set(xlabel="step", ylabel=metric, title=metric)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def ood_histogram(scores, gates, path: Path, threshold: float = 0.5) -> Path:
    """Histogram of the standardised OOD scores of knowledge items, kept (gate > threshold) vs gated out."""
    figure, axis = plt.subplots(figsize=(6, 4))
    kept = gates > threshold
    for selection, label in ((kept, "kept"), (~kept, "gated out")):
        values = scores[selection]
        axis.hist(values.numpy(), bins=40, alpha=0.6, label=f"{label} ({len(values)})")
    axis.set(xlabel="OOD score (standardised GEM)", ylabel="knowledge items", title="knowledge items by OOD gate")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

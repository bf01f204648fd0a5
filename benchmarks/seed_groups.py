"""Final metrics of `train.py` runs grouped by variant: each run, and per group the mean ± standard error over its
seeds (JSON + PNG).

    python benchmarks/seed_groups.py GROUP=OUTPUT_DIR [GROUP=OUTPUT_DIR ...] --out benchmarks/results/STUDY/NAME

A group name given several times collects those runs (one per seed). Reads each folder's `all_results.json`; writes
OUT.json ({"groups": {group: {metric: {"values", "mean", "sem"}}}, "runs": {group: [folder, ...]}}) and OUT.png (one
panel per metric: every run as a point, the group's mean ± standard error as a bar), and records the commit, command
and arguments in the folder's provenance.json (benchmarks/provenance.py). Prints the JSON's groups.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import provenance

METRICS = ("eval_vqa_accuracy", "ood_auroc_fitting", "ood_kept_fraction_fitting", "ood_kept_fraction_not_fitting")


def summary(values):
    """Mean and standard error of the mean (sample deviation / sqrt(n); 0 for one value)."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"values": values, "mean": mean, "sem": spread / math.sqrt(len(values))}


def group_runs(specs):
    runs = {}
    for spec in specs:
        group, _, folder = spec.partition("=")
        runs.setdefault(group, []).append(folder)
    return runs


def summarise(runs, metrics=METRICS):
    groups = {}
    for group, folders in runs.items():
        results = [json.loads((Path(folder) / "all_results.json").read_text()) for folder in folders]
        groups[group] = {metric: summary([r[metric] for r in results]) for metric in metrics if metric in results[0]}
    return groups


def plot(groups, path, title):
    metrics = [m for m in METRICS if any(m in g for g in groups.values())]
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 4), squeeze=False)
    names = list(groups)
    for axis, metric in zip(axes[0], metrics):
        for position, name in enumerate(names):
            if metric not in groups[name]:
                continue
            stats = groups[name][metric]
            axis.bar(position, stats["mean"], yerr=stats["sem"], color="lightsteelblue", capsize=4)
            axis.plot([position] * len(stats["values"]), stats["values"], "o", color="black", markersize=4)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_title(metric.removeprefix("eval_"), fontsize=9)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="GROUP=OUTPUT_DIR (a group repeated once per seed)")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix for the .json and .png")
    parser.add_argument("--title", default="runs by group: points per seed, bars mean ± standard error")
    args = parser.parse_args()
    run = provenance.begin(args)
    runs = group_runs(args.runs)
    groups = summarise(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"groups": groups, "runs": runs}, indent=2))
    plot(groups, args.out.with_suffix(".png"), args.title)
    provenance.record(args.out.parent, run, outputs=[args.out.with_suffix(".json"), args.out.with_suffix(".png")])
    print(json.dumps(groups, indent=2))


if __name__ == "__main__":
    main()

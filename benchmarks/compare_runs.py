"""Training-loss curves and final metrics of several `train.py` output folders, side by side (JSON + PNG).

    python benchmarks/compare_runs.py NAME=OUTPUT_DIR [NAME=OUTPUT_DIR ...] --out benchmarks/results/STUDY/NAME

Reads each folder's `trainer_state.json` (the loss logged every `logging_steps`, and the main metric of each
evaluation during training, `--eval_strategy steps`) and `all_results.json`, writes OUT.json ({name: {"loss":
[[step, loss], ...], "evaluations": [[step, metric], ...], "results": {...}}}) and OUT.png (the loss curves on a log
scale, each labelled with its final main metric, and beside them the metric over the steps when a run evaluated),
and records the commit, command and arguments in the folder's provenance.json (benchmarks/provenance.py).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import provenance

MAIN_METRICS = ("eval_vqa_accuracy", "eval_nlvr2_accuracy", "eval_r_mean")


def read_run(folder: Path) -> dict:
    state = json.loads((folder / "trainer_state.json").read_text())
    results = json.loads((folder / "all_results.json").read_text())
    history = state["log_history"]
    loss = [[entry["step"], entry["loss"]] for entry in history if "loss" in entry and "step" in entry]
    metric = next((m for m in MAIN_METRICS if m in results), None)
    evaluations = [[entry["step"], entry[metric]] for entry in history if metric in entry and "step" in entry]
    return {"loss": loss, "evaluations": evaluations, "results": results}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=OUTPUT_DIR")
    parser.add_argument("--out", type=Path, required=True, help="path without suffix for the .json and .png")
    parser.add_argument("--title", default="training loss")
    args = parser.parse_args()
    run = provenance.begin(args)
    runs = {}
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        runs[name] = read_run(Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=2))
    evaluated = any(len(run["evaluations"]) > 1 for run in runs.values())
    figure, axes = plt.subplots(1, 2 if evaluated else 1, figsize=(13 if evaluated else 7, 4.5), squeeze=False)
    axis = axes[0, 0]
    for name, run in runs.items():
        metric = next((m for m in MAIN_METRICS if m in run["results"]), None)
        label = name if metric is None else f"{name}: {metric.removeprefix('eval_')} {run['results'][metric]:.2f}"
        (line,) = axis.plot(*zip(*run["loss"]), label=label)
        if evaluated and run["evaluations"]:
            axes[0, 1].plot(*zip(*run["evaluations"]), marker="o", color=line.get_color(), label=name)
    axis.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title=args.title)
    axis.legend(fontsize=8)
    if evaluated:
        axes[0, 1].set(xlabel="optimizer step", ylabel="evaluation metric (main)", title="evaluated during training")
        axes[0, 1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=110)
    plt.close(figure)
    provenance.record(args.out.parent, run, outputs=[args.out.with_suffix(".json"), args.out.with_suffix(".png")])
    print(
        json.dumps(
            {
                name: {k: v for k, v in run["results"].items() if k.startswith(("eval_vqa", "train_runtime"))}
                for name, run in runs.items()
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

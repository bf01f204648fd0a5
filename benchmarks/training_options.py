"""Do the robustness / low-data training options help here? baseline, MAD, MASD and WiSE-FT side by side; prints JSON.

Every model is `train.py` with the run config (default: the embedded default, configuration/easy_vqa.yaml) cut to
`--steps` optimizer steps, on `--fractions` of the training split (`--train_fraction`: the same rows for every seed
and option), for each of `--seeds`:
- baseline: the recipe as it is;
- mad: + multimodal adaptive distillation (`--mad_weight`; the embedded default's vision encoder is trained from
  scratch, so only its pretrained text encoder teaches);
- masd: + modality-augmented self-distillation (`--masd_weight`);
- wise_ft_<alpha>: the baseline's weights interpolated with the initial pretrained backbones at each of
  `--wise-ft-alphas` (modeling_vkood/training/wise_ft.py; no extra training: the same as `train.py --wise_ft_alpha`).
Each is evaluated on `--test-samples` test questions, clean and under the missing-modality conditions of
benchmarks/robustness.py (image missing or noised, question missing / shortened / words dropped, knowledge missing
or half irrelevant), reported as accuracy, relative robustness (accuracy kept) and effective robustness (above the
baseline runs' clean-vs-condition trend), with the training cost in seconds per step. An option that needs a
pretrained backbone (MAD, WiSE-FT) is reported as not applicable on a config without one (knowledge_vqa.yaml).

    python benchmarks/training_options.py   # easy-VQA, 2 fractions x 2 seeds: 12 runs of 120 steps, 16 models x 8 evals
    python benchmarks/training_options.py --config configuration/knowledge_vqa.yaml --steps 1500 --warmup-steps 30 \
        --options baseline masd \
        --out benchmarks/results/training_options_knowledge_vqa/training_options_knowledge_vqa.json   # its schedule
    python benchmarks/training_options.py --steps 2 --test-samples 16 --seeds 0 --fractions 0.1   # smoke test

Writes benchmarks/results/training_options/training_options.json (or `--out`) and a .png beside it, and records the
commit, command and arguments in that folder's provenance.json (benchmarks/provenance.py); the models go to
outputs/<out name>_runs/. Finished runs are reused when the study is rerun with the same arguments (the `train.py`
argv is the key).
"""

import argparse
import json
import sys
import time
from pathlib import Path

# This folder holds benchmarks/datasets.py, which would shadow the `datasets` library when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import robustness  # noqa: E402

import train  # noqa: E402
from benchmarks import provenance
from modeling_vkood.knowledge import KnowledgeBase  # noqa: E402
from modeling_vkood.training import build_model, load_splits, parse_arguments  # noqa: E402
from modeling_vkood.training.model_factory import max_knowledge_items  # noqa: E402
from modeling_vkood.training.wise_ft import pretrained_state, wise_ft  # noqa: E402

OPTIONS = ("baseline", "mad", "masd", "wise_ft")


def log(message):
    print(message, file=sys.stderr, flush=True)


def run_argv(args, option, fraction, seed, output) -> list[str]:
    argv = [
        str(args.config),
        "--output_dir",
        str(output),
        "--max_steps",
        str(args.steps),
        "--seed",
        str(seed),
        "--train_fraction",
        str(fraction),
        "--do_eval",
        "false",
        "--save_strategy",
        "no",
        "--warmup_steps",
        str(args.warmup_steps or max(1, args.steps // 10)),
        "--logging_steps",
        str(max(1, args.steps // 10)),
        "--disable_tqdm",
        "true",
    ]
    if option == "mad":
        argv += ["--mad_weight", str(args.mad_weight)]
    elif option == "masd":
        argv += ["--masd_weight", str(args.masd_weight)]
    return argv


def train_once(args, option, fraction, seed) -> tuple[Path, list[str], float]:
    """(model folder, argv, seconds per optimizer step) of one run, reused when its record matches."""
    trained_as = "baseline" if option.startswith("wise_ft") else option
    output = REPO_ROOT / "outputs" / f"{args.out.stem}_runs" / f"{trained_as}-f{fraction}-s{seed}"
    argv = run_argv(args, trained_as, fraction, seed, output)
    record = output / "benchmark_run.json"
    if record.exists() and json.loads(record.read_text())["argv"] == argv:
        return output, argv, json.loads(record.read_text())["seconds_per_step"]
    metrics = train.main(argv)
    seconds_per_step = metrics["train_runtime"] / args.steps
    record.write_text(json.dumps({"argv": argv, "seconds_per_step": seconds_per_step}))
    return output, argv, seconds_per_step


def has_pretrained_backbone(args) -> bool:
    model_args = parse_arguments([str(args.config)])[0]
    return model_args.init_from is not None or bool(model_args.vision_model or model_args.text_model)


def evaluator_for(args, folder, argv, alpha=None):
    """The robustness Evaluator of a trained run; with `alpha`, of its WiSE-FT interpolation."""
    evaluator = robustness.Evaluator(folder, args.batch_size)
    if alpha is not None:
        # theta_0: the run's pretrained backbones as built before training (same config, same files)
        built = build_model(parse_arguments(argv)[0], "vqa", evaluator.model.config.id2label)
        wise_ft(evaluator.model, alpha, pretrained_state(built.model))
    return evaluator


def test_splits(args):
    """The run's test split (as train.py loads it), `--test-samples` of it, and the same with half its knowledge
    items replaced by irrelevant ones."""
    model_args, data_args = parse_arguments([str(args.config)])[:2]
    test = load_splits(data_args, [data_args.eval_split], max_knowledge_items(model_args))[data_args.eval_split]
    test = test.shuffle(seed=0).select(range(min(args.test_samples, len(test))))
    noisy = robustness.inject_noise(test, 0.5, robustness.irrelevant_pool(KnowledgeBase.starter()), seed=1)
    return test, noisy


def summarise(runs: list[dict]) -> dict:
    """Per option and fraction: the mean and range over the seeds of every measure."""
    summary = {}
    for run in runs:
        if "accuracies" not in run:
            continue
        key = f"{run['option']}@{run['fraction']}"
        summary.setdefault(key, []).append(run)
    result = {}
    for key, group in summary.items():
        row = {"seeds": len(group), "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in group]))}
        for measure in ("accuracies", "relative_robustness", "effective_robustness"):
            row[measure] = {}
            for name in group[0][measure]:
                values = [r[measure][name] for r in group if r[measure][name] is not None]
                row[measure][name] = (
                    {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}
                    if values
                    else None
                )
        result[key] = row
    return result


def plot(summary: dict, runs: list[dict], options, fractions, path: Path):
    """Bars: the mean over the seeds of the clean accuracy and of the mean relative robustness; dots: each seed."""
    figure, (accuracy_axis, robustness_axis) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(options)
    for index, option in enumerate(options):
        rows = [summary.get(f"{option}@{fraction}") for fraction in fractions]
        positions = np.arange(len(fractions)) + index * width
        accuracy = [row["accuracies"]["clean"]["mean"] if row else np.nan for row in rows]
        kept = [
            np.mean([v["mean"] for v in row["relative_robustness"].values() if v]) if row else np.nan for row in rows
        ]
        accuracy_axis.bar(positions, accuracy, width, label=option)
        robustness_axis.bar(positions, kept, width, label=option)
        for position, fraction in zip(positions, fractions):
            seeds = [
                run for run in runs if run["option"] == option and run["fraction"] == fraction and "accuracies" in run
            ]
            accuracy_axis.plot([position] * len(seeds), [run["accuracies"]["clean"] for run in seeds], "k.")
            robustness_axis.plot(
                [position] * len(seeds),
                [np.mean([v for v in run["relative_robustness"].values() if v is not None]) for run in seeds],
                "k.",
            )
    for axis, label in ((accuracy_axis, "clean test accuracy (%)"), (robustness_axis, "relative robustness (mean)")):
        axis.set_xticks(np.arange(len(fractions)) + 0.4 - width / 2, [f"{int(f * 100)}% data" for f in fractions])
        axis.set_ylabel(label)
    robustness_axis.set_title("accuracy kept under the missing-modality conditions (dots: seeds)", fontsize=9)
    accuracy_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configuration" / "easy_vqa.yaml")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run (the study's scale)")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="warm-up steps of every run (default: a tenth of --steps)"
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--mad-weight", type=float, default=1.0)
    parser.add_argument("--masd-weight", type=float, default=1.0)
    parser.add_argument("--wise-ft-alphas", type=float, nargs="+", default=[0.5])
    parser.add_argument("--test-samples", type=int, default=500, help="each is evaluated 8 times per model")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results" / "training_options" / "training_options.json",
    )
    args = parser.parse_args()
    run = provenance.begin(args)
    if "wise_ft" in args.options and "baseline" not in args.options:
        parser.error("wise_ft interpolates the baseline runs: keep baseline in --options")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pretrained = has_pretrained_backbone(args)
    test, noisy = test_splits(args)
    recipe = yaml.safe_load(args.config.read_text())
    # wise_ft expands into one entry per alpha, each an interpolation of that fraction and seed's baseline run
    options = [
        name
        for option in args.options
        for name in ([f"wise_ft_{alpha}" for alpha in args.wise_ft_alphas] if option == "wise_ft" else [option])
    ]
    grid = [(fraction, seed, option) for fraction in args.fractions for seed in args.seeds for option in options]
    runs = []
    for number, (fraction, seed, option) in enumerate(grid, 1):
        run = {"option": option, "fraction": fraction, "seed": seed}
        wise = option.startswith("wise_ft")
        if (option == "mad" or wise) and not pretrained:
            run["not_applicable"] = f"{args.config.name} has no pretrained backbone to distil from / interpolate toward"
            runs.append(run)
            log(f"[{number}/{len(grid)}] {option} fraction {fraction} seed {seed}: not applicable")
            continue
        folder, argv, seconds_per_step = train_once(args, option, fraction, seed)
        evaluator = evaluator_for(args, folder, argv, float(option.rsplit("_", 1)[1]) if wise else None)
        run.update(seconds_per_step=seconds_per_step, accuracies=robustness.modality_accuracies(evaluator, test, noisy))
        run["relative_robustness"] = robustness.relative_robustness(run["accuracies"])
        runs.append(run)
        log(
            f"[{number}/{len(grid)}] {option} fraction {fraction} seed {seed}: clean {run['accuracies']['clean']:.2f}%,"
            f" {seconds_per_step:.2f} s/step ({time.perf_counter() - started:.0f} s so far)"
        )
    baseline_points = [run["accuracies"] for run in runs if run["option"] == "baseline" and "accuracies" in run]
    for run in runs:
        if "accuracies" in run:
            run["effective_robustness"] = robustness.effective_robustness(run["accuracies"], baseline_points)
    summary = summarise(runs)
    results = {
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "test_rows": len(test),
            "recipe_batch_size": recipe.get("per_device_train_batch_size"),
        },
        "measures": {
            "accuracies": "VQA accuracy (%) on the clean test subset and under each condition",
            "relative_robustness": "accuracy(condition) / accuracy(clean)",
            "effective_robustness": "accuracy(condition) minus the baseline runs' linear clean-vs-condition trend",
            "seconds_per_step": "train_runtime / steps of the run, start-up included (OOD calibration, first image "
            "decodes); WiSE-FT adds no training: its baseline run's",
        },
        "runs": runs,
        "summary": summary,
        "seconds": time.perf_counter() - started,
    }
    args.out.write_text(json.dumps(results, indent=2))
    plot(summary, runs, options, args.fractions, args.out.with_suffix(".png"))
    provenance.record(args.out.parent, run, outputs=[args.out, args.out.with_suffix(".png")])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

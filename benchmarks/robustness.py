"""Does the implicit OOD layer make VK-OOD robust to irrelevant knowledge? Measured on easy-VQA; JSON and PNGs.

A share (0/25/50/75%) of each example's knowledge items is replaced by irrelevant items about COCO objects from the
starter graph. Reported, side by side in one run:
- `ood_auroc`: how well the layer's scores separate injected items from the original ones (test set, 50% noise);
- accuracy at each noise rate for models trained the same way at that rate: OOD layer on, OOD layer off (gate
  fixed to 1, knowledge kept), no knowledge, and (optional) the OOD layer with the cross-modal alignment loss;
- test-time noise only: the models trained clean, evaluated at each noise rate;
- modality robustness of the clean OOD model (`modality_accuracies`, the missing-modality framework of McKinzie et
  al.): image missing (black) or noised, question missing, shortened (first half) or with half its words dropped,
  knowledge missing or half irrelevant; and its relative robustness (accuracy kept under each condition);
- a learning curve with and without knowledge at 10/25/50/100% of the training subset.

    python benchmarks/robustness.py     # every model at the easy-VQA recipe's full budget
    python benchmarks/robustness.py --max-steps 200 --test-samples 1000 --train-noise-rates 0 0.5 --fractions 0.25
                                        # the study of benchmarks/README.md

Every model is trained by train.py with the default recipe (configuration/easy_vqa.yaml: its batch size and, unless
--max-steps says otherwise, its step budget); learning-curve runs keep the budget and shrink the data (sample
efficiency, the paper's "fewer samples" claim). Finished models are reused when the study is rerun with the same
settings. Writes robustness.json and the PNGs to benchmarks/results/robustness/ (or `--out`; the models under its
runs/) and records the commit, command and arguments in that folder's provenance.json (benchmarks/provenance.py).
"""

import argparse
import json
import sys
import time
from pathlib import Path

# This folder holds benchmarks/datasets.py, which would shadow the `datasets` library when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import datasets  # noqa: E402
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train  # noqa: E402
from benchmarks import provenance
from data_scripts import easy_vqa  # noqa: E402
from modeling_vkood.evaluation import vqa_accuracy  # noqa: E402
from modeling_vkood.knowledge import KnowledgeBase  # noqa: E402
from modeling_vkood.training import PixelCache  # noqa: E402

NOISE_RATES = (0.0, 0.25, 0.5, 0.75)
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
COCO_OBJECTS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard kite skateboard surfboard bottle cup fork knife spoon bowl banana apple sandwich orange broccoli "
    "carrot pizza donut cake chair couch bed toilet laptop mouse remote keyboard oven toaster sink refrigerator book "
    "clock vase scissors toothbrush"
).split()
CONFIG = REPO_ROOT / "configuration" / "easy_vqa.yaml"


def irrelevant_pool(kb):
    """Knowledge about COCO objects: true facts, but about nothing an easy-VQA image shows."""
    items = {item.text: item.to_dict() for name in COCO_OBJECTS for item in kb.retrieve(name, max_items=8)}
    return [items[text] for text in sorted(items)]


def inject_noise(split, rate, pool, seed):
    """Replace round(rate * n) of each row's n items by pool items (seeded per question); flag the injected ones."""

    def replace(row):
        rng = np.random.default_rng([seed, int(rate * 100), row["question_id"]])
        knowledge = list(row["knowledge"])
        injected = [False] * len(knowledge)
        for position in rng.choice(len(knowledge), int(round(rate * len(knowledge))), replace=False):
            knowledge[position] = pool[rng.integers(len(pool))]
            injected[position] = True
        return {"knowledge": knowledge, "injected": injected}

    return split.map(replace, desc=f"noise {rate:.0%}")


def without_knowledge(split):
    return split.map(lambda row: {"knowledge": [], "injected": []}, desc="no knowledge")


def write_dataset(train_split, test_split, folder):
    for name, split in (("train", train_split), ("test", test_split)):
        split.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    return str(folder)


def train_model(name, train_split, test_split, overrides, args, work):
    """One run of train.py (the default recipe) on a prepared dataset; returns the model folder. `overrides`: the
    model's {"ood_config": ImplicitOODConfig settings, "arguments": extra train.py arguments}.

    A finished run is reused only when it was trained with the same arguments (the study can be resumed, and a
    changed budget or recipe retrains)."""
    folder = work / name
    output = folder / "model"
    recipe = yaml.safe_load(CONFIG.read_text())
    vkood_config = dict(recipe["vkood_config"])
    vkood_config["ood_config"] = {**vkood_config.get("ood_config", {}), **overrides.get("ood_config", {})}
    max_steps = args.max_steps or recipe["max_steps"]
    argv = [
        str(CONFIG),
        "--dataset",
        str(folder / "dataset"),
        "--eval_split",
        "test",
        "--output_dir",
        str(output),
        "--max_steps",
        str(max_steps),
        "--do_eval",
        "false",
        "--save_strategy",
        "no",
        "--vkood_config",
        json.dumps(vkood_config),
        "--seed",
        str(args.seed),
        "--warmup_steps",
        str(max_steps // 10),
        "--per_device_train_batch_size",
        str(args.train_batch_size or recipe["per_device_train_batch_size"]),
        *overrides.get("arguments", []),
    ]
    fingerprint = {"argv": argv, "train_rows": len(train_split), "recipe": recipe}
    record = folder / "run.json"
    if (output / "config.json").exists() and record.exists() and json.loads(record.read_text()) == fingerprint:
        return output
    write_dataset(train_split, test_split, folder / "dataset")
    train.main(argv)
    record.write_text(json.dumps(fingerprint))
    return output


class Evaluator:
    """Accuracy and per-item OOD scores of a saved model on a test split, with optional input corruptions."""

    def __init__(self, model_folder, batch_size):
        self.model = AutoModelForVisualQuestionAnswering.from_pretrained(model_folder).eval()
        self.processor = AutoProcessor.from_pretrained(model_folder)
        self.pixels = PixelCache(self.processor, capacity=10_000)
        self.batch_size = batch_size
        self.id2label = self.model.config.id2label

    @torch.no_grad()
    def __call__(self, split, corruption=None, seed=0):
        rng = np.random.default_rng(seed)
        predictions, references, scores, injected = [], [], [], []
        for start in range(0, len(split), self.batch_size):
            rows = split[start : start + self.batch_size]
            questions = rows["question"]
            if corruption == "drop_words":
                questions = [" ".join(w for w in q.split() if rng.random() >= 0.5) for q in questions]
            elif corruption == "shorten_question":
                questions = [" ".join(q.split()[: (len(q.split()) + 1) // 2]) for q in questions]
            elif corruption == "no_question":
                questions = ["" for _ in questions]
            knowledge = [[] for _ in questions] if corruption == "no_knowledge" else rows["knowledge"]
            batch = dict(self.processor(text=questions, knowledge=knowledge))
            pixel_values = self.pixels(rows["image"])
            if corruption == "blank_image":
                pixel_values = self.pixels([Image.new("RGB", (64, 64))]).expand_as(pixel_values)
            elif corruption == "noise_image":
                pixel_values = pixel_values + torch.from_numpy(rng.normal(0, 1.0, pixel_values.shape)).float()
            outputs = self.model(pixel_values=pixel_values, **batch)
            predictions += [self.id2label[i] for i in outputs.logits.argmax(-1).tolist()]
            references += rows["answers"]
            if "knowledge_mask" in batch and batch["knowledge_mask"].numel():
                mask = batch["knowledge_mask"].bool()
                scores.append(outputs.ood_scores[mask])
                flags = torch.zeros_like(mask)
                for row, row_flags in enumerate(rows.get("injected") or [[] for _ in questions]):
                    flags[row, : len(row_flags)] = torch.tensor(row_flags, dtype=torch.bool)[: mask.shape[1]]
                injected.append(flags[mask])
        accuracy = vqa_accuracy(predictions, references)["overall"]
        scores = torch.cat(scores).numpy() if scores else np.zeros(0)
        injected = torch.cat(injected).numpy() if injected else np.zeros(0, dtype=bool)
        return accuracy, scores, injected


# The modality conditions of the missing-modality framework (McKinzie et al., "On Robustness in Multimodal
# Learning"), as `Evaluator` corruptions: a modality missing at test time, or degraded (noised, shortened).
MODALITY_CONDITIONS = {
    "missing_image": "blank_image",  # a black image
    "noisy_image": "noise_image",  # N(0, 1) added to the normalised pixels
    "missing_question": "no_question",  # the empty string
    "shortened_question": "shorten_question",  # its first half of the words
    "dropped_words": "drop_words",  # each word dropped with probability 1/2
    "missing_knowledge": "no_knowledge",  # no item
}


def modality_accuracies(evaluator, test_split, noisy_knowledge_split=None, seed=0) -> dict[str, float]:
    """Accuracy on the clean test split and under each of MODALITY_CONDITIONS; with `noisy_knowledge_split` (the test
    split with irrelevant items injected, `inject_noise`) also "noisy_knowledge"."""
    accuracies = {"clean": evaluator(test_split, seed=seed)[0]}
    accuracies.update(
        {name: evaluator(test_split, corruption, seed=seed)[0] for name, corruption in MODALITY_CONDITIONS.items()}
    )
    if noisy_knowledge_split is not None:
        accuracies["noisy_knowledge"] = evaluator(noisy_knowledge_split, seed=seed)[0]
    return accuracies


def relative_robustness(accuracies: dict[str, float]) -> dict[str, float | None]:
    """Per condition, the share of the clean accuracy a model keeps: accuracy(condition) / accuracy(clean) (1: the
    condition costs nothing). The intervention studies compare it across models ("1.5-4x more robust")."""
    clean = accuracies["clean"]
    return {name: (value / clean if clean else None) for name, value in accuracies.items() if name != "clean"}


def effective_robustness(
    accuracies: dict[str, float], baseline_points: list[dict[str, float]]
) -> dict[str, float | None]:
    """Per condition, accuracy(condition) minus what the baseline models' trend predicts from the clean accuracy
    (Taori et al. 2020): a line fitted through the (clean, condition) accuracies of `baseline_points` (models trained
    without the intervention, e.g. at several data sizes and seeds). 0: as robust as the baseline trend; None with
    fewer than two distinct baseline clean accuracies."""
    cleans = np.array([point["clean"] for point in baseline_points], dtype=float)
    result = {}
    for name, value in accuracies.items():
        if name == "clean":
            continue
        if len(np.unique(cleans)) < 2:
            result[name] = None
            continue
        slope, intercept = np.polyfit(cleans, np.array([point[name] for point in baseline_points], dtype=float), 1)
        result[name] = float(value - (slope * accuracies["clean"] + intercept))
    return result


def auroc(scores, injected):
    """AUROC of `score` ranking original items above injected ones (None when one class is missing)."""
    if injected.all() or not injected.any():
        return None
    return float(roc_auc_score(~injected, scores))


def plot_noise(results, path):
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for style, (key, label) in zip(
        ("-o", "--x"), (("trained_noisy", "trained at that noise"), ("test_time_noise", "trained clean"))
    ):
        for name, row in results[key].items():
            rates = [rate for rate in NOISE_RATES if str(rate) in row]
            axis.plot([int(r * 100) for r in rates], [row[str(r)] for r in rates], style, label=f"{name} ({label})")
    axis.set(xlabel="irrelevant knowledge items (%)", ylabel="easy-VQA test accuracy (%)", title="Knowledge noise")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_scores(scores, injected, path):
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(scores.min(), scores.max(), 50) if len(scores) else 10
    axis.hist(scores[~injected], bins=bins, alpha=0.6, label="original items")
    axis.hist(scores[injected], bins=bins, alpha=0.6, label="injected COCO items")
    axis.set(xlabel="standardised GEM score", ylabel="items", title="OOD scores at 50% knowledge noise")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_learning_curve(curve, path):
    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    for name, row in curve.items():
        fractions = sorted(float(f) for f in row)
        axis.plot([int(f * 100) for f in fractions], [row[str(f)] for f in fractions], marker="o", label=name)
    axis.set(xlabel="training data (%)", ylabel="easy-VQA test accuracy (%)", title="Learning curve")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=None, help="training steps per model (default: the recipe's)")
    parser.add_argument("--train-samples", type=int, default=None, help="default: the whole training split")
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--train-noise-rates", type=float, nargs="+", default=list(NOISE_RATES))
    parser.add_argument("--alignment-weight", type=float, default=1.0, help="0: skip the alignment-loss row")
    parser.add_argument("--learning-curve", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--train-batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=list(FRACTIONS[:-1]),
        help="learning-curve shares of the training subset below 100%%",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "robustness")
    args = parser.parse_args()
    run = provenance.begin(args)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "runs"
    started = time.perf_counter()
    datasets.disable_caching()

    kb = KnowledgeBase.starter()
    built = easy_vqa.build(None, None, knowledge=kb, max_knowledge_items=8).dataset
    train_clean = built["train"].shuffle(seed=args.seed)
    train_clean = train_clean.select(range(min(args.train_samples or len(train_clean), len(train_clean))))
    test_clean = built["test"].shuffle(seed=args.seed).select(range(min(args.test_samples, len(built["test"]))))
    test_clean = test_clean.cast_column("image", datasets.Image(decode=False))  # undecoded: the PixelCache keys by path
    pool = irrelevant_pool(kb)
    noisy_test = {rate: inject_noise(test_clean, rate, pool, args.seed + 1) for rate in NOISE_RATES}
    models = {"ood_on": {}, "ood_off": {"ood_config": {"use_gate": False}}}
    if args.alignment_weight > 0:
        alignment = ["--ood_alignment", "mean_direction", "--ood_alignment_weight", str(args.alignment_weight)]
        models["ood_on+alignment"] = {"arguments": alignment}

    results = {
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "pool_items": len(pool),
            "train_rows": len(train_clean),
            "test_rows": len(test_clean),
        },
        "trained_noisy": {},
        "test_time_noise": {},
        "ood_auroc": {},
    }
    evaluators = {}
    for name, overrides in tqdm(models.items(), desc="models"):
        results["trained_noisy"][name] = {}
        for rate in args.train_noise_rates:
            folder = train_model(
                f"{name}-train{int(rate * 100)}",
                inject_noise(train_clean, rate, pool, args.seed),
                noisy_test[rate],
                overrides,
                args,
                work,
            )
            evaluator = Evaluator(folder, args.batch_size)
            results["trained_noisy"][name][str(rate)], scores, injected = evaluator(noisy_test[rate])
            if rate == 0.0:
                evaluators[name] = evaluator
        clean = evaluators[name]
        results["test_time_noise"][name] = {}
        for rate in NOISE_RATES:
            accuracy, scores, injected = clean(noisy_test[rate])
            results["test_time_noise"][name][str(rate)] = accuracy
            if rate == 0.5:
                results["ood_auroc"][name] = auroc(scores, injected)
                if name == "ood_on":
                    plot_scores(scores, injected, args.out / "ood_scores_50pct_noise.png")
    no_knowledge_train, no_knowledge_test = without_knowledge(train_clean), without_knowledge(test_clean)
    no_knowledge = Evaluator(
        train_model("no_knowledge", no_knowledge_train, no_knowledge_test, {}, args, work), args.batch_size
    )
    accuracy = no_knowledge(no_knowledge_test)[0]
    results["trained_noisy"]["no_knowledge"] = {str(rate): accuracy for rate in NOISE_RATES}
    results["test_time_noise"]["no_knowledge"] = {str(rate): accuracy for rate in NOISE_RATES}
    plot_noise(results, args.out / "knowledge_noise.png")

    ood_on = evaluators["ood_on"]
    results["modality_robustness"] = modality_accuracies(ood_on, test_clean, noisy_test[0.5])
    results["relative_robustness"] = relative_robustness(results["modality_robustness"])
    if args.learning_curve:
        curve = {
            "with knowledge": {"1.0": results["trained_noisy"]["ood_on"]["0.0"]},
            "without knowledge": {"1.0": accuracy},
        }
        for fraction in args.fractions:
            rows = range(int(fraction * len(train_clean)))
            with_folder = train_model(f"curve-{fraction}-with", train_clean.select(rows), test_clean, {}, args, work)
            curve["with knowledge"][str(fraction)] = Evaluator(with_folder, args.batch_size)(test_clean)[0]
            without_folder = train_model(
                f"curve-{fraction}-without", no_knowledge_train.select(rows), no_knowledge_test, {}, args, work
            )
            curve["without knowledge"][str(fraction)] = Evaluator(without_folder, args.batch_size)(no_knowledge_test)[0]
        results["learning_curve"] = curve
        plot_learning_curve(curve, args.out / "learning_curve.png")
    results["seconds"] = time.perf_counter() - started
    (args.out / "robustness.json").write_text(json.dumps(results, indent=2))
    written = ["robustness.json", "ood_scores_50pct_noise.png", "knowledge_noise.png"]
    provenance.record(args.out, run, outputs=written + (["learning_curve.png"] if args.learning_curve else []))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Generative answers and SelTDA on data-scarce easy-VQA; prints JSON, writes benchmarks/results/seltda/seltda.json.

Per seed, every model trained by train.py with the shipped recipes (configuration/easy_vqa.yaml for the classifier,
configuration/easy_vqa_generative.yaml for the generative head) under one step budget:
- `classifier_100` / `generative_100`: every training question;
- `classifier_5` / `generative_5`: the questions of 5% of the training images (`--labelled_fraction`), the other
  images unlabelled;
- SelTDA: `teacher_5` (the generative head trained on the same 5% as a question-answer generator for the image
  alone), which pseudo-labels the unlabelled images (`python -m modeling_vkood.training.seltda`); then
  `generative_5_seltda` and `classifier_5_seltda`: the 5% runs again with the pseudo-labelled questions added.
  The pseudo-labels' precision is checked against the pool images' hidden human answers, where the teacher wrote a
  question that easy-VQA asks of that image.
`--heads` picks the target heads (the teacher is always generative); `--teacher-steps` trains the teacher longer;
`--min-answer-probability P` also pseudo-labels the same draws keeping only the answers the teacher gives at least P
(`*_seltda_confident`).
Finished runs (those with their model card) are reused when the study is rerun with the same work folder. Each
target model is scored (official VQA accuracy; generated answers for the generative head) on the test
questions and on `rephrased` test questions: a deterministic paraphrase of each of easy-VQA's question templates
that keeps the answer (`rephrase`), with knowledge retrieved for the new wording.

    python benchmarks/seltda.py                 # the measurement: 2 seeds, 150 steps a model, the whole pool
    python benchmarks/seltda.py --steps 100 --pool-images 1000   # a smaller budget
    python benchmarks/seltda.py --steps 300 --teacher-steps 600 --heads classifier --pool-images 1000 \
        --min-answer-probability 0.9 --work-dir outputs/seltda_teacher \
        --out benchmarks/results/seltda_teacher/seltda_teacher.json   # a stronger teacher, with and without the filter
    python benchmarks/seltda.py --quick         # a smoke run: a few steps and examples, to check the pipeline
                                                # (its 2-step teacher writes no usable pair: no SelTDA runs)

Writes the JSON (`--out`) and a .png beside it, and records the commit, command and arguments in that folder's
provenance.json (benchmarks/provenance.py).
"""

import argparse
import functools
import json
import re
import statistics
import sys
import time
from pathlib import Path

# This folder holds benchmarks/datasets.py, which would shadow the `datasets` library when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from datasets import DatasetDict, load_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train  # noqa: E402
from benchmarks import provenance
from data_scripts.__main__ import write_parquet  # noqa: E402
from data_scripts.common import KnowledgeAnnotator, open_knowledge  # noqa: E402
from modeling_vkood.training import load_splits, seltda  # noqa: E402
from modeling_vkood.training.arguments import DataArguments  # noqa: E402

CONFIGS = {"classifier": "configuration/easy_vqa.yaml", "generative": "configuration/easy_vqa_generative.yaml"}
MAX_KNOWLEDGE_ITEMS = 8  # the shipped configs'
# easy-VQA's 24 question templates (X: a colour + "shape", or a shape), each reworded without changing what it asks.
PARAPHRASES = (
    (r"is there not an? (?P<x>.+) in the image\?", "is the picture without a {x}?"),
    (r"is there not an? (?P<x>.+)\?", "is a {x} absent?"),
    (r"is there an? (?P<x>.+) in the image\?", "can you see a {x} in the picture?"),
    (r"is there an? (?P<x>.+)\?", "can you see a {x}?"),
    (r"is no (?P<x>.+) present\?", "is it true that no {x} is shown?"),
    (r"is an? (?P<x>.+) present\?", "is a {x} visible?"),
    (r"does the image not contain an? (?P<x>.+)\?", "is the picture missing a {x}?"),
    (r"does the image contain an? (?P<x>.+)\?", "does the picture show a {x}?"),
    (r"what colou?r is the (?P<x>.+)\?", "which colour does the {x} have?"),
    (r"what is the colou?r of the (?P<x>.+)\?", "which colour is the {x} painted?"),
    (r"what shape is in the image\?", "which shape is shown in the picture?"),
    (r"what shape is present\?", "which shape can be seen?"),
    (r"what shape does the image contain\?", "which shape does the picture hold?"),
    (r"what is the (?P<x>.+) shape\?", "which shape is {x}?"),
)


def rephrase(question: str) -> str:
    """The paraphrase of an easy-VQA question (the first template that matches it); a ValueError for any other."""
    for pattern, template in PARAPHRASES:
        match = re.fullmatch(pattern, question)
        if match:
            return template.format(**match.groupdict())
    raise ValueError(f"no paraphrase template matches {question!r}")


def log(message: str) -> None:
    print(f"[seltda {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_rephrased_test(folder: Path, cache_dir: str) -> Path:
    """easy-VQA's test split with every question rephrased and its knowledge retrieved anew, as a dataset folder."""
    if (folder / "data").is_dir():
        return folder
    arguments = DataArguments(
        task="vqa",
        dataset="easy_vqa",
        knowledge="starter",
        eval_split="test",
        dataset_cache_dir=cache_dir,
    )
    test = load_splits(arguments, ["test"], MAX_KNOWLEDGE_ITEMS)["test"]
    features = test.features
    test = test.map(lambda row: {"question": rephrase(row["question"])}, desc="rephrasing")
    annotate = KnowledgeAnnotator(open_knowledge("starter"), "question", MAX_KNOWLEDGE_ITEMS, several_texts=False)
    test = test.map(annotate, batched=True, features=features, desc="knowledge of the rephrased questions")
    write_parquet(DatasetDict({"test": test}), folder)
    return folder


class Study:
    """The runs of one invocation, each trained or evaluated by train.py in this process."""

    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir)
        # per head: 2 runs + a SelTDA run per labelling, each also scored on the rephrased questions; + the teacher
        labellings = 1 if args.min_answer_probability is None else 2
        self.count, self.total = 0, len(args.seeds) * (2 * (2 + labellings) * len(args.heads) + 1 + labellings)

    def common(self, seed: int, steps: int | None = None) -> list[str]:
        args = self.args
        steps = steps or args.steps
        options = [
            "--max_steps",
            str(steps),
            "--warmup_steps",
            str(round(args.warmup_fraction * steps)),
            "--seed",
            str(seed),
            "--save_strategy",
            "no",
            "--max_eval_samples",
            str(args.eval_samples),
            "--dataset_cache_dir",
            str(self.work / "datasets"),
            "--disable_tqdm",
            "true",
            "--logging_steps",
            str(max(1, steps // 10)),
        ]
        if args.batch_size:
            options += [
                "--per_device_train_batch_size",
                str(args.batch_size),
                "--per_device_eval_batch_size",
                str(args.batch_size),
            ]
        return options

    def run(self, name: str, argv: list[str]) -> dict:
        self.count += 1
        output = Path(argv[argv.index("--output_dir") + 1])
        if (output / "README.md").is_file():  # the model card is written last: a finished run, reused
            log(f"[{self.count}/{self.total}] {name}: reused {output}")
            return json.loads((output / "all_results.json").read_text())
        log(f"[{self.count}/{self.total}] {name}: python train.py {' '.join(argv)}")
        start = time.time()
        metrics = train.main(argv)
        log(
            f"[{self.count}/{self.total}] {name}: {time.time() - start:.0f} s, "
            f"accuracy {metrics.get('eval_vqa_accuracy', float('nan')):.2f}"
        )
        return metrics

    def train(self, seed: int, head: str, name: str, *extra: str, steps: int | None = None) -> tuple[dict, Path]:
        output = self.work / f"seed{seed}" / name
        argv = [CONFIGS[head], *self.common(seed, steps), "--output_dir", str(output), *extra]
        return self.run(f"seed {seed} {name}", argv), output

    @functools.cached_property
    def hidden_answers(self) -> dict[tuple[int, str], set[str]]:
        """The human answers of every training question, keyed by (image_id, question): those of the pool images are
        the labels the data-scarce runs do not see, against which the pseudo-labels are checked."""
        arguments = DataArguments(
            task="vqa",
            dataset="easy_vqa",
            knowledge="starter",
            dataset_cache_dir=str(self.work / "datasets"),
        )
        train = load_splits(arguments, ["train"], MAX_KNOWLEDGE_ITEMS)["train"]
        return {
            (image_id, question): set(answers)
            for image_id, question, answers in zip(train["image_id"], train["question"], train["answers"])
        }

    def rephrased(self, seed: int, head: str, name: str, model: Path, rephrased: Path) -> dict:
        task = "generative_vqa" if head == "generative" else "vqa"
        argv = [
            CONFIGS[head],
            *self.common(seed),
            "--task",
            task,
            "--init_from",
            str(model),
            "--vision_config",
            "none",
            "--text_model",
            "none",
            "--decoder_config",
            "none",
            "--do_train",
            "false",
            "--dataset",
            str(rephrased),
            "--eval_split",
            "test",
            "--output_dir",
            str(model / "rephrased"),
        ]
        return self.run(f"seed {seed} {name} on rephrased questions", argv)

    def pseudo_label(self, seed: int, teacher: Path, variant: str, min_answer_probability: float | None) -> Path:
        self.count += 1
        out = self.work / f"seed{seed}" / f"pseudo_labelled{variant}"
        if (out / "skip_report.json").is_file():
            log(f"[{self.count}/{self.total}] seed {seed}: reused {out}")
            return out
        argv = [
            "--teacher",
            str(teacher),
            "--labelled_fraction",
            str(self.args.fraction),
            "--out",
            str(out),
            "--dataset_cache_dir",
            str(self.work / "datasets"),
            "--max_knowledge_items",
            str(MAX_KNOWLEDGE_ITEMS),
            "--pairs_per_image",
            str(self.args.pairs_per_image),
            "--seed",
            str(seed),
        ]
        if self.args.pool_images:
            argv += ["--max_images", str(self.args.pool_images)]
        if min_answer_probability is not None:
            argv += ["--min_answer_probability", str(min_answer_probability)]
        log(f"[{self.count}/{self.total}] seed {seed}: python -m modeling_vkood.training.seltda {' '.join(argv)}")
        seltda.main(argv)
        return out

    def seed(self, seed: int, rephrased: Path) -> dict:
        fraction = ["--labelled_fraction", str(self.args.fraction)]
        results, models, labels = {}, {}, {}
        for head in self.args.heads:
            for name, extra in ((f"{head}_100", []), (f"{head}_5", fraction)):
                results[name], models[name] = self.train(seed, head, name, *extra)
        teacher_metrics, teacher = self.train(
            seed,
            "generative",
            "teacher_5",
            *fraction,
            "--generation_target",
            "question_answer",
            "--do_eval",
            "false",
            steps=self.args.teacher_steps,
        )
        # the same draws (same seed) with and without the teacher's confidence filter
        variants = {"": None}
        if self.args.min_answer_probability is not None:
            variants["_confident"] = self.args.min_answer_probability
        for variant, min_answer_probability in variants.items():
            try:
                pseudo = self.pseudo_label(seed, teacher, variant, min_answer_probability)
            except seltda.NoPseudoLabels as error:  # a teacher trained too briefly (--quick): no SelTDA runs
                log(f"seed {seed}: {error}")
                labels[f"pseudo_labels{variant}"] = {"questions": 0, "error": str(error)}
                continue
            written = load_dataset(str(pseudo), split="train", download_mode="force_redownload")
            labels[f"pseudo_labels{variant}"] = {
                "questions": len(written),  # a collapsed teacher writes one pair for every image
                "distinct_pairs": len(set(zip(written["question"], written["multiple_choice_answer"]))),
                "left_out": json.loads((pseudo / "skip_report.json").read_text())["per_reason"],
                **pseudo_label_precision(written, self.hidden_answers),
            }
            log(f"seed {seed}: pseudo-labels{variant} {labels[f'pseudo_labels{variant}']}")
            for head in self.args.heads:
                name = f"{head}_5_seltda{variant}"
                results[name], models[name] = self.train(
                    seed, head, name, *fraction, "--pseudo_labelled_dataset", str(pseudo)
                )
        summary = {name: {"test": metrics["eval_vqa_accuracy"]} for name, metrics in results.items()}
        for name, model in models.items():
            head = name.split("_")[0]
            summary[name]["rephrased"] = self.rephrased(seed, head, name, model, rephrased)["eval_vqa_accuracy"]
        summary.update(labels, teacher_train_loss=teacher_metrics.get("train_loss"))
        return summary


def pseudo_label_precision(written, hidden: dict[tuple[int, str], set[str]]) -> dict:
    """How many pseudo-labels are right: of the generated questions that easy-VQA also asks of that image (the same
    words), the share whose generated answer is one of the human answers."""
    verdicts = [
        answer in hidden[(image_id, question)]
        for image_id, question, answer in zip(
            written["image_id"], written["question"], written["multiple_choice_answer"]
        )
        if (image_id, question) in hidden
    ]
    return {
        "verifiable": len(verdicts),
        "precision": round(100 * sum(verdicts) / len(verdicts), 2) if verdicts else None,
    }


def trained_runs(per_seed: dict[int, dict]) -> list[str]:
    """The names of the models every seed trained and scored (not the pseudo-label statistics)."""
    return [
        name
        for name, value in next(iter(per_seed.values())).items()
        if isinstance(value, dict) and "test" in value and all(name in seed for seed in per_seed.values())
    ]


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean and per-seed values of every run and split, and the differences the study is about."""
    runs = trained_runs(per_seed)
    mean = {
        run: {split: statistics.mean(seed[run][split] for seed in per_seed.values()) for split in ("test", "rephrased")}
        for run in runs
    }

    def difference(a, b):
        return {
            split: [round(seed[a][split] - seed[b][split], 2) for seed in per_seed.values()]
            for split in ("test", "rephrased")
        }

    pairs = {
        "generative_minus_classifier_5": ("generative_5", "classifier_5"),
        "generative_minus_classifier_100": ("generative_100", "classifier_100"),
        "seltda_gain_generative_5": ("generative_5_seltda", "generative_5"),
        "seltda_gain_classifier_5": ("classifier_5_seltda", "classifier_5"),
        "seltda_confident_gain_generative_5": ("generative_5_seltda_confident", "generative_5"),
        "seltda_confident_gain_classifier_5": ("classifier_5_seltda_confident", "classifier_5"),
    }
    return {
        "mean_accuracy": {run: {k: round(v, 2) for k, v in values.items()} for run, values in mean.items()},
        "per_seed_differences": {name: difference(a, b) for name, (a, b) in pairs.items() if a in runs and b in runs},
    }


def plot(per_seed: dict[int, dict], path: Path) -> None:
    runs = trained_runs(per_seed)
    figure, axis = plt.subplots(figsize=(11, 4))
    width = 0.38
    for offset, split in ((-width / 2, "test"), (width / 2, "rephrased")):
        values = [[seed[run][split] for seed in per_seed.values()] for run in runs]
        positions = [index + offset for index in range(len(runs))]
        axis.bar(positions, [statistics.mean(v) for v in values], width, label=f"{split} questions")
        for position, seeds in zip(positions, values):
            axis.plot([position] * len(seeds), seeds, "k.", markersize=5)
    axis.set_xticks(range(len(runs)), [run.replace("_", "\n") for run in runs])
    axis.set(ylabel="VQA accuracy (%)", title=f"easy-VQA, data-scarce and SelTDA ({len(per_seed)} seeds; dots: seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every trained model")
    parser.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.1,
        help="warm-up as a share of --steps (the configs' 50 steps are half of a 100-step run)",
    )
    parser.add_argument("--teacher-steps", type=int, help="optimizer steps of the teacher (default: --steps)")
    parser.add_argument(
        "--min-answer-probability",
        type=float,
        help="also pseudo-label with this confidence filter and train each head on that set",
    )
    parser.add_argument(
        "--heads",
        nargs="+",
        default=["classifier", "generative"],
        choices=sorted(CONFIGS),
        help="the target models trained with and without SelTDA (the teacher is generative)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fraction", type=float, default=0.05, help="labelled share of the training images")
    parser.add_argument("--eval-samples", type=int, default=1000, help="test questions scored (both wordings)")
    parser.add_argument("--pairs-per-image", type=int, default=1, help="pseudo-labels per unlabelled image")
    parser.add_argument("--pool-images", type=int, help="pseudo-label at most this many unlabelled images")
    parser.add_argument("--batch-size", type=int, help="per-device batch size (default: the configs')")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps, 16 questions, 8 pool images")
    parser.add_argument("--work-dir", default="outputs/seltda_study")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "seltda" / "seltda.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_samples, args.pool_images, args.batch_size = 2, 16, 8, 8
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = provenance.begin(args, None if argv is None else [__file__, *argv])
    study = Study(args)
    rephrased = write_rephrased_test(study.work / "easy_vqa_rephrased", str(study.work / "datasets"))
    per_seed = {seed: study.seed(seed, rephrased) for seed in args.seeds}
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "per_seed": per_seed,
        **aggregate(per_seed),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(per_seed, out.with_suffix(".png"))
    provenance.record(out.parent, run, outputs=[out, out.with_suffix(".png")])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

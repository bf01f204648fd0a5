"""Does the OOD layer keep the knowledge that fits the image and drop the rest? Measured on knowledge-VQA.

knowledge-VQA (`data_scripts/knowledge_vqa.py`): every answer is stated only in one of the row's 11 candidate facts
(the facts change from row to row), 2 of which are about what the image shows. Each model is trained by train.py
(configuration/knowledge_vqa.yaml, a short CPU budget) on the candidates as retrieved, and measured on held-out
test questions:

- `auroc`: per question, how well the layer's scores rank its fitting items above its not-fitting ones (the mean
  over questions of the within-question AUROC; `auroc_pooled` pools all items);
- `accuracy` with 0/25/50/75% not-fitting items (both fitting items kept, not-fitting ones drawn to make that
  share; at 25% the count is drawn so that the expected share is 25%) and `as_retrieved` (all 11, 82%);
- `kept_fraction` (gate > 0.5) of fitting and of not-fitting items, on the candidates as retrieved;
- a learning curve at 10/25/50/100% of the training questions (same step budget) with the layer and without it.

Models: `ood` (recommended: the recipe's mixture log-likelihood, trained by the "gate" alignment on the items that
state the training answer), `ood_paper` (the paper's layer: GEM, no alignment), `gate_off` (gate fixed to 1:
attention alone selects), `no_knowledge`, `gold_fact` (only the answering fact, the ceiling), `fitting_only` (the
two fitting items, gate off: what a perfect hard gate would give the fusion) and `blank_image` (the recipe with
every image replaced by a white one: only the question and the facts), and `blip_ood` (the recommended layer and its
training in VK-OOD-BLIP, a BLIP architecture built from configs: `BLIP_VISION`, `BLIP_TEXT`; rank inference). Means
over seeds, standard errors in `*_stderr`.

    python benchmarks/knowledge_task.py      # 2 seeds in 2 parallel processes, the recipe's steps
    python benchmarks/knowledge_task.py --seeds 0 --max-steps 30 --test-samples 100   # quick look

Writes benchmarks/results/knowledge_task/ (or `--out`): knowledge_task.json (means and standard errors),
knowledge_task.png, and per_seed/seed<N>.json (each seed's figures, written by its worker process). `--extend`
reads knowledge_task.json and per_seed/*.json back as its inputs and adds the models it trains to them. Each run
records its commit, command, arguments, inputs and outputs in the folder's provenance.json (benchmarks/provenance.py;
a `--extend` part is added to the earlier parts' records).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per process: on a shared CPU, threads mostly wait
# This folder holds benchmarks/datasets.py, which would shadow the `datasets` library when run as a script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from tqdm import tqdm  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import provenance
from modeling_vkood.training.arguments import VKOODTrainingArguments  # noqa: E402

CONFIG = REPO_ROOT / "configuration" / "knowledge_vqa.yaml"
NOT_FITTING_SHARES = (0.0, 0.25, 0.5, 0.75)
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
# name -> (ImplicitOODConfig overrides of the recipe's ood_config, extra train.py arguments). The recipe
# (configuration/knowledge_vqa.yaml) is the recommended `ood`: the mixture log-likelihood (the library's default
# layer), the "gate" alignment (InfoNCE + class-balanced gate BCE on the answer-stating items, and the cross-image
# InfoNCE), and tau's own learning rate.
RECIPE = yaml.safe_load(CONFIG.read_text())
# The paper's layer: GEM, no alignment objective, tau calibrated on the first batch at the default quantile.
PAPER_LAYER = {"score": "gem"}
PAPER_TRAINING = [
    "--ood_alignment_weight",
    "0",
    "--ood_cross_image_weight",
    "0",
    "--ood_calibration_quantile",
    str(VKOODTrainingArguments.ood_calibration_quantile),
]
GATE_OFF = {**PAPER_LAYER, "use_gate": False}
# VK-OOD-BLIP (`task: blip_vqa`) built from configs and trained from scratch like the recipe's model, at a width the
# 2-core CPU trains as fast: BLIP's vision tower (64 px, 8 px patches: 64 image tokens), question encoder and answer
# decoder at width 64 (BLIP's decoder reads the question states in the vision width), the recipe's tokenizer with
# [CLS] as the decoder's start token. Its items are pooled by the question encoder and join the image tokens in its
# cross-attention, gated by the recipe's OOD layer and training; answers by BLIP's rank inference over the 16 place
# words (the dataset's answer vocabulary).
BLIP_VISION = {"model_type": "blip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 64, "patch_size": 8, "initializer_range": 0.02}  # fmt: skip
BLIP_TEXT = {"model_type": "blip_text_model", "vocab_size": 30522, "hidden_size": 64, "encoder_hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
             "bos_token_id": 101, "sep_token_id": 102, "pad_token_id": 0, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0}  # fmt: skip
BLIP_SETTINGS = {
    "max_knowledge_items": RECIPE["vkood_config"]["max_knowledge_items"],
    "knowledge_max_length": RECIPE["vkood_config"]["knowledge_max_length"],
    "inference": "rank",
}
BLIP = ["--task", "blip_vqa", "--vision_config", json.dumps(BLIP_VISION), "--text_config", json.dumps(BLIP_TEXT)]
MODELS = {
    "ood": ({}, []),
    "ood_paper": (PAPER_LAYER, [*PAPER_TRAINING, "--ood_threshold_learning_rate", "none"]),
    "gate_off": (GATE_OFF, PAPER_TRAINING),
    "no_knowledge": (PAPER_LAYER, PAPER_TRAINING),
    "gold_fact": (GATE_OFF, PAPER_TRAINING),
    "fitting_only": (GATE_OFF, PAPER_TRAINING),  # what a perfect hard gate passes on, trained gate off
    "blank_image": ({}, []),  # the recipe on a blank image: question and facts only (both modalities needed?)
    "blip_ood": ({}, BLIP),  # the recommended layer and its training in VK-OOD-BLIP
}
CURVE_MODELS = ("ood", "gate_off")


# ------------------------------------------------------------------------------------------------ test variants


def with_not_fitting_share(split, share, seed):
    """Each row keeps its fitting items and as many not-fitting ones as make `share` of its list (in expectation:
    a fractional count is rounded up with probability equal to its fraction), in a shuffled order."""

    def choose(row):
        rng = np.random.default_rng([seed, int(share * 100), row["question_id"]])
        fitting = [item for item in row["knowledge"] if item["fits_image"]]
        others = [item for item in row["knowledge"] if not item["fits_image"]]
        wanted = len(fitting) * share / (1.0 - share)
        count = min(len(others), int(wanted) + int(rng.random() < wanted - int(wanted)))
        chosen = fitting + [others[i] for i in rng.choice(len(others), count, replace=False)]
        return {"knowledge": [chosen[i] for i in rng.permutation(len(chosen))]}

    return split.map(choose, desc=f"{share:.0%} not fitting")


def gold_only(split):
    return split.map(lambda row: {"knowledge": [{**row["gold"], "fits_image": True}]}, desc="gold fact only")


def fitting_only(split):
    return split.map(
        lambda row: {"knowledge": [item for item in row["knowledge"] if item["fits_image"]]}, desc="fitting items only"
    )


def without_knowledge(split):
    return split.map(lambda row: {"knowledge": []}, desc="no knowledge")


def with_blank_images(split, path):
    """Every row's image replaced by one white 64x64 image (written to `path` once): the question and facts remain."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (64, 64), "white").save(path)
    blank = {"path": str(path), "bytes": None}
    return split.cast_column("image", datasets.Image(decode=False)).map(
        lambda row: {"image": blank}, desc="blank image"
    )


# --------------------------------------------------------------------------------------------- training, scoring


def train_model(name, train_split, model, seed, args, work):
    """One train.py run (configuration/knowledge_vqa.yaml + the `MODELS` entry `model`) on a prepared training split."""
    overrides, arguments = model
    import train

    folder = work / f"seed{seed}" / name
    # The gate-forcing schedule keeps its share of the run at another step budget.
    schedule = [
        (flag, str(round(RECIPE[key] * args.max_steps / RECIPE["max_steps"])))
        for flag, key in (
            ("--ood_gate_forcing_steps", "ood_gate_forcing_steps"),
            ("--ood_gate_handover_steps", "ood_gate_handover_steps"),
        )
    ]
    # VK-OOD-BLIP takes BLIP's settings; the recipe's vkood_config holds VK-OOD's fusion
    settings = BLIP_SETTINGS if "blip_vqa" in arguments else RECIPE["vkood_config"]
    argv = [
        str(CONFIG),
        "--dataset",
        str(folder / "dataset"),
        "--output_dir",
        str(folder / "model"),
        "--max_steps",
        str(args.max_steps),
        "--do_eval",
        "false",
        "--seed",
        str(seed),
        "--logging_steps",
        "50",
        "--vkood_config",
        json.dumps({**settings, "ood_config": {**RECIPE["vkood_config"]["ood_config"], **overrides}}),
        "--disable_tqdm",
        "true",
        *[part for pair in schedule for part in pair],
        *arguments,
    ]
    (folder / "dataset" / "data").mkdir(parents=True, exist_ok=True)
    train_split.to_parquet(str(folder / "dataset" / "data" / "train-00000-of-00001.parquet"))
    train.main(argv)
    return folder / "model"


@torch.no_grad()
def evaluate(model_folder, split, batch_size=256):
    """Accuracy (%), and per real item: OOD score, gate, fits_image, question index. A model that ranks answers
    (VK-OOD-BLIP) answers with its best candidate of its answer list (BLIP's rank inference)."""
    from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

    from modeling_vkood.evaluation import vqa_accuracy
    from modeling_vkood.training import PixelCache

    model = AutoModelForVisualQuestionAnswering.from_pretrained(model_folder).eval()
    processor = AutoProcessor.from_pretrained(model_folder)
    pixels = PixelCache(processor, capacity=10_000)
    ranks = getattr(model, "ranks_answers", False)
    candidates = processor.answer_candidates(model.config.answer_list) if ranks else None
    predictions, references, items = [], [], {"score": [], "gate": [], "fits": [], "question": []}
    for start in range(0, len(split), batch_size):
        rows = split[start : start + batch_size]
        batch = dict(processor(text=rows["question"], knowledge=rows["knowledge"]))
        if ranks:
            outputs = model.encode(pixel_values=pixels(rows["image"]), **batch)  # the OOD outputs of the items
            best = model.rank_answers(**candidates, memory=outputs)[0][:, 0]
            predictions += [model.config.answer_list[i] for i in best.tolist()]
        else:
            outputs = model(pixel_values=pixels(rows["image"]), **batch)
            predictions += [model.config.id2label[i] for i in outputs.logits.argmax(-1).tolist()]
        references += rows["answers"]
        if batch["knowledge_mask"].shape[1]:
            mask = batch["knowledge_mask"].bool()
            fits = torch.zeros_like(mask)
            for row, knowledge in enumerate(rows["knowledge"]):
                fits[row, : len(knowledge)] = torch.tensor([item["fits_image"] for item in knowledge])
            question = torch.arange(start, start + mask.shape[0])[:, None].expand_as(mask)
            for key, value in (
                ("score", outputs.ood_scores),
                ("gate", outputs.ood_gate),
                ("fits", fits),
                ("question", question),
            ):
                items[key].append(value[mask])
    items = {key: torch.cat(value).float().numpy() if value else np.zeros(0) for key, value in items.items()}
    return vqa_accuracy(predictions, references)["overall"], items


def within_question_auroc(items):
    """Mean over questions of the AUROC of fitting vs not-fitting items of that question (pairs ranked right; ties
    count half)."""
    values = []
    for question in np.unique(items["question"]):
        chosen = items["question"] == question
        fits, scores = items["fits"][chosen].astype(bool), items["score"][chosen]
        if fits.any() and not fits.all():
            difference = scores[fits][:, None] - scores[~fits][None, :]
            values.append(float((difference > 0).mean() + 0.5 * (difference == 0).mean()))
    return float(np.mean(values))


def item_figures(items):
    fits = items["fits"].astype(bool)
    kept = items["gate"] > 0.5
    return {
        "auroc": within_question_auroc(items),
        "auroc_pooled": float(roc_auc_score(fits, items["score"])),
        "kept_fraction": {"fitting": float(kept[fits].mean()), "not_fitting": float(kept[~fits].mean())},
    }


def run_seed(seed, args):
    """Every model of one seed; writes and returns its figures."""
    from data_scripts import knowledge_vqa

    datasets.disable_caching()
    work = args.work
    built = knowledge_vqa.build(check_images="none").dataset
    train_full = built["train"].shuffle(seed=seed)
    train_full = train_full.select(range(min(args.train_samples or len(train_full), len(train_full))))
    test = built["test"].shuffle(seed=0).select(range(min(args.test_samples, len(built["test"]))))
    test = test.cast_column("image", datasets.Image(decode=False))  # undecoded: the PixelCache keys by path
    variants = {str(share): with_not_fitting_share(test, share, seed=7) for share in NOT_FITTING_SHARES}
    variants["as_retrieved"] = test
    previous = per_seed_path(args.out, seed)
    figures = json.loads(previous.read_text()) if args.extend else {"accuracy": {}, "items": {}, "learning_curve": {}}
    for name in args.curve_models:
        figures["learning_curve"].setdefault(name, {})
        if name in figures["accuracy"]:  # trained earlier: its 100% point
            figures["learning_curve"][name]["1.0"] = figures["accuracy"][name]["as_retrieved"]
    chosen = {name: MODELS[name] for name in args.models}
    # The models trained and tested on changed inputs: one accuracy each, no noise variants or item figures.
    prepared = {
        "no_knowledge": without_knowledge,
        "gold_fact": gold_only,
        "fitting_only": fitting_only,
        "blank_image": lambda split: with_blank_images(split, work / "blank.png"),
    }
    for name, model in tqdm(chosen.items(), desc=f"seed {seed} models"):
        prepare = prepared.get(name, lambda split: split)
        folder = train_model(name, prepare(train_full), model, seed, args, work)
        if name in prepared:
            accuracy = evaluate(folder, prepare(test))[0]
            figures["accuracy"][name] = {key: accuracy for key in variants}
            continue
        figures["accuracy"][name] = {}
        for key, split in variants.items():
            figures["accuracy"][name][key], items = evaluate(folder, split)
        figures["items"][name] = item_figures(items)  # the last variant: the candidates as retrieved
        if name in args.curve_models:
            figures["learning_curve"][name]["1.0"] = figures["accuracy"][name]["as_retrieved"]
    for fraction in args.fractions:
        rows = train_full.select(range(int(fraction * len(train_full))))
        for name in args.curve_models:
            folder = train_model(f"{name}-{fraction}", rows, MODELS[name], seed, args, work)
            figures["learning_curve"][name][str(fraction)] = evaluate(folder, test)[0]
    previous.parent.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(figures, indent=2))
    return figures


def per_seed_path(out, seed):
    """One seed's figures: its worker's output, and an input of every later `--extend` part."""
    return out / "per_seed" / f"seed{seed}.json"


# --------------------------------------------------------------------------------------------- summary, plots


def mean_and_stderr(values):
    values = np.asarray(values, dtype=float)
    stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), stderr


def summarise(per_seed, seeds, settings):
    """Means over seeds of every figure, standard errors under the same keys in the `*_stderr` twins."""

    def leaves(get):
        return mean_and_stderr([get(figures) for figures in per_seed])

    result = {"seeds": seeds, "settings": settings}
    for key, get_tree in (("accuracy", lambda f: f["accuracy"]), ("learning_curve", lambda f: f["learning_curve"])):
        tree = get_tree(per_seed[0])
        result[key] = {
            m: {k: leaves(lambda f, m=m, k=k, get_tree=get_tree: get_tree(f)[m][k])[0] for k in tree[m]} for m in tree
        }
        result[f"{key}_stderr"] = {
            m: {k: leaves(lambda f, m=m, k=k, get_tree=get_tree: get_tree(f)[m][k])[1] for k in tree[m]} for m in tree
        }
    layered = list(per_seed[0]["items"])
    for key in ("auroc", "auroc_pooled"):
        result[key] = {m: leaves(lambda f, m=m, key=key: f["items"][m][key])[0] for m in layered}
        result[f"{key}_stderr"] = {m: leaves(lambda f, m=m, key=key: f["items"][m][key])[1] for m in layered}
    result["kept_fraction"] = {
        m: {k: leaves(lambda f, m=m, k=k: f["items"][m]["kept_fraction"][k])[0] for k in ("fitting", "not_fitting")}
        for m in layered
    }
    result["kept_fraction_stderr"] = {
        m: {k: leaves(lambda f, m=m, k=k: f["items"][m]["kept_fraction"][k])[1] for k in ("fitting", "not_fitting")}
        for m in layered
    }
    return result


def plot(result, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = any(result["learning_curve"].values())  # a study run with --fractions and nothing else has none
    figure, axes = plt.subplots(1, 3 if curve else 2, figsize=(15 if curve else 10, 4))
    noise, kept = axes[0], axes[-1]  # the learning curve, when there is one, in between
    shares = [str(s) for s in NOT_FITTING_SHARES]
    for name, row in result["accuracy"].items():
        errors = result["accuracy_stderr"][name]
        noise.errorbar(
            [100 * float(s) for s in shares],
            [row[s] for s in shares],
            [errors[s] for s in shares],
            marker="o",
            capsize=3,
            label=name,
        )
    noise.set(xlabel="not-fitting knowledge items (%)", ylabel="test accuracy (%)", title="Accuracy vs knowledge noise")
    noise.legend(fontsize=8, ncol=2, loc="center", bbox_to_anchor=(0.5, 0.74))  # in the empty band under ood
    if curve:
        for name, row in result["learning_curve"].items():
            fractions = sorted(row, key=float)
            errors = result["learning_curve_stderr"][name]
            axes[1].errorbar(
                [100 * float(f) for f in fractions],
                [row[f] for f in fractions],
                [errors[f] for f in fractions],
                marker="o",
                capsize=3,
                label=name,
            )
        axes[1].set(xlabel="training questions (%)", ylabel="test accuracy (%)", title="Learning curve (same steps)")
        axes[1].legend(fontsize=8)
    names = list(result["kept_fraction"])
    positions = np.arange(len(names))
    for offset, kind in ((-0.2, "fitting"), (0.2, "not_fitting")):
        kept.bar(
            positions + offset,
            [result["kept_fraction"][n][kind] for n in names],
            0.4,
            yerr=[result["kept_fraction_stderr"][n][kind] for n in names],
            capsize=3,
            label=kind,
        )
    kept.set_xticks(positions, [f"{n}\nAUROC {result['auroc'][n]:.3f}" for n in names], fontsize=8)
    kept.set(ylabel="kept fraction (gate > 0.5)", title="Kept items, as retrieved")
    kept.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "knowledge_task.png", dpi=110)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-steps", type=int, default=RECIPE["max_steps"], help="training steps per model")
    parser.add_argument("--train-samples", type=int, default=None, help="default: the whole training split")
    parser.add_argument("--test-samples", type=int, default=500)
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="*",
        default=list(FRACTIONS[:-1]),
        help="learning-curve shares of the training questions below 100%% (none: no curve)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="the models to train (default: all)"
    )
    parser.add_argument(
        "--curve-models",
        nargs="*",
        choices=CURVE_MODELS,
        default=None,
        help="models of the learning curve (default: those of %(choices)s among --models)",
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="add to the figures of an earlier study in --out (same seeds) instead of starting anew",
    )
    parser.add_argument("--parallel", type=int, default=2, help="seeds trained at once, one process each")
    parser.add_argument("--seed-run", type=int, default=None, help=argparse.SUPPRESS)  # a worker: one seed
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "knowledge_task")
    parser.add_argument(
        "--work", type=Path, default=REPO_ROOT / "outputs" / "knowledge_task", help="trained models and their datasets"
    )
    args = parser.parse_args()
    if args.curve_models is None:
        args.curve_models = [name for name in CURVE_MODELS if name in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    budget = {"max_steps": args.max_steps, "train_samples": args.train_samples, "test_samples": args.test_samples}
    if args.seed_run is not None:
        run_seed(args.seed_run, args)
        return
    run = provenance.begin(args)
    if args.extend:
        earlier = json.loads((args.out / "knowledge_task.json").read_text())
        if earlier["seeds"] != args.seeds or any(earlier["settings"][k] != v for k, v in budget.items()):
            raise SystemExit(f"--extend: the earlier study ran seeds {earlier['seeds']} at {earlier['settings']}")
    started = time.perf_counter()
    passed = sys.argv[1:]
    pending = list(args.seeds)
    running = []
    while pending or running:
        while pending and len(running) < args.parallel:
            seed = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, *passed, "--seed-run", str(seed)]))
        running[0].wait()
        if running[0].returncode:
            raise SystemExit(f"a seed run failed with exit status {running[0].returncode}")
        running.pop(0)
    per_seed = [json.loads(per_seed_path(args.out, seed).read_text()) for seed in args.seeds]
    settings = {
        **budget,
        "config": str(CONFIG.relative_to(REPO_ROOT)),
        "models": {name: MODELS[name] for name in args.models},
        "command": " ".join(["python", "benchmarks/knowledge_task.py", *passed]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.extend:  # the earlier parts' settings, and what this part added
        before = earlier["settings"]
        settings = {
            **before,
            "models": {**before["models"], **settings["models"]},
            "parts": [
                *before.get("parts", [{k: before.get(k) for k in ("command", "seconds")}]),
                {k: settings[k] for k in ("command", "seconds")},
            ],
        }
    result = summarise(per_seed, args.seeds, settings)
    (args.out / "knowledge_task.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out)
    seed_files = [per_seed_path(args.out, seed) for seed in args.seeds]
    provenance.record(
        args.out,
        run,
        outputs=["knowledge_task.json", "knowledge_task.png", *seed_files],
        inputs=["knowledge_task.json", *seed_files] if args.extend else [],
        extends=args.extend,
        seconds=settings["parts"][-1]["seconds"] if args.extend else settings["seconds"],
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""SelTDA step 2 (Khan et al., CVPR 2023, "self-taught data augmentation"): a teacher that writes question-answer
pairs for an image alone pseudo-labels a pool of unlabelled images; the result is a VQA dataset that train.py adds
to its labelled training split (`--pseudo_labelled_dataset`).

The three steps in train.py terms (the README holds the exact commands):
1. train the teacher: `python train.py configuration/easy_vqa_generative.yaml --generation_target question_answer
   --labelled_fraction 0.05 --output_dir outputs/teacher` (the generative head, an empty prompt in, "question: Q
   answer: A" out);
2. pseudo-label: `python -m modeling_vkood.training.seltda --teacher outputs/teacher --labelled_fraction 0.05
   --out data/easy_vqa_seltda` (the pool: the training images that --labelled_fraction leaves unlabelled, or any
   folder of images with --images);
3. train the target model on both: `python train.py ... --labelled_fraction 0.05 --pseudo_labelled_dataset
   data/easy_vqa_seltda`.

The written folder has the layout of `python -m data_scripts` (Parquet under data/, a dataset card, a skip report):
the labelled dataset's columns and answer vocabulary, `knowledge` retrieved for each generated question as the
builders retrieve it, `answers` = the generated answer. Generations that do not parse as "question: Q answer: A",
answers outside the vocabulary (the classifier could not learn them), repeated pairs and, with
`--min_answer_probability`, answers the teacher itself is unsure of are left out, each named in the skip report.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

import datasets
import torch
from datasets import DatasetDict
from tqdm.auto import tqdm
from transformers import AutoProcessor

from data_scripts.__main__ import knowledge_source, replace_folder, write_parquet
from data_scripts.common import SkipReport, answer_vocabulary, finish_split, open_knowledge, vqa_features, vqa_targets
from hub_cards.dataset_card import DatasetDescription, dataset_card
from modeling_vkood.generation_vkood import VKOODForConditionalGeneration
from modeling_vkood.knowledge.scratch import scratch_folder

from .arguments import DataArguments
from .collators import ANSWER_MARKER, parse_question_answer
from .data import labelled_image_ids, load_splits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SELTDA_CITATION = """@inproceedings{khan2023seltda,
  title={Q: How to Specialize Large Vision-Language Models to Data-Scarce {VQA} Tasks?
         A: Self-Train on Unlabeled Images!},
  author={Khan, Zaid and BG, Vijay Kumar and Schulter, Samuel and Yu, Xiang and Fu, Yun and Chandraker, Manmohan},
  booktitle={CVPR}, year={2023}}"""


class NoPseudoLabels(ValueError):
    """The teacher wrote no usable question-answer pair for the pool (nothing to write)."""


def dataset_pool(labelled_split: datasets.Dataset, fraction: float | None, seed: int) -> list[dict]:
    """The unlabelled images of a training split: one {"image_id", "image"} per image that `--labelled_fraction`
    (drawn with the same seed as train.py draws it) leaves without questions, in image id order."""
    if fraction is None:
        raise ValueError(
            "the pool is the training images left unlabelled by --labelled_fraction: give it, or a "
            "folder of images with --images"
        )
    labelled = labelled_image_ids(labelled_split, fraction, seed)
    pool = {}
    for image_id, image in zip(labelled_split["image_id"], labelled_split["image"]):
        if image_id not in labelled and image_id not in pool:
            pool[image_id] = image
    return [{"image_id": image_id, "image": pool[image_id]} for image_id in sorted(pool)]


def folder_pool(folder: Path) -> list[dict]:
    """Every image file under `folder` (sorted paths), numbered from 0."""
    paths = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [
        {"image_id": index, "image": {"path": str(path.resolve()), "bytes": None}} for index, path in enumerate(paths)
    ]


def answer_probabilities(
    sequences: torch.Tensor, token_log_probs: torch.Tensor, marker: list[int], ignored: list[int]
) -> torch.Tensor:
    """Per generated sequence (N, T) the teacher's probability of its answer: the product of the probabilities of the
    tokens after the first `marker` (the token ids of " answer:"), `ignored` (special) tokens left out.
    `token_log_probs` (N, S): the log-probability of each of the S generated tokens (the last S of `sequences`) under
    the teacher's unwarped distribution. NaN where a sequence holds no marker (not a question-answer pair)."""
    generated = sequences[:, -token_log_probs.shape[1] :]
    width = len(marker)
    if generated.shape[1] <= width:
        return token_log_probs.new_full((len(generated),), float("nan"))
    hits = (generated.unfold(1, width, 1) == generated.new_tensor(marker)).all(-1)  # marker starting at each position
    after = torch.zeros_like(generated, dtype=torch.bool)
    after[:, width:] = hits[:, : generated.shape[1] - width].cumsum(1) > 0
    answer = after & ~torch.isin(generated, generated.new_tensor(ignored))
    probability = token_log_probs.masked_fill(~answer, 0.0).sum(1).exp()
    return probability.masked_fill(~hits.any(1), float("nan"))


@torch.no_grad()
def generate_pairs(
    model,
    processor,
    pool: list[dict],
    batch_size: int = 32,
    pairs_per_image: int = 1,
    top_p: float | None = 0.9,
    max_new_tokens: int = 32,
    seed: int = 0,
) -> list[tuple[int, str, float]]:
    """(pool index, generated text, the teacher's probability of its answer) for every image of `pool`,
    `pairs_per_image` each, by nucleus sampling (`top_p`, seeded), as SelTDA draws diverse pairs; greedy decoding
    with `top_p=None` (one pair per image: from an image alone, greedy decoding tends to write the same most likely
    question for every image). The probability is the raw (unwarped) one of the answer given the image and the
    generated question (`answer_probabilities`), for `--min_answer_probability`. Shows a progress bar."""
    if top_p is None and pairs_per_image > 1:
        raise ValueError("greedy decoding (top_p=None) writes one pair per image: sample for several")
    device = next(model.parameters()).device
    decoder = datasets.Image()
    sampling = {} if top_p is None else {"do_sample": True, "top_p": top_p, "num_return_sequences": pairs_per_image}
    tokenizer = processor.tokenizer
    marker = tokenizer(ANSWER_MARKER, add_special_tokens=False)["input_ids"]
    torch.manual_seed(seed)
    generated = []
    for start in tqdm(range(0, len(pool), batch_size), desc="pseudo-labelling", unit=" batches"):
        entries = pool[start : start + batch_size]
        images = [decoder.decode_example(entry["image"]) for entry in entries]
        inputs = processor(images=images, text=[""] * len(entries), knowledge=[])
        inputs = {key: value.to(device) for key, value in inputs.items()}
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_logits=True, **sampling
        )
        log_probs = model.compute_transition_scores(output.sequences, output.logits, normalize_logits=True)
        probabilities = answer_probabilities(output.sequences, log_probs, marker, tokenizer.all_special_ids)
        texts = processor.decode_answers(output.sequences)
        generated.extend(
            (start + index // pairs_per_image, text, probability)
            for index, (text, probability) in enumerate(zip(texts, probabilities.tolist()))
        )
    return generated


def _most_common_by_answer(split: datasets.Dataset, column: str) -> tuple[dict[str, str], str]:
    """Per answer the most common `column` value of the labelled questions with that answer, and the overall one."""
    per_answer: dict[str, Counter] = {}
    for answers, value in zip(split["answers"], split[column]):
        for answer in set(answers):
            per_answer.setdefault(answer, Counter())[value] += 1
    overall = Counter(split[column]).most_common(1)[0][0]
    return {answer: counts.most_common(1)[0][0] for answer, counts in per_answer.items()}, overall


def pseudo_labelled_rows(
    generated: list[tuple[int, str, float]],
    pool: list[dict],
    labelled_split: datasets.Dataset,
    report: SkipReport,
    min_answer_probability: float | None = None,
) -> dict[str, list]:
    """The VQA columns (without knowledge) of the usable generated pairs; the others go into `report`. With
    `min_answer_probability`, a pair whose answer the teacher gave a lower probability is left out too.

    `question_type` / `answer_type` of a pair are those of the labelled questions with the same answer (their most
    common), so that `--balance_by question_type` treats pseudo-labelled questions as their labelled peers.
    """
    vocabulary = answer_vocabulary(labelled_split)
    index = {answer: label for label, answer in enumerate(vocabulary)}
    question_types, common_question_type = _most_common_by_answer(labelled_split, "question_type")
    answer_types, common_answer_type = _most_common_by_answer(labelled_split, "answer_type")
    next_id = max(labelled_split["question_id"], default=-1) + 1
    columns = {name: [] for name in vqa_features(vocabulary) if name != "knowledge"}
    seen = set()
    for position, text, probability in generated:
        image_id = pool[position]["image_id"]
        record = f"image_id={image_id}"
        pair = parse_question_answer(text)
        if pair is None:
            report.skipped.append(
                {"split": "train", "record": record, "reason": "not a question-answer pair", "text": text}
            )
            continue
        question, answer = pair
        label_ids, label_scores = vqa_targets([answer], index)
        if not label_ids:
            report.skipped.append(
                {"split": "train", "record": record, "reason": "answer not in the vocabulary", "text": text}
            )
            continue
        if min_answer_probability is not None and not probability >= min_answer_probability:
            report.skipped.append(
                {
                    "split": "train",
                    "record": record,
                    "reason": f"answer probability below {min_answer_probability}",
                    "text": text,
                    "probability": probability,
                }
            )
            continue
        if (image_id, question) in seen:
            report.skipped.append({"split": "train", "record": record, "reason": "repeated question", "text": text})
            continue
        seen.add((image_id, question))
        row = {
            "question_id": next_id + len(columns["question_id"]),
            "image_id": image_id,
            "image": pool[position]["image"],
            "question": question,
            "answers": [answer],
            "answer_type": answer_types.get(answer, common_answer_type),
            "question_type": question_types.get(answer, common_question_type),
            "multiple_choice_answer": answer,
            "label_ids": label_ids,
            "label_scores": label_scores,
        }
        for key, value in row.items():
            columns[key].append(value)
    return columns


def describe(
    dataset_name: str,
    teacher: str,
    pool_size: int,
    pairs_per_image: int,
    top_p: float | None,
    min_answer_probability: float | None = None,
) -> DatasetDescription:
    decoding = "greedy decoding" if top_p is None else f"nucleus sampling (top_p={top_p})"
    if min_answer_probability is not None:
        decoding += f", answers the teacher gave a probability of at least {min_answer_probability}"
    return DatasetDescription(
        name=f"{dataset_name}_seltda",
        pretty_name=f"{dataset_name}: SelTDA pseudo-labelled questions",
        summary=f"Question-answer pairs written by the VK-OOD teacher `{teacher}` for {pool_size} unlabelled images "
        f"({pairs_per_image} per image, {decoding}), in the columns and answer vocabulary of {dataset_name}: SelTDA's "
        "self-taught data augmentation, to add to the labelled training split.",
        homepage="https://arxiv.org/abs/2306.03932",
        task_categories=["visual-question-answering"],
        licenses=["other"],
        licence_notes=[
            f"Images: those of the pool (the licence of {dataset_name}'s images, or of the given folder). "
            "Questions and answers: generated by the teacher model."
        ],
        citations=[SELTDA_CITATION],
        notes=[
            "`answers`: the one generated answer; `label_ids`/`label_scores`: its one-hot target.",
            "`question_type` / `answer_type`: those of the labelled questions with the same answer.",
            "`knowledge`: retrieved from the generated question, as the builders retrieve it.",
            'Left out (see the skip report): generations that are not "question: Q answer: A", answers outside '
            "the vocabulary, repeated questions about one image"
            + (", answers below the probability threshold." if min_answer_probability is not None else "."),
        ],
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_vkood.training.seltda", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--teacher", required=True, help="folder (or Hub id) of a trained question-answer generator")
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced when complete)")
    parser.add_argument("--dataset", default="easy_vqa", help="the labelled dataset (a builder name or a built one)")
    parser.add_argument("--dataset_root")
    parser.add_argument("--image_root")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--knowledge", default="starter", help='knowledge index for the questions, or "starter"')
    parser.add_argument("--max_knowledge_items", type=int, default=16)
    parser.add_argument("--dataset_cache_dir")
    parser.add_argument("--labelled_fraction", type=float, help="as train.py's: its other training images are the pool")
    parser.add_argument("--labelled_fraction_seed", type=int, default=0)
    parser.add_argument("--images", type=Path, help="a folder of unlabelled images as the pool instead")
    parser.add_argument("--max_images", type=int, help="pseudo-label only the first N images of the pool")
    parser.add_argument("--pairs_per_image", type=int, default=1)
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling's p (SelTDA draws diverse pairs)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead (one pair per image)")
    parser.add_argument(
        "--min_answer_probability",
        type=float,
        help="leave out pairs whose answer the teacher gives a lower probability (given the image and "
        "its question; default: keep every pair, as SelTDA does)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pairs_per_image < 1:
        parser.error("--pairs_per_image must be at least 1")
    if args.greedy and args.pairs_per_image > 1:
        parser.error("--greedy writes one pair per image: drop it to sample several")
    if args.greedy:
        args.top_p = None
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    data_args = DataArguments(
        task="vqa",
        dataset=args.dataset,
        dataset_root=args.dataset_root,
        image_root=args.image_root,
        knowledge=args.knowledge,
        train_split=args.train_split,
        dataset_cache_dir=args.dataset_cache_dir,
    )
    full_split = load_splits(data_args, [args.train_split], args.max_knowledge_items)[args.train_split]
    if args.images is not None:
        pool = folder_pool(args.images)
        labelled = full_split
    else:
        pool = dataset_pool(full_split, args.labelled_fraction, args.labelled_fraction_seed)
        kept = labelled_image_ids(full_split, args.labelled_fraction, args.labelled_fraction_seed)
        labelled = full_split.select([i for i, image_id in enumerate(full_split["image_id"]) if image_id in kept])
    pool = pool[: args.max_images]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = VKOODForConditionalGeneration.from_pretrained(args.teacher).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.teacher)
    generated = generate_pairs(
        model, processor, pool, args.batch_size, args.pairs_per_image, args.top_p, args.max_new_tokens, args.seed
    )
    report = SkipReport(f"{args.dataset}_seltda", image_check="none")
    columns = pseudo_labelled_rows(generated, pool, labelled, report, args.min_answer_probability)
    if not columns["question_id"]:  # an empty Parquet split is not a dataset `load_dataset` can read
        raise NoPseudoLabels(
            f"none of the {len(generated)} generations is a usable question-answer pair "
            f"{report.per_reason()}: train the teacher longer"
        )
    features = labelled.features.copy()
    features["image"] = datasets.Image()
    split = finish_split(
        columns,
        features,
        open_knowledge(args.knowledge),
        "question",
        split="train",
        max_knowledge_items=args.max_knowledge_items,
        num_proc=1,
        image_mode="path",
        work_dir=None,
    )
    dataset = DatasetDict({"train": split})
    out = args.out.resolve()
    with scratch_folder(out.parent, f".{out.name}.tmp-") as scratch:
        work = scratch / "output"
        work.mkdir()
        write_parquet(dataset, work)
        description = describe(
            args.dataset, args.teacher, len(pool), args.pairs_per_image, args.top_p, args.min_answer_probability
        )
        card = dataset_card(description, dataset, report.to_dict(), knowledge_source(args.knowledge), "path")
        (work / "README.md").write_text(str(card), encoding="utf-8")
        report.write(work / "skip_report.json")
        replace_folder(work, out, scratch)
        del dataset, split
    print(
        f"seltda: wrote {out}: {len(columns['question_id'])} questions for {len(pool)} images, left out "
        f"{len(report.skipped)} generations {report.per_reason()} (see skip_report.json)",
        file=sys.stderr,
    )
    return out


if __name__ == "__main__":
    main()

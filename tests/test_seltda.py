"""SelTDA in train.py terms on a tiny easy-VQA: the data-scarce split (labelled images and the unlabelled pool), the
teacher trained by train.py, the pseudo-labelling command writing a dataset with a card, and the training data
path reading it back and training on labelled + pseudo-labelled questions."""

import json
import math

import datasets
import pytest
import torch
from huggingface_hub import DatasetCard
from transformers import AutoProcessor

from modeling_vkood.generation_vkood import VKOODForConditionalGeneration
from modeling_vkood.training import load_splits, seltda
from modeling_vkood.training.arguments import DataArguments
from modeling_vkood.training.collators import ANSWER_MARKER, parse_question_answer
from modeling_vkood.training.data import labelled_image_ids
from modeling_vkood.training.seltda import dataset_pool
from tests.utils.generated_data import ANSWERS, write_easy_vqa
from tests.utils.tiny import tiny_decoder_config
from tests.utils.train_script import tiny_config, train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("seltda")


@pytest.fixture(scope="module")
def easy_vqa_root(workdir):
    return write_easy_vqa(workdir / "easy_vqa")  # 12 training images, 3 questions each; 6 test images


ITEMS = 4  # knowledge items per row, as the tiny models take


def data_args(workdir, root, **overrides):
    return DataArguments(
        task="vqa",
        dataset="easy_vqa",
        dataset_root=str(root),
        knowledge="starter",
        dataset_cache_dir=str(workdir / "built"),
        **overrides,
    )


def test_labelled_fraction_keeps_whole_images_and_leaves_the_others_as_the_pool(workdir, easy_vqa_root):
    full = load_splits(data_args(workdir, easy_vqa_root), ["train"], ITEMS)["train"]
    scarce = load_splits(data_args(workdir, easy_vqa_root, labelled_fraction=0.25), ["train"], ITEMS)["train"]
    labelled = set(scarce["image_id"])
    assert len(labelled) == 3 and len(scarce) == 9  # ceil(0.25 x 12) images with their 3 questions each
    assert [row for row in full["question_id"] if row in set(scarce["question_id"])] == scarce["question_id"]
    assert labelled == labelled_image_ids(full, 0.25, 0)
    assert labelled != labelled_image_ids(full, 0.25, 1)  # another draw with another labelled_fraction_seed
    pool = dataset_pool(full, 0.25, 0)
    assert sorted(entry["image_id"] for entry in pool) == sorted(set(full["image_id"]) - labelled)
    assert all(entry["image"]["path"].endswith(".png") for entry in pool)
    with pytest.raises(ValueError, match="labelled_fraction"):
        DataArguments(task="vqa", labelled_fraction=0.0)


@pytest.fixture(scope="module")
def teacher(workdir, easy_vqa_root, tiny_text_model):
    """Step 1: the question-answer generator, conditioned on the image alone, trained on half the images."""
    common = dict(
        task="generative_vqa",
        dataset="easy_vqa",
        dataset_root=str(easy_vqa_root),
        eval_split="test",
        decoder_config=tiny_decoder_config(),
        labelled_fraction=0.5,
    )
    teacher = workdir / "teacher"
    # A constant, large step: the decoder starts uniform over 30522 tokens and must learn the template in 40 steps.
    config = tiny_config(
        workdir,
        tiny_text_model,
        **common,
        generation_target="question_answer",
        max_steps=40,
        per_device_train_batch_size=6,
        learning_rate=1e-2,
        new_modules_learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    metrics = train.main([str(config), "--output_dir", str(teacher)])
    assert "eval_loss" in metrics and "eval_vqa_accuracy" not in metrics  # its texts are pairs, not answers
    assert json.loads((teacher / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"]
    return teacher


def pseudo_label_argv(workdir, easy_vqa_root, teacher, out, *extra):
    return [
        "--teacher",
        str(teacher),
        "--dataset",
        "easy_vqa",
        "--dataset_root",
        str(easy_vqa_root),
        "--knowledge",
        "starter",
        "--max_knowledge_items",
        "4",
        "--dataset_cache_dir",
        str(workdir / "built"),
        "--labelled_fraction",
        "0.5",
        "--batch_size",
        "4",
        "--out",
        str(out),
        *extra,
    ]


def test_answer_probability_is_the_product_of_the_answer_tokens_probabilities():
    marker, special = [7, 8], [0, 2]  # " answer:" and the start / end-or-padding ids
    sequences = torch.tensor(
        [
            [0, 5, 7, 8, 3, 4, 2, 2],  # answer tokens 3, 4, then end and padding
            [0, 7, 8, 3, 7, 8, 4, 2],  # the first marker starts the answer: 3, 7, 8, 4
            [0, 5, 6, 3, 4, 2, 2, 2],
        ]
    )  # no marker: not a pair
    log_probs = torch.log(
        torch.tensor(
            [
                [0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2],
                [0.9, 0.8, 0.5, 0.6, 0.7, 0.1, 0.3],
                [0.9, 0.8, 0.5, 0.6, 0.7, 0.1, 0.3],
            ]
        )
    )
    probability = seltda.answer_probabilities(sequences, log_probs, marker, special)
    assert torch.allclose(probability[:2], torch.tensor([0.5 * 0.4, 0.5 * 0.6 * 0.7 * 0.1]))
    assert probability[2].isnan()


@pytest.mark.slow
def test_answer_probability_equals_the_teacher_forced_probability_of_the_reparsed_pair(workdir, easy_vqa_root, teacher):
    """generate_pairs' probability (from the sampling's raw logits) against a separate path: the pair parsed from
    the decoded text, tokenised anew and scored by one teacher-forced forward pass."""
    model = VKOODForConditionalGeneration.from_pretrained(teacher).eval()
    processor = AutoProcessor.from_pretrained(teacher)
    full = load_splits(data_args(workdir, easy_vqa_root), ["train"], ITEMS)["train"]
    pool = dataset_pool(full, 0.5, 0)[:4]
    generated = seltda.generate_pairs(model, processor, pool, batch_size=4, pairs_per_image=2, seed=3)
    decoder, checked = datasets.Image(), 0
    for position, text, probability in generated:
        pair = parse_question_answer(text)
        if pair is None:
            assert math.isnan(probability) or 0.0 <= probability <= 1.0
            continue
        question, answer = pair
        prefix = processor.tokenizer(f"question: {question}{ANSWER_MARKER}", add_special_tokens=False)["input_ids"]
        answer_ids = processor.tokenizer(f" {answer}", add_special_tokens=False)["input_ids"]
        tokens = torch.tensor([[model.config.decoder_config.bos_token_id, *prefix, *answer_ids]])
        inputs = processor(images=[decoder.decode_example(pool[position]["image"])], text=[""], knowledge=[])
        with torch.no_grad():
            logits = model(**inputs, decoder_input_ids=tokens[:, :-1]).logits
        log_probs = logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[0, -len(answer_ids) :, 0]
        assert probability == pytest.approx(log_probs.sum().exp().item(), rel=1e-4, abs=1e-6)
        checked += 1
    assert checked >= 1


@pytest.mark.slow
def test_teacher_pseudo_labels_and_the_target_trains_on_both(workdir, easy_vqa_root, tiny_text_model, teacher):
    # Step 2: pseudo-label the 6 training images that labelled_fraction=0.5 leaves unlabelled, 2 pairs each.
    out = workdir / "pseudo"
    seltda.main(pseudo_label_argv(workdir, easy_vqa_root, teacher, out, "--pairs_per_image", "2"))
    report = json.loads((out / "skip_report.json").read_text())
    card = DatasetCard.load(out / "README.md")
    assert "SelTDA" in card.text and card.data.task_categories == ["visual-question-answering"]
    assert "nucleus sampling (top_p=0.9)" in card.text  # the default: diverse pairs, as SelTDA draws them
    assert sorted(path.name for path in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    # Greedy decoding on request: one pair per image, and refused for several.
    with pytest.raises(SystemExit):
        seltda.main(
            pseudo_label_argv(
                workdir, easy_vqa_root, teacher, workdir / "refused", "--greedy", "--pairs_per_image", "2"
            )
        )
    with pytest.raises(ValueError, match="one pair per image"):
        seltda.generate_pairs(None, None, [], pairs_per_image=2, top_p=None)
    assert "greedy decoding" in seltda.describe("easy_vqa", str(teacher), 6, 1, top_p=None).summary

    # The training data path reads it back: labelled questions followed by the pseudo-labelled ones.
    labelled = load_splits(data_args(workdir, easy_vqa_root, labelled_fraction=0.5), ["train"], ITEMS)["train"]
    both = load_splits(
        data_args(workdir, easy_vqa_root, labelled_fraction=0.5, pseudo_labelled_dataset=str(out)), ["train"], ITEMS
    )["train"]
    pseudo = both.select(range(len(labelled), len(both)))
    assert len(pseudo) >= 1 and len(pseudo) + report["total_skipped"] == 6 * 2
    assert both.select(range(len(labelled)))["question_id"] == labelled["question_id"]
    pool = set(range(12)) - set(labelled["image_id"])
    assert set(pseudo["image_id"]) <= pool and len(pool) == 6
    for row in pseudo:
        assert row["answers"][0] in ANSWERS and row["question"] and row["answers"] == [row["multiple_choice_answer"]]
        assert [pseudo.features["label_ids"].feature.names[i] for i in row["label_ids"]] == row["answers"]
        assert row["question_type"] == (
            "yes/no"
            if row["answers"][0] in ("yes", "no")
            else "shape"
            if row["answers"][0] in ("circle", "rectangle", "triangle")
            else "color"
        )
    assert min(pseudo["question_id"]) > max(labelled["question_id"])

    # Step 3: the target model trains on labelled + pseudo-labelled questions (the classifier here).
    target = tiny_config(
        workdir,
        tiny_text_model,
        task="vqa",
        dataset="easy_vqa",
        dataset_root=str(easy_vqa_root),
        eval_split="test",
        labelled_fraction=0.5,
        pseudo_labelled_dataset=str(out),
        max_steps=2,
    )
    results = train.main([str(target), "--output_dir", str(workdir / "target")])
    assert 0.0 <= results["eval_vqa_accuracy"] <= 100.0


@pytest.mark.slow
def test_min_answer_probability_leaves_out_the_pairs_the_teacher_is_unsure_of(workdir, easy_vqa_root, teacher):
    # The draws the command makes (same pool, batches and seed), to set a threshold between their probabilities.
    model = VKOODForConditionalGeneration.from_pretrained(teacher).eval()
    processor = AutoProcessor.from_pretrained(teacher)
    pool = dataset_pool(load_splits(data_args(workdir, easy_vqa_root), ["train"], ITEMS)["train"], 0.5, 0)
    generated = seltda.generate_pairs(model, processor, pool, batch_size=4, pairs_per_image=2, seed=0)
    labelled = load_splits(data_args(workdir, easy_vqa_root, labelled_fraction=0.5), ["train"], ITEMS)["train"]
    vocabulary = set(labelled.features["label_ids"].feature.names)
    pairs = [(parse_question_answer(text), p) for _, text, p in generated if parse_question_answer(text) is not None]
    probabilities = sorted(p for (_, answer), p in pairs if answer in vocabulary)
    assert len(probabilities) >= 2 and probabilities[0] < probabilities[-1]
    threshold = (probabilities[0] + probabilities[-1]) / 2

    out = workdir / "pseudo_confident"
    seltda.main(
        pseudo_label_argv(
            workdir, easy_vqa_root, teacher, out, "--pairs_per_image", "2", "--min_answer_probability", str(threshold)
        )
    )
    report = json.loads((out / "skip_report.json").read_text())
    unsure = [entry for entry in report["skipped"] if entry["reason"] == f"answer probability below {threshold}"]
    assert all(entry["probability"] < threshold for entry in unsure)
    assert len(unsure) == sum(p < threshold for p in probabilities) >= 1
    written = datasets.load_dataset(str(out), split="train", download_mode="force_redownload")
    assert len(written) + report["total_skipped"] == 6 * 2
    assert f"at least {threshold}" in (out / "README.md").read_text()
    with pytest.raises(seltda.NoPseudoLabels):
        seltda.main(
            pseudo_label_argv(
                workdir,
                easy_vqa_root,
                teacher,
                workdir / "none",
                "--pairs_per_image",
                "2",
                "--min_answer_probability",
                "1.01",
            )
        )

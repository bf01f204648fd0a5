"""SelTDA in train.py terms on a tiny easy-VQA: the data-scarce split (labelled images and the unlabelled pool), the
teacher trained by train.py, the pseudo-labelling command writing a dataset with a card, and the training data
path reading it back and training on labelled + pseudo-labelled questions."""

import json

import pytest
from conftest import save_tiny_bert, tiny_decoder_config
from huggingface_hub import DatasetCard
from test_training import ANSWERS, tiny_config, train, write_easy_vqa

from modeling_vkood.training import load_splits
from modeling_vkood.training.arguments import DataArguments
from modeling_vkood.training.data import labelled_image_ids
from modeling_vkood.training.seltda import dataset_pool
from modeling_vkood.training import seltda


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("seltda")


@pytest.fixture(scope="module")
def easy_vqa_root(workdir):
    return write_easy_vqa(workdir / "easy_vqa")  # 12 training images, 3 questions each; 6 test images


@pytest.fixture(scope="module")
def tiny_text_model(workdir, minilm_path):
    return save_tiny_bert(workdir / "tiny_bert", minilm_path)


def data_args(workdir, root, **overrides):
    return DataArguments(task="vqa", dataset="easy_vqa", dataset_root=str(root), knowledge="starter",
                         max_knowledge_items=4, dataset_cache_dir=str(workdir / "built"), **overrides)  # fmt: skip


def test_labelled_fraction_keeps_whole_images_and_leaves_the_others_as_the_pool(workdir, easy_vqa_root):
    full = load_splits(data_args(workdir, easy_vqa_root), ["train"])["train"]
    scarce = load_splits(data_args(workdir, easy_vqa_root, labelled_fraction=0.25), ["train"])["train"]
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


def test_teacher_pseudo_labels_and_the_target_trains_on_both(workdir, easy_vqa_root, tiny_text_model):
    common = dict(task="generative_vqa", dataset="easy_vqa", dataset_root=str(easy_vqa_root), eval_split="test",
                  decoder_config=tiny_decoder_config(), labelled_fraction=0.5)  # fmt: skip
    # Step 1: the question-answer generator, conditioned on the image alone.
    teacher = workdir / "teacher"
    # A constant, large step: the decoder starts uniform over 30522 tokens and must learn the template in 40 steps.
    config = tiny_config(workdir, tiny_text_model, **common, generation_target="question_answer", max_steps=40,
                         per_device_train_batch_size=6, learning_rate=1e-2, new_modules_learning_rate=1e-2,
                         lr_scheduler_type="constant")  # fmt: skip
    metrics = train.main([str(config), "--output_dir", str(teacher)])
    assert "eval_loss" in metrics and "eval_vqa_accuracy" not in metrics  # its texts are pairs, not answers
    assert json.loads((teacher / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"]

    # Step 2: pseudo-label the 6 training images that labelled_fraction=0.5 leaves unlabelled, 2 pairs each.
    out = workdir / "pseudo"
    seltda.main(["--teacher", str(teacher), "--dataset", "easy_vqa", "--dataset_root", str(easy_vqa_root),
                 "--knowledge", "starter", "--max_knowledge_items", "4", "--dataset_cache_dir", str(workdir / "built"),
                 "--labelled_fraction", "0.5", "--pairs_per_image", "2", "--batch_size", "4", "--out", str(out)])  # fmt: skip
    report = json.loads((out / "skip_report.json").read_text())
    card = DatasetCard.load(out / "README.md")
    assert "SelTDA" in card.text and card.data.task_categories == ["visual-question-answering"]
    assert "nucleus sampling (top_p=0.9)" in card.text  # the default: diverse pairs, as SelTDA draws them
    assert sorted(path.name for path in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    # Greedy decoding on request: one pair per image, and refused for several.
    greedy = ["--teacher", str(teacher), "--dataset", "easy_vqa", "--dataset_root", str(easy_vqa_root),
              "--knowledge", "starter", "--max_knowledge_items", "4", "--dataset_cache_dir", str(workdir / "built"),
              "--labelled_fraction", "0.5", "--batch_size", "4", "--greedy"]  # fmt: skip
    with pytest.raises(SystemExit):
        seltda.main([*greedy, "--pairs_per_image", "2", "--out", str(workdir / "refused")])
    with pytest.raises(ValueError, match="one pair per image"):
        seltda.generate_pairs(None, None, [], pairs_per_image=2, top_p=None)
    assert "greedy decoding" in seltda.describe("easy_vqa", str(teacher), 6, 1, top_p=None).summary

    # The training data path reads it back: labelled questions followed by the pseudo-labelled ones.
    labelled = load_splits(data_args(workdir, easy_vqa_root, labelled_fraction=0.5), ["train"])["train"]
    both = load_splits(data_args(workdir, easy_vqa_root, labelled_fraction=0.5, pseudo_labelled_dataset=str(out)),
                       ["train"])["train"]  # fmt: skip
    pseudo = both.select(range(len(labelled), len(both)))
    assert len(pseudo) >= 1 and len(pseudo) + report["total_skipped"] == 6 * 2
    assert both.select(range(len(labelled)))["question_id"] == labelled["question_id"]
    pool = set(range(12)) - set(labelled["image_id"])
    assert set(pseudo["image_id"]) <= pool and len(pool) == 6
    for row in pseudo:
        assert row["answers"][0] in ANSWERS and row["question"] and row["answers"] == [row["multiple_choice_answer"]]
        assert [pseudo.features["label_ids"].feature.names[i] for i in row["label_ids"]] == row["answers"]
        assert row["question_type"] == ("yes/no" if row["answers"][0] in ("yes", "no") else
                                        "shape" if row["answers"][0] in ("circle", "rectangle", "triangle") else "color")
    assert min(pseudo["question_id"]) > max(labelled["question_id"])

    # Step 3: the target model trains on labelled + pseudo-labelled questions (the classifier here).
    target = tiny_config(workdir, tiny_text_model, task="vqa", dataset="easy_vqa", dataset_root=str(easy_vqa_root),
                         eval_split="test", labelled_fraction=0.5, pseudo_labelled_dataset=str(out), max_steps=2)  # fmt: skip
    results = train.main([str(target), "--output_dir", str(workdir / "target")])
    assert 0.0 <= results["eval_vqa_accuracy"] <= 100.0

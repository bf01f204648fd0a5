"""The VQA-format builders (VQAv2, OK-VQA) on tiny files: OK-VQA's published annotation schema, a split with
questions only, the soft targets following the official metric, and a vocabulary that cannot be built."""

import json
from pathlib import Path

import pytest
from PIL import Image

from data_scripts import answer_vocabulary, okvqa, vqav2
from data_scripts.common import select_vocabulary, vqa_targets
from data_scripts.vqav2 import consensus_answer
from modeling_vkood.evaluation import answer_scores
from modeling_vkood.knowledge import KnowledgeBase


@pytest.fixture(scope="module")
def knowledge_base(tmp_path_factory):
    return KnowledgeBase.starter(cache_dir=tmp_path_factory.mktemp("knowledge"))


def write_json(path: Path, document) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def write_images(folder: Path, subtype: str, image_ids) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in image_ids:
        Image.new("RGB", (4, 4), (200, 30, 30)).save(folder / f"COCO_{subtype}_{image_id:012d}.jpg")


def okvqa_record(question_id: int, image_id: int, answers: list[str]) -> dict:
    """One annotation in OK-VQA's published schema: no `multiple_choice_answer`, `raw_answer` per answer."""
    return {
        "image_id": image_id,
        "question_id": question_id,
        "question_type": "eight",
        "answer_type": "other",
        "confidence": 2,
        "answers": [
            {"answer_id": i + 1, "raw_answer": answer.title(), "answer_confidence": "yes", "answer": answer}
            for i, answer in enumerate(answers)
        ],
    }


def write_okvqa(root: Path, images: Path, answers_per_question: list[list[str]]) -> None:
    for subtype, first in (("train2014", 1), ("val2014", 100)):
        questions, annotations = [], []
        for offset, answers in enumerate(answers_per_question):
            image_id = first + offset
            question_id = image_id * 10 + 5
            questions.append({"image_id": image_id, "question": "What animal is this?", "question_id": question_id})
            annotations.append(okvqa_record(question_id, image_id, answers))
        header = {"license": {"name": "CC-BY 4.0"}, "data_subtype": subtype, "data_type": "mscoco"}
        write_json(root / f"OpenEnded_mscoco_{subtype}_questions.json", {**header, "questions": questions})
        write_json(root / f"mscoco_{subtype}_annotations.json", {**header, "annotations": annotations})
        write_images(images / subtype, subtype, [q["image_id"] for q in questions])


def test_okvqa_reads_the_published_annotation_schema(tmp_path, knowledge_base):
    root, images = tmp_path / "okvqa", tmp_path / "images"
    answers = [
        ["dog"] * 4 + ["puppy"] * 4 + ["cat"] * 2,
        ["cat"] * 6 + ["kitten"] * 4,
        ["dog"] * 10,
        ["kitten"] * 5 + ["puppy"] * 5,
    ]
    write_okvqa(root, images, answers)
    dataset, skips = okvqa.build(root, images, knowledge_base)
    assert skips.skipped == [] and dataset.num_rows == {"train": 4, "validation": 4}
    rows = dataset["validation"]
    assert rows["answers"] == answers  # the `answer` fields, not the title-cased `raw_answer`
    assert rows["multiple_choice_answer"] == ["dog", "cat", "dog", "kitten"]  # most common; ties: the first given
    vocabulary = answer_vocabulary(dataset)
    assert set(vocabulary) == {"dog", "puppy", "cat", "kitten"}  # each answers 4 of the 8 questions (>= 3)
    first = rows[0]
    assert {vocabulary[i]: s for i, s in zip(first["label_ids"], first["label_scores"])} == pytest.approx(
        {"dog": 1.0, "puppy": 1.0, "cat": 0.6}
    )


def test_vqav2_still_requires_its_consensus_answer(tmp_path, knowledge_base):
    root = tmp_path / "vqav2"
    record = okvqa_record(15, 1, ["dog"] * 10)
    write_json(
        root / "v2_OpenEnded_mscoco_train2014_questions.json",
        {"questions": [{"image_id": 1, "question": "What?", "question_id": 15}]},
    )
    write_json(root / "v2_mscoco_train2014_annotations.json", {"annotations": [record]})
    with pytest.raises(ValueError, match="record 0: missing field 'multiple_choice_answer'"):
        vqav2.build(root, tmp_path / "images", knowledge_base)


def test_consensus_answer_is_the_most_common_first_given_on_ties():
    assert consensus_answer(["b", "a", "a", "b", "c"]) == "b"
    assert consensus_answer(["x", "y", "y"]) == "y"
    assert consensus_answer([]) == ""


def test_vqav2_test_split_from_a_questions_file_alone(tmp_path, knowledge_base):
    """test2015 has a questions file and no annotations: its rows have no answers; the vocabulary comes from the
    annotated splits present, so the label space is the training one."""
    root, images = tmp_path / "vqav2", tmp_path / "images"
    questions = [{"image_id": 7, "question": "What color is it?", "question_id": 70 + k} for k in range(2)]
    train = [{"image_id": 1, "question": f"Is it red {k}?", "question_id": 10 + k} for k in range(9)]
    annotations = [
        {
            "image_id": 1,
            "question_id": q["question_id"],
            "question_type": "is it",
            "answer_type": "yes/no",
            "multiple_choice_answer": "yes",
            "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
        }
        for q in train
    ]
    write_json(root / "v2_OpenEnded_mscoco_train2014_questions.json", {"questions": train})
    write_json(root / "v2_mscoco_train2014_annotations.json", {"annotations": annotations})
    write_json(root / "v2_OpenEnded_mscoco_test2015_questions.json", {"questions": questions})
    write_images(images / "test2015", "test2015", [7])
    dataset, _ = vqav2.build(root, images, knowledge_base, splits=["test"])
    assert answer_vocabulary(dataset) == ["yes"]
    assert dataset["test"]["question_id"] == [70, 71]
    assert dataset["test"]["answers"] == [[], []] and dataset["test"]["label_ids"] == [[], []]


def test_targets_follow_the_metric_when_the_annotators_agree():
    vocabulary = {"yes": 0, "no": 1, "2": 2}
    # Ten identical raw "Yes": the official metric credits only "Yes", so the vocabulary's "yes" gets nothing.
    assert vqa_targets(["Yes"] * 10, vocabulary) == ([], [])
    assert answer_scores(["yes"], ["Yes"] * 10) == [0.0]
    # Disagreeing annotators: everything is normalised, "two" and "2" are one answer.
    assert vqa_targets(["two"] * 3 + ["2"] * 2 + ["no"] * 5, vocabulary) == ([1, 2], [1.0, 1.0])


def test_vocabulary_below_the_threshold_fails_at_build_time_with_the_counts(tmp_path, knowledge_base):
    with pytest.raises(ValueError, match=r"threshold of 9 questions \(3 distinct answers, the most frequent answers 4"):
        select_vocabulary({"yes": 4, "no": 2, "2": 1, "": 30}, 9, "vqav2")
    assert select_vocabulary({"yes": 4, "no": 2, "2": 4}, 3, "vqav2") == ["2", "yes"]

    root, images = tmp_path / "okvqa", tmp_path / "images"
    write_okvqa(root, images, [["dog"] * 10])  # "dog" answers 2 questions; OK-VQA needs 3
    with pytest.raises(
        ValueError,
        match=r"okvqa: no answer reaches the vocabulary threshold of 3 questions \(1 "
        r"distinct answers, the most frequent answers 2 question",
    ):
        okvqa.build(root, images, knowledge_base)

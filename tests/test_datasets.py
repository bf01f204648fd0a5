"""Dataset builders on fixtures written in the official formats with generated images; CLI, card, skip report."""

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from data_scripts import answer_vocabulary, coco_karpathy, easy_vqa, flickr30k, image_check, nlvr2, okvqa, vqav2
from data_scripts.__main__ import content_bytes, main
from data_scripts.common import merge_knowledge, read_answer_vocabulary
from hub_cards.dataset_card import knowledge_statistics, size_category
from modeling_vkood.knowledge import KnowledgeBase, KnowledgeItem

HEADER = {
    "info": {"description": "This is v2.0 of the VQA dataset.", "version": "2.0", "year": 2017},
    "task_type": "Open-Ended",
    "data_type": "mscoco",
    "license": {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0"},
}


@pytest.fixture(scope="session")
def knowledge_base(tmp_path_factory):
    return KnowledgeBase.starter(cache_dir=tmp_path_factory.mktemp("knowledge"))


def write_image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)


def write_json(path: Path, document) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")


# -------------------------------------------------------------------------------------------- VQA fixtures


def _vqa_records(split_name: str, consensus: list[str], first_id: int):
    """Questions and annotations in the official format; two questions per image."""
    questions, annotations = [], []
    for index, answer in enumerate(consensus):
        image_id = first_id + index // 2
        question_id = image_id * 1000 + index % 2
        question = f"What is the dog doing {index}?"
        questions.append({"image_id": image_id, "question": question, "question_id": question_id})
        answers = ["yes"] * 8 + ["no"] * 2 if answer == "yes" else ["2"] * 3 + ["3"] * 7
        annotations.append(
            {
                "question_type": "what is the",
                "multiple_choice_answer": answer,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
                ],
                "image_id": image_id,
                "answer_type": "yes/no" if answer == "yes" else "number",
                "question_id": question_id,
            }
        )
    return questions, annotations


@pytest.fixture
def vqa_files(tmp_path):
    """VQAv2 official files: train 12 questions, val 6 (one image missing: 2 skipped), test-dev 2, test 3.

    Consensus answers: "yes" 7 + 2 times, "2" 5 + 4 times -> both reach the 9-question vocabulary threshold.
    """
    root, images = tmp_path / "annotations", tmp_path / "images"
    splits = {
        "train2014": (["yes"] * 7 + ["2"] * 5, 1, "train2014"),
        "val2014": (["yes"] * 2 + ["2"] * 4, 100, "val2014"),
        "test-dev2015": (["yes"] * 2, 200, "test2015"),
        "test2015": (["yes"] * 3, 300, "test2015"),
    }
    for subtype, (consensus, first_id, folder) in splits.items():
        questions, annotations = _vqa_records(subtype, consensus, first_id)
        header = {**HEADER, "data_subtype": subtype}
        write_json(root / f"v2_OpenEnded_mscoco_{subtype}_questions.json", {**header, "questions": questions})
        if subtype in ("train2014", "val2014"):
            write_json(root / f"v2_mscoco_{subtype}_annotations.json", {**header, "annotations": annotations})
        for image_id in {q["image_id"] for q in questions} - {101}:  # image 101 of val is missing
            write_image(images / folder / f"COCO_{folder}_{image_id:012d}.jpg")
    return root, images


def test_vqav2_builds_every_split_with_labels_knowledge_and_skips(vqa_files, knowledge_base):
    root, images = vqa_files
    dataset, skips = vqav2.build(root, images, knowledge_base)
    sizes = {split: len(data) for split, data in dataset.items()}
    assert sizes == {"train": 12, "validation": 4, "test_dev": 2, "test": 3}
    assert dataset["train"].features == vqav2.vqa_features(["2", "yes"])
    assert answer_vocabulary(dataset) == ["2", "yes"]  # 9 questions each, ties alphabetical
    yes_row, two_row = dataset["train"][0], dataset["train"][7]
    assert yes_row["answers"] == ["yes"] * 8 + ["no"] * 2
    assert (yes_row["label_ids"], yes_row["label_scores"]) == ([1], [1.0])  # "no" is not in the vocabulary
    assert two_row["label_ids"] == [0] and two_row["label_scores"] == pytest.approx([0.9])  # 3 of 10 annotators
    assert two_row["answer_type"] == "number" and two_row["multiple_choice_answer"] == "2"
    assert yes_row["image"].size == (4, 4)
    assert {item["head"] for item in yes_row["knowledge"]} >= {"dog"}
    assert len(yes_row["knowledge"]) <= 16
    test_row = dataset["test"][0]
    assert test_row["answers"] == [] and test_row["label_ids"] == [] and test_row["answer_type"] == ""
    missing = images / "val2014" / "COCO_val2014_000000000101.jpg"
    assert skips.to_dict()["per_split"] == {"validation": 2}
    assert [entry["path"] for entry in skips.skipped] == [str(missing)] * 2
    assert [entry["record"] for entry in skips.skipped] == ["question_id=101000", "question_id=101001"]


def test_vqav2_split_selection_keeps_the_full_vocabulary(vqa_files, knowledge_base):
    root, images = vqa_files
    dataset, _ = vqav2.build(root, images, knowledge_base, splits=["validation"], max_knowledge_items=2)
    assert list(dataset) == ["validation"]
    assert answer_vocabulary(dataset) == ["2", "yes"]  # counted on train + val even when building val only
    assert max(len(k) for k in dataset["validation"]["knowledge"]) == 2
    with pytest.raises(ValueError, match="unknown split"):
        vqav2.build(root, images, knowledge_base, splits=["val"])


def test_vqav2_strict_fails_on_the_missing_image(vqa_files, knowledge_base):
    root, images = vqa_files
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000101.jpg"):
        vqav2.build(root, images, knowledge_base, splits=["validation"], strict=True)


def test_each_distinct_image_is_decoded_once_per_build(vqa_files, knowledge_base, monkeypatch):
    root, images = vqa_files
    checked = []
    original = image_check.image_problem
    monkeypatch.setattr(image_check, "image_problem", lambda path, check: checked.append(path) or original(path, check))
    dataset, _ = vqav2.build(root, images, knowledge_base)
    assert dataset.num_rows == {"train": 12, "validation": 4, "test_dev": 2, "test": 3}  # two questions per image
    assert len(checked) == len(set(checked)) == 6 + 2 + 1 + 2  # every image once, across all splits


def test_vqav2_given_vocabulary_sets_the_labels_and_their_order(vqa_files, knowledge_base):
    root, images = vqa_files
    given = ["no", "3", "yes", "maybe", "2"]  # not the selected order, with answers no row has or no question selects
    dataset, _ = vqav2.build(root, images, knowledge_base, vocabulary=given)
    assert dataset.num_rows == {"train": 12, "validation": 4, "test_dev": 2, "test": 3}
    assert answer_vocabulary(dataset) == dataset["train"].features["label_ids"].feature.names == given
    yes_row, two_row = dataset["train"][0], dataset["train"][7]  # answers: yes x8 no x2 / 2 x3 3 x7
    assert [given[i] for i in yes_row["label_ids"]] == ["no", "yes"]
    assert yes_row["label_scores"] == pytest.approx([0.6, 1])
    assert [given[i] for i in two_row["label_ids"]] == ["3", "2"]  # label order: "3" (7 of 10) before "2" (3 of 10)
    assert two_row["label_scores"] == pytest.approx([1, 0.9])

    # Questions none of whose answers is in the vocabulary keep their rows, without labels.
    train = vqav2.build(root, images, knowledge_base, splits=["train"], vocabulary=["maybe", "2"]).dataset["train"]
    assert len(train) == 12 and train[0]["label_ids"] == [] and train[7]["label_ids"] == [1]
    # A given vocabulary needs no annotation file (the test splits have none); a selected one does.
    for subset in ("train2014", "val2014"):
        (root / f"v2_mscoco_{subset}_annotations.json").unlink()
    test = vqav2.build(root, images, knowledge_base, splits=["test"], vocabulary=given).dataset
    assert answer_vocabulary(test) == given and len(test["test"]) == 3
    with pytest.raises(FileNotFoundError, match="the answer vocabulary needs one"):
        vqav2.build(root, images, knowledge_base, splits=["test"])
    for wrong, message in ((["yes", "no", "yes"], r"more than once: \['yes'\]"), ([], "empty"), (["2", 2], "string")):
        with pytest.raises(ValueError, match=message):
            vqav2.build(root, images, knowledge_base, splits=["test"], vocabulary=wrong)


def test_read_answer_vocabulary_from_a_json_list_or_a_model_config(tmp_path):
    write_json(tmp_path / "answers.json", ["yes", "no", "2"])
    assert read_answer_vocabulary(tmp_path / "answers.json") == ["yes", "no", "2"]
    write_json(
        tmp_path / "model" / "config.json", {"model_type": "vkood", "id2label": {"1": "no", "0": "yes", "2": "2"}}
    )
    assert read_answer_vocabulary(tmp_path / "model") == ["yes", "no", "2"]  # in label id order
    assert read_answer_vocabulary(tmp_path / "model" / "config.json") == ["yes", "no", "2"]
    write_json(tmp_path / "gap" / "config.json", {"id2label": {"0": "yes", "2": "no"}})
    write_json(tmp_path / "same.json", {"id2label": {"0": "yes", "1": "yes"}})
    write_json(tmp_path / "bare" / "config.json", {"model_type": "vkood"})
    (tmp_path / "empty").mkdir()
    for path, error, message in (
        (tmp_path / "gap", ValueError, r"must name every label id 0\.\.1 once"),
        (tmp_path / "same.json", ValueError, "more than once"),
        (tmp_path / "bare", ValueError, "'id2label'"),
        (tmp_path / "absent", FileNotFoundError, "absent does not exist"),
        (tmp_path / "empty", FileNotFoundError, "empty/config.json does not exist"),
    ):
        with pytest.raises(error, match=message):
            read_answer_vocabulary(path)


def _rewrite(path: Path, key: str, index: int, change) -> None:
    document = json.loads(path.read_text())
    change(document[key][index])
    path.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("file", "key", "change", "message"),
    [
        (
            "v2_OpenEnded_mscoco_train2014_questions.json",
            "questions",
            lambda r: r.pop("question"),
            "train2014_questions.json: record 3: missing field 'question'",
        ),
        (
            "v2_OpenEnded_mscoco_train2014_questions.json",
            "questions",
            lambda r: r.update(image_id="7"),
            "record 3: field 'image_id' should be int",
        ),
        (
            "v2_mscoco_train2014_annotations.json",
            "annotations",
            lambda r: r["answers"].append("yes"),
            'train2014_annotations.json: record 3: every entry of "answers"',
        ),
        (
            "v2_mscoco_train2014_annotations.json",
            "annotations",
            lambda r: r.update(question_id=5),
            "train2014_questions.json: record 3: question_id 2001 has no annotation",
        ),
    ],
)
def test_vqav2_malformed_record_names_file_and_index(vqa_files, knowledge_base, file, key, change, message):
    root, images = vqa_files
    _rewrite(root / file, key, 3, change)
    with pytest.raises(ValueError, match=message):
        vqav2.build(root, images, knowledge_base, splits=["train"])


def test_okvqa_uses_its_own_files_and_vocabulary_rule(tmp_path, knowledge_base):
    root, images = tmp_path / "annotations", tmp_path / "images"
    for subtype, first_id in (("train2014", 1), ("val2014", 50)):
        questions, annotations = _vqa_records(subtype, ["yes", "2", "yes", "2"], first_id)
        for annotation in annotations:  # OK-VQA's published records carry no consensus answer
            del annotation["multiple_choice_answer"]
        write_json(root / f"OpenEnded_mscoco_{subtype}_questions.json", {**HEADER, "questions": questions})
        write_json(root / f"mscoco_{subtype}_annotations.json", {**HEADER, "annotations": annotations})
        for question in questions:
            write_image(images / subtype / f"COCO_{subtype}_{question['image_id']:012d}.jpg")
    dataset, skips = okvqa.build(root, images, knowledge_base)
    assert {split: len(data) for split, data in dataset.items()} == {"train": 4, "validation": 4}
    # All annotator answers count; each of "yes", "no", "2", "3" answers 4 questions (>= 3).
    assert answer_vocabulary(dataset) == ["2", "3", "no", "yes"]
    first = dataset["train"][0]
    assert first["label_ids"] == [2, 3] and first["label_scores"] == pytest.approx([0.6, 1.0])
    assert skips.skipped == []


def test_okvqa_given_vocabulary_sets_the_labels_and_their_order(tmp_path, knowledge_base):
    root, images = tmp_path / "annotations", tmp_path / "images"
    questions, annotations = _vqa_records("train2014", ["yes", "2"], 1)
    for annotation in annotations:
        del annotation["multiple_choice_answer"]
    write_json(root / "OpenEnded_mscoco_train2014_questions.json", {**HEADER, "questions": questions})
    write_json(root / "mscoco_train2014_annotations.json", {**HEADER, "annotations": annotations})
    write_image(images / "train2014" / "COCO_train2014_000000000001.jpg")
    dataset, _ = okvqa.build(root, images, knowledge_base, vocabulary=["3", "yes", "dog"])
    assert answer_vocabulary(dataset) == ["3", "yes", "dog"]
    assert [row["label_ids"] for row in dataset["train"]] == [[1], [0]]  # "yes" (8 of 10), "3" (7 of 10)


# ------------------------------------------------------------------------------------------------------ NLVR2


def _nlvr2_record(identifier: str, label: str, **extra) -> dict:
    return {
        "identifier": identifier,
        "sentence": f"There is a dog in {identifier}.",
        "label": label,
        "synset": "dog",
        "query": "dog",
        "writer": "1",
        "validation": {},
        **extra,
    }


@pytest.fixture
def nlvr2_files(tmp_path):
    root, images = tmp_path / "annotations", tmp_path / "images"
    files = {
        "train": [
            _nlvr2_record("train-5-0-0", "True", directory=3),
            _nlvr2_record("train-5-1-0", "False", directory=3),
        ],
        "dev": [
            _nlvr2_record("dev-9-0-0", "False"),
            _nlvr2_record("dev-9-1-0", "True"),
            _nlvr2_record("dev-9-0-1", "True"),
        ],
        "test1": [_nlvr2_record("test1-2-0-0", "True")],
    }
    for name, records in files.items():
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in records))
        for record in records:
            stem = record["identifier"].rsplit("-", 1)[0]
            folder = images / name / str(record.get("directory", ""))
            for side in (0, 1):
                if stem != "dev-9-1" or side == 0:  # dev-9-1-img1.png is missing
                    write_image(folder / f"{stem}-img{side}.png", colour=(side * 200, 0, 0))
    return root, images


def test_nlvr2_builds_every_split_with_pairs_labels_and_skips(nlvr2_files, knowledge_base):
    root, images = nlvr2_files
    dataset, skips = nlvr2.build(root, images, knowledge_base)
    assert {split: len(data) for split, data in dataset.items()} == {"train": 2, "validation": 2, "test": 1}
    row = dataset["train"][1]
    assert row["identifier"] == "train-5-1-0" and row["label"] == 0
    assert dataset["train"].features["label"].names == ["False", "True"]
    assert row["image_0"].getpixel((0, 0)) == (0, 0, 0) and row["image_1"].getpixel((0, 0)) == (200, 0, 0)
    assert any(item["head"] == "dog" for item in row["knowledge"])
    assert dataset["validation"]["identifier"] == ["dev-9-0-0", "dev-9-0-1"]
    assert skips.skipped == [
        {
            "split": "validation",
            "record": "dev-9-1-0",
            "reason": "missing image",
            "path": str(images / "dev" / "dev-9-1-img1.png"),
        }
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"identifier": "dev-9-0-0", "sentence": "x", "label": "yes"}', "dev.json: record 1: label 'yes'"),
        ('{"identifier": "dev-9-0", "sentence": "x", "label": "True"}', "dev.json: record 1: identifier"),
        ('{"identifier": "dev-9-0-0", "label": "True"}', "dev.json: record 1: missing field 'sentence'"),
        ("{not json", "dev.json: record 1: not valid JSON"),
    ],
)
def test_nlvr2_malformed_record_names_file_and_index(nlvr2_files, knowledge_base, line, message):
    root, images = nlvr2_files
    lines = (root / "dev.json").read_text().splitlines()
    (root / "dev.json").write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=message):
        nlvr2.build(root, images, knowledge_base, splits=["validation"])


def test_nlvr2_takes_the_official_split_names(nlvr2_files, knowledge_base):
    """`test1` (test1.json, NLVR2's public test file) and `dev` build the dataset's `test` and `validation`."""
    root, images = nlvr2_files
    dataset, _ = nlvr2.build(root, images, knowledge_base, splits=["test1", "dev"])
    assert {split: len(data) for split, data in dataset.items()} == {"validation": 2, "test": 1}
    assert dataset["test"]["identifier"] == ["test1-2-0-0"]
    same, _ = nlvr2.build(root, images, knowledge_base, splits=["test", "test1"])
    assert list(same) == ["test"] and same["test"]["identifier"] == ["test1-2-0-0"]
    with pytest.raises(ValueError, match="unknown split"):
        nlvr2.build(root, images, knowledge_base, splits=["test2"])


def test_nlvr2_bytes_mode_embeds_the_images(nlvr2_files, knowledge_base):
    root, images = nlvr2_files
    dataset, _ = nlvr2.build(root, images, knowledge_base, splits=["test"], image_mode="bytes")
    stored = dataset["test"].data.column("image_1").to_pylist()[0]
    assert stored["path"] == "test1-2-0-img1.png"
    assert stored["bytes"] == (images / "test1" / "test1-2-0-img1.png").read_bytes()
    assert dataset["test"][0]["image_1"].getpixel((0, 0)) == (200, 0, 0)


# -------------------------------------------------------------------------------------------------- retrieval


def _karpathy_image(imgid: int, split: str, filename: str, **extra) -> dict:
    captions = [f"A dog sits on a bench {imgid}. ", f"A cat near a car {imgid}."]
    return {
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentids": [2 * imgid, 2 * imgid + 1],
        "sentences": [
            {"tokens": c.split(), "raw": c, "imgid": imgid, "sentid": 2 * imgid + i} for i, c in enumerate(captions)
        ],
        **extra,
    }


@pytest.fixture
def coco_files(tmp_path):
    root, images = tmp_path / "annotations", tmp_path / "images"
    records = []
    for imgid, (split, folder) in enumerate(
        [("train", "train2014"), ("restval", "val2014"), ("val", "val2014"), ("test", "val2014"), ("test", "val2014")]
    ):
        cocoid = 1000 + imgid
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        records.append(_karpathy_image(imgid, split, filename, filepath=folder, cocoid=cocoid))
        if imgid != 4:  # the second test image is missing
            write_image(images / folder / filename)
    write_json(root / "dataset_coco.json", {"images": records, "dataset": "coco"})
    return root, images


def test_coco_karpathy_restval_goes_to_train_and_knowledge_merges_captions(coco_files, knowledge_base):
    root, images = coco_files
    dataset, skips = coco_karpathy.build(root, images, knowledge_base, max_knowledge_items=6)
    assert {split: len(data) for split, data in dataset.items()} == {"train": 2, "validation": 1, "test": 1}
    assert dataset["train"]["split"] == ["train", "restval"] and dataset["train"]["image_id"] == [1000, 1001]
    row = dataset["train"][0]
    assert row["captions"] == ["A dog sits on a bench 0.", "A cat near a car 0."]
    heads = [item["head"] for item in row["knowledge"]]
    assert len(heads) == 6 and {"dog", "cat"} <= set(heads)  # both captions contribute
    assert skips.to_dict()["per_split"] == {"test": 1}
    assert skips.skipped[0]["record"] == "COCO_val2014_000000001004.jpg"


def test_coco_karpathy_restval_can_stay_separate(coco_files, knowledge_base):
    root, images = coco_files
    dataset, _ = coco_karpathy.build(root, images, knowledge_base, splits=["restval"], restval_to_train=False)
    assert list(dataset) == ["restval"] and dataset["restval"]["image_id"] == [1001]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(split="dev"), "dataset_coco.json: record 2: split 'dev'"),
        (lambda r: r.update(sentences=[]), "dataset_coco.json: record 2: needs at least one sentence"),
        (lambda r: r.pop("cocoid"), "dataset_coco.json: record 2: missing field 'cocoid'"),
    ],
)
def test_karpathy_malformed_record_names_file_and_index(coco_files, knowledge_base, change, message):
    root, images = coco_files
    _rewrite(root / "dataset_coco.json", "images", 2, change)
    with pytest.raises(ValueError, match=message):
        coco_karpathy.build(root, images, knowledge_base)


def test_flickr30k_reads_its_karpathy_file(tmp_path, knowledge_base):
    root, images = tmp_path / "annotations", tmp_path / "flickr30k-images"
    splits = ["train", "train", "val", "test"]
    records = [_karpathy_image(i, split, f"{5000 + i}.jpg") for i, split in enumerate(splits)]
    write_json(root / "dataset_flickr30k.json", {"images": records, "dataset": "flickr30k"})
    for record in records:
        write_image(images / record["filename"])
    dataset, skips = flickr30k.build(root, images, knowledge_base)
    assert {split: len(data) for split, data in dataset.items()} == {"train": 2, "validation": 1, "test": 1}
    assert dataset["test"][0]["image_id"] == 3 and dataset["test"][0]["filename"] == "5003.jpg"
    assert skips.skipped == []


# --------------------------------------------------------------------------------------------------- easy-VQA


def test_easy_vqa_from_a_folder_in_the_package_layout(tmp_path, knowledge_base):
    (tmp_path / "answers.txt").write_text("circle\nred\nyes\nno\n")
    train = [["what is the red shape?", "circle", 0], ["is there a circle?", "yes", 1]]
    write_json(tmp_path / "train" / "questions.json", train)
    write_json(tmp_path / "test" / "questions.json", [["what color is the shape?", "red", 0]])
    for split in ("train", "test"):
        write_image(tmp_path / split / "images" / "0.png")
    dataset, skips = easy_vqa.build(tmp_path, None, knowledge_base)
    assert answer_vocabulary(dataset) == ["circle", "red", "yes", "no"]
    first = dataset["train"][0]
    assert (first["label_ids"], first["label_scores"]) == ([0], [1.0])
    assert (first["question_type"], first["answer_type"]) == ("shape", "other")
    assert dataset["test"][0]["question_type"] == "color" and len(dataset["train"]) == 1
    assert skips.skipped[0]["record"] == "question_id=1"  # train image 1 is missing
    write_json(tmp_path / "test" / "questions.json", [["what color is the shape?", "purple", 0]])
    with pytest.raises(ValueError, match="test/questions.json: record 0: answer 'purple'"):
        easy_vqa.build(tmp_path, None, knowledge_base, splits=["test"])


def test_easy_vqa_from_the_installed_package(knowledge_base):
    dataset, skips = easy_vqa.build(knowledge=knowledge_base, splits=["test"])
    assert len(dataset["test"]) == 9673 and skips.skipped == []  # the package's README: 9673 test questions
    assert len(answer_vocabulary(dataset)) == 13
    assert all(scores == [1.0] for scores in dataset["test"]["label_scores"])


# ------------------------------------------------------------------------------------------ knowledge, card


def test_merge_knowledge_round_robin_dedupes_and_caps():
    def item(head, tail):
        return KnowledgeItem(head, "IsA", tail, 1.0, f"{head} is {tail}")

    first = [item("dog", "pet"), item("dog", "animal")]
    second = [item("dog", "pet"), item("cat", "pet"), item("cat", "x")]
    merged = merge_knowledge([first, second], max_items=3)
    assert [(i.head, i.tail) for i in merged] == [("dog", "pet"), ("dog", "animal"), ("cat", "pet")]


def test_knowledge_statistics_and_size_category():
    knowledge = [
        [{"head": "a", "relation": "IsA", "tail": "b", "weight": 1.0, "text": "t"}] * 3,
        [],
        [{"head": "a", "relation": "UsedFor", "tail": "b", "weight": 1.0, "text": "t"}],
    ]
    features = datasets.Features({"knowledge": vqav2.vqa_features([])["knowledge"]})
    train = datasets.Dataset.from_dict({"knowledge": knowledge}, features=features)
    stats = knowledge_statistics(datasets.DatasetDict({"train": train}))
    expected = {"rows": 3, "with_knowledge": 2 / 3, "mean_items": 4 / 3, "max_items": 3}
    assert stats["per_split"]["train"] == pytest.approx(expected)
    assert stats["relations"] == {"IsA": 3, "UsedFor": 1}
    assert [size_category(n) for n in (999, 1000, 250_000, 5_000_000)] == ["n<1K", "1K<n<10K", "100K<n<1M", "1M<n<10M"]


# ------------------------------------------------------------------------------------------------------- CLI


def _cli(root, images, out, *extra) -> list[str]:
    return [
        "vqav2",
        "--root",
        str(root),
        "--image-root",
        str(images),
        "--knowledge",
        "starter",
        "--out",
        str(out),
        *extra,
    ]


def test_content_bytes_ignores_chunking():
    rows = [[{"head": "dog", "weight": 1.5}], [], [{"head": "cat", "weight": 2.0}]]
    whole = pa.chunked_array([pa.array(rows)])
    split = pa.chunked_array([pa.array(rows[:1]), pa.array(rows[1:])])
    assert content_bytes(whole) == content_bytes(split) == 3 + 3 + 8 + 8  # strings + float64 values


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_writes_parquet_card_and_skip_report_deterministically(vqa_files, tmp_path, monkeypatch):
    root, images = vqa_files
    monkeypatch.setenv("VKOOD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out" / "vqav2"
    assert main(_cli(root, images, out)) == 0
    first = _files(out)
    assert sorted(first) == [
        "README.md",
        "data/test-00000-of-00001.parquet",
        "data/test_dev-00000-of-00001.parquet",
        "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet",
        "skip_report.json",
    ]
    # Rerun over the existing output, with two worker processes: byte-identical files, no temporary folders left.
    assert main(_cli(root, images, out, "--num-proc", "2")) == 0
    assert _files(out) == first
    assert [p.name for p in out.parent.iterdir()] == ["vqav2"]

    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    built, _ = vqav2.build(root, images, "starter")
    assert {s: len(d) for s, d in loaded.items()} == {s: len(d) for s, d in built.items()}
    assert loaded["train"].features == built["train"].features
    assert loaded["train"][7]["label_scores"] == built["train"][7]["label_scores"]

    report = json.loads((out / "skip_report.json").read_text())
    assert report["total_skipped"] == 2 and report["per_split"] == {"validation": 2}
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == ["cc-by-4.0", "cc-by-sa-4.0", "other"]
    assert card.data.configs[0]["data_files"][0] == {"split": "train", "path": "data/train-*"}
    assert {s["name"]: s["num_examples"] for s in card.data.dataset_info["splits"]} == {
        "train": 12,
        "validation": 4,
        "test_dev": 2,
        "test": 3,
    }
    assert "COCO_val2014_000000000101.jpg" in card.text and "CC-BY-SA 4.0" in card.text
    assert "| validation | 4 |" in card.text


def test_cli_reports_unreadable_images_in_the_skip_report_and_the_card(vqa_files, tmp_path, monkeypatch):
    root, images = vqa_files
    monkeypatch.setenv("VKOOD_CACHE", str(tmp_path / "cache"))
    broken = images / "train2014" / "COCO_train2014_000000000002.jpg"  # asked about by two questions
    broken.write_bytes(b"<html>404 Not Found</html>")
    out = tmp_path / "out" / "vqav2"
    assert main(_cli(root, images, out, "--splits", "train")) == 0
    report = json.loads((out / "skip_report.json").read_text())
    assert report["image_check"] == "decode" and report["per_reason"] == {"unreadable image": 2}
    assert [entry["record"] for entry in report["skipped"]] == ["question_id=2000", "question_id=2001"]
    card = DatasetCard.load(out / "README.md").text
    assert "fully decoded once" in card and "unreadable image: 2" in card
    assert "| train | question_id=2000 | unreadable image (UnidentifiedImageError: cannot identify image file" in card
    assert f"`{broken}`" in card

    assert main(_cli(root, images, out, "--splits", "train", "--check-images", "none")) == 0
    assert json.loads((out / "skip_report.json").read_text())["total_skipped"] == 0
    assert "only checked to exist" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match=f"image {broken} of record question_id=2000 cannot be read"):
        main(_cli(root, images, out, "--splits", "train", "--strict"))


def test_cli_failure_leaves_the_previous_output_untouched(vqa_files, tmp_path, monkeypatch):
    root, images = vqa_files
    monkeypatch.setenv("VKOOD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out" / "vqav2"
    main(_cli(root, images, out, "--splits", "test"))
    before = _files(out)
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000101.jpg"):
        main(_cli(root, images, out, "--strict"))
    assert _files(out) == before and [p.name for p in out.parent.iterdir()] == ["vqav2"]


def test_cli_answer_vocabulary_from_a_model_folder(vqa_files, tmp_path, monkeypatch):
    root, images = vqa_files
    monkeypatch.setenv("VKOOD_CACHE", str(tmp_path / "cache"))
    write_json(tmp_path / "converted" / "config.json", {"id2label": {"0": "no", "1": "2", "2": "yes"}})
    out = tmp_path / "out" / "vqav2"
    assert main(_cli(root, images, out, "--splits", "train", "--answer_vocabulary", str(tmp_path / "converted"))) == 0
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    assert answer_vocabulary(loaded) == ["no", "2", "yes"]
    assert loaded["train"][0]["label_ids"] == [0, 2]  # "no" 2 of 10, "yes" 8 of 10
    assert "the 3 answers of `converted` (`--answer-vocabulary`)" in (out / "README.md").read_text()
    with pytest.raises(SystemExit):
        main(["nlvr2", "--root", str(root), "--knowledge", "starter", "--out", str(out), "--answer-vocabulary", "x"])


def test_load_splits_builds_with_the_given_vocabulary(vqa_files, tmp_path):
    from modeling_vkood.training import load_splits
    from modeling_vkood.training.arguments import DataArguments

    root, images = vqa_files
    args = DataArguments(
        dataset="vqav2",
        dataset_root=str(root),
        image_root=str(images),
        eval_split="validation",
        check_images="none",
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    assert answer_vocabulary(load_splits(args, ["train"], 2)) == ["2", "yes"]
    given = load_splits(args, ["train"], 2, answer_vocabulary=["yes", "no", "2"])
    assert answer_vocabulary(given) == ["yes", "no", "2"]  # a build of its own, not the cached one
    assert given["train"][0]["label_ids"] == [0, 1] and given["train"][7]["label_ids"] == [2]
    assert answer_vocabulary(load_splits(args, ["train"], 2, answer_vocabulary=["2"])) == ["2"]
    assert len(list((tmp_path / "cache").iterdir())) == 3
    args.dataset = "nlvr2"
    with pytest.raises(ValueError, match="answer_vocabulary is for the builders"):
        load_splits(args, ["train"], 2, answer_vocabulary=["2"])


def test_cli_push_to_hub_uploads_dataset_card_and_report(vqa_files, tmp_path, monkeypatch):
    root, images = vqa_files
    monkeypatch.setenv("VKOOD_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(
        datasets.DatasetDict, "push_to_hub", lambda self, repo: calls.append(("data", repo, sorted(self)))
    )
    monkeypatch.setattr(
        "huggingface_hub.HfApi.upload_file",
        lambda self, **kw: calls.append((kw["path_in_repo"], kw["repo_id"], kw["repo_type"])),
    )
    out = tmp_path / "out"
    main(_cli(root, images, out, "--splits", "test", "--push-to-hub", "me/vqav2-knowledge"))
    assert calls == [
        ("data", "me/vqav2-knowledge", ["test"]),
        ("README.md", "me/vqav2-knowledge", "dataset"),
        ("skip_report.json", "me/vqav2-knowledge", "dataset"),
    ]
    assert 'load_dataset("me/vqav2-knowledge")' in (out / "README.md").read_text()

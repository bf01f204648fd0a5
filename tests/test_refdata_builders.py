"""Builders on the real official annotation files of ../shared/refdata, paired with placeholder images.

Run from `.ci/run` as its own step; skipped (with the reason) on machines without the refdata folder. The images
are one generated placeholder hard-linked under every official file name (thousands of them in well under a
second); a few are left out on purpose to check that the skip report counts and names them.
"""

import gzip
import json
import os
import re
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_scripts import answer_vocabulary, coco_karpathy, flickr30k, nlvr2, okvqa, vqav2
from modeling_vkood.conversion.meter_answers import answer_list_from_records
from modeling_vkood.evaluation import answer_scores, nlvr2_accuracy, normalize_answer, vqa_accuracy
from modeling_vkood.knowledge import KnowledgeBase
from tests.utils.paths import REFDATA

pytestmark = pytest.mark.skipif(
    REFDATA is None and not os.environ.get("VKOOD_REQUIRE_REFDATA"),
    reason="../shared/refdata (real official annotation files) is absent on this machine "
    "(VKOOD_REQUIRE_REFDATA=1 forbids the skip)",
)


@pytest.fixture(scope="module")
def knowledge_base(tmp_path_factory):
    return KnowledgeBase.starter(cache_dir=tmp_path_factory.mktemp("knowledge"))


@pytest.fixture(scope="module")
def placeholder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("placeholder") / "placeholder.png"
    Image.new("RGB", (8, 8), (90, 140, 200)).save(path)
    return path


def link_images(placeholder: Path, paths) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(placeholder, path)


def official_vqa_file(kind: str, records: list, subtype: str) -> dict:
    """Real records wrapped in the official top-level header (from header_sample), as the release files are."""
    header = json.loads((REFDATA / "vqav2" / "header_sample" / f"{kind}.json").read_text())
    return {**header, "data_subtype": subtype, kind: records}


def test_vqav2_from_the_real_records(tmp_path, knowledge_base, placeholder):
    questions = json.loads(gzip.open(REFDATA / "vqav2" / "vqa_questions_valid.gzip").read())["questions"]
    annotations = json.loads(gzip.open(REFDATA / "vqav2" / "vqa_annotatons_valid.gzip").read())["annotations"]
    root, images = tmp_path / "annotations", tmp_path / "images"
    root.mkdir()
    # The records were drawn from the official train2014 files.
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(
        json.dumps(official_vqa_file("questions", questions, "train2014"))
    )
    (root / "v2_mscoco_train2014_annotations.json").write_text(
        json.dumps(official_vqa_file("annotations", annotations, "train2014"))
    )
    image_ids = sorted({q["image_id"] for q in questions})
    missing = set(image_ids[:5])
    kept = (i for i in image_ids if i not in missing)
    link_images(placeholder, (images / "train2014" / f"COCO_train2014_{i:012d}.jpg" for i in kept))

    dataset, skips = vqav2.build(root, images, knowledge_base)
    skipped = sum(q["image_id"] in missing for q in questions)
    assert len(questions) == 8977 and skipped > 0
    assert len(dataset["train"]) == len(questions) - skipped and len(skips.skipped) == skipped
    vocabulary = answer_vocabulary(dataset)
    assert vocabulary[:2] == ["yes", "no"] and "2" in vocabulary

    # The normalisation is idempotent on real answers, so vocabulary entries score as themselves.
    answers = {a["answer"] for record in annotations for a in record["answers"]}
    assert all(normalize_answer(normalize_answer(a)) == normalize_answer(a) for a in answers)
    # Targets equal the metric: answering each row's best label scores exactly the mean of the best scores.
    columns = dataset["train"].select_columns(["label_scores", "label_ids", "answers"]).to_dict()
    labelled = [i for i, scores in enumerate(columns["label_scores"]) if scores]
    best = [max(zip(columns["label_scores"][i], columns["label_ids"][i])) for i in labelled]
    result = vqa_accuracy([vocabulary[label] for _, label in best], [columns["answers"][i] for i in labelled])
    assert result["overall"] == pytest.approx(100 * sum(score for score, _ in best) / len(best), abs=1e-4)


def test_vqav2_with_meters_answer_list_as_the_vocabulary(tmp_path, knowledge_base, placeholder):
    """A build for fine-tuning a converted METER checkpoint: the labels are METER's answers, in METER's order."""
    questions = json.loads(gzip.open(REFDATA / "vqav2" / "vqa_questions_valid.gzip").read())["questions"]
    annotations = json.loads(gzip.open(REFDATA / "vqav2" / "vqa_annotatons_valid.gzip").read())["annotations"]
    root, images = tmp_path / "annotations", tmp_path / "images"
    root.mkdir()
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    image_ids = {q["image_id"] for q in questions}
    link_images(placeholder, (images / "train2014" / f"COCO_train2014_{i:012d}.jpg" for i in image_ids))
    meter = answer_list_from_records(annotations, [])
    assert len(meter) == 71

    train = vqav2.build(root, images, knowledge_base, check_images="none", vocabulary=meter).dataset["train"]
    assert answer_vocabulary(train) == train.features["label_ids"].feature.names == meter
    assert answer_vocabulary(vqav2.build(root, images, knowledge_base, check_images="none").dataset) != meter
    # Each label names an answer the metric credits on the row's human answers, with the score it would earn.
    columns = train.select_columns(["answers", "label_ids", "label_scores"]).to_dict()
    unlabelled = 0
    for answers, label_ids, label_scores in zip(columns["answers"], columns["label_ids"], columns["label_scores"]):
        unlabelled += not label_ids
        scores = answer_scores(meter, answers)
        assert label_ids == [label for label, score in enumerate(scores) if score > 0]
        assert label_scores == pytest.approx([scores[label] for label in label_ids])
    assert len(train) == len(questions) and 0 < unlabelled < len(train) // 2  # rows without a label are kept


def okvqa_annotation(question: dict, index: int) -> dict:
    """An annotation record in OK-VQA's published schema (v1.0 / v1.1) for a real question: no
    `multiple_choice_answer`, 5 annotators whose answers are each recorded twice, `raw_answer` beside the
    processed `answer` (here marked "raw ...", so a builder reading the wrong field is caught)."""
    word = re.sub(r"[^a-z]", "", question["question"].lower().split()[-1]) or "thing"
    given = [word, word, word, "something", "unknown"]
    answers = [a for a in given for _ in range(2)]
    return {
        "image_id": question["image_id"],
        "question_id": question["question_id"],
        "question_type": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"][index % 10],
        "answer_type": "other",
        "confidence": 1 + index % 5,
        "answers": [
            {"answer_id": i + 1, "raw_answer": f"raw {a}", "answer_confidence": "yes", "answer": a}
            for i, a in enumerate(answers)
        ],
    }


@pytest.mark.slow
def test_okvqa_real_questions_with_annotations_in_the_published_schema(tmp_path, knowledge_base, placeholder):
    root, images = tmp_path / "annotations", tmp_path / "images"
    root.mkdir()
    counts = {}
    for subtype in ("train2014", "val2014"):
        name = f"OpenEnded_mscoco_{subtype}_questions.json"
        document = json.loads((REFDATA / "okvqa" / name).read_text())
        (root / name).write_text(json.dumps(document))
        annotations = [okvqa_annotation(question, i) for i, question in enumerate(document["questions"])]
        header = {key: value for key, value in document.items() if key not in ("questions", "task_type")}
        (root / f"mscoco_{subtype}_annotations.json").write_text(json.dumps({**header, "annotations": annotations}))
        counts[subtype] = len(document["questions"])
        image_ids = {question["image_id"] for question in document["questions"]}
        link_images(placeholder, (images / subtype / f"COCO_{subtype}_{i:012d}.jpg" for i in image_ids))
    dataset, skips = okvqa.build(root, images, knowledge_base)
    assert counts == {"train2014": 9009, "val2014": 5046}
    assert {s: len(d) for s, d in dataset.items()} == {"train": 9009, "validation": 5046} and skips.skipped == []
    row = dataset["validation"][0]
    assert row["question"] == "What sport can you use this for?"
    assert row["answers"] == ["for"] * 6 + ["something"] * 2 + ["unknown"] * 2  # the `answer` fields
    assert row["multiple_choice_answer"] == "for"  # derived: the most common answer
    vocabulary = answer_vocabulary(dataset)
    assert not any(answer.startswith("raw ") for answer in vocabulary)  # built from `answer`, not `raw_answer`
    assert sorted(vocabulary[label] for label in row["label_ids"]) == ["for", "something", "unknown"]
    assert sorted(row["label_scores"]) == pytest.approx([0.6, 0.6, 1.0])  # 2, 2 and 6 of 10 answers


@pytest.mark.slow
def test_nlvr2_dev_from_the_real_file(tmp_path, knowledge_base, placeholder):
    root, images = tmp_path / "annotations", tmp_path / "images"
    root.mkdir()
    (root / "dev.json").write_bytes((REFDATA / "nlvr2" / "dev.json").read_bytes())
    records = [json.loads(line) for line in (REFDATA / "nlvr2" / "dev.json").read_text().splitlines() if line]
    stems = sorted({r["identifier"].rsplit("-", 1)[0] for r in records})
    link_images(
        placeholder,
        (
            images / "dev" / f"{stem}-img{side}.png"
            for stem in stems
            for side in (0, 1)
            if not (stem == stems[0] and side == 1)
        ),
    )
    dataset, skips = nlvr2.build(root, images, knowledge_base)
    skipped = sum(r["identifier"].startswith(stems[0] + "-") for r in records)
    assert len(records) == 6982 and len(dataset["validation"]) == 6982 - skipped and len(skips.skipped) == skipped
    validation = dataset["validation"]
    kept = {r["identifier"]: r["label"] for r in records if not r["identifier"].startswith(stems[0] + "-")}
    assert dict(zip(validation["identifier"], (["False", "True"][label] for label in validation["label"]))) == kept
    perfect = nlvr2_accuracy(validation["label"], validation["label"], validation["identifier"])
    assert perfect == {"accuracy": 100.0, "consistency": 100.0}
    always_true = nlvr2_accuracy([1] * len(validation), validation["label"], validation["identifier"])
    assert always_true["accuracy"] == pytest.approx(100 * Counter(kept.values())["True"] / len(kept))
    assert always_true["consistency"] < always_true["accuracy"]


def test_flickr8k_karpathy_file_as_the_flickr30k_schema(tmp_path, knowledge_base, placeholder):
    root, images = tmp_path / "annotations", tmp_path / "images"
    root.mkdir()
    with zipfile.ZipFile(REFDATA / "karpathy" / "dataset_flickr8k.zip") as archive:
        document = json.loads(archive.read("dataset_flickr8k.json"))
    (root / "dataset_flickr30k.json").write_text(json.dumps(document))
    filenames = [record["filename"] for record in document["images"]]
    link_images(placeholder, (images / name for name in filenames[1:]))  # the first image is missing
    # Knowledge for the 2,000 validation and test images only (all 8,000 records are still read and checked),
    # to keep this step short.
    dataset, skips = flickr30k.build(root, images, knowledge_base, splits=["validation", "test"])
    split_sizes = Counter(record["split"] for record in document["images"])
    assert split_sizes == {"train": 6000, "val": 1000, "test": 1000}
    first_split = {"val": "validation", "test": "test", "train": "train"}[document["images"][0]["split"]]
    expected = {"validation": 1000, "test": 1000}
    if first_split in expected:
        expected[first_split] -= 1
    assert {s: len(d) for s, d in dataset.items()} == expected
    assert len(skips.skipped) == 1000 + 1000 - sum(expected.values())
    assert all(len(captions) == 5 for captions in dataset["test"]["captions"])


def test_coco_karpathy_first_record_of_the_real_file(tmp_path, knowledge_base, placeholder):
    root, images = tmp_path / "annotations", tmp_path / "images"
    root.mkdir()
    (root / "dataset_coco.json").write_bytes((REFDATA / "karpathy" / "dataset_coco.first_record.json").read_bytes())
    link_images(placeholder, [images / "val2014" / "COCO_val2014_000000391895.jpg"])
    dataset, skips = coco_karpathy.build(root, images, knowledge_base, splits=["test"])
    row = dataset["test"][0]
    assert (row["image_id"], len(row["captions"]), row["split"]) == (391895, 5, "test") and skips.skipped == []
    assert row["captions"][0] == "A man with a red helmet on a small moped on a dirt road."

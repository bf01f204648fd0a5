"""METER's VQAv2 answer list against METER's own code (refdata/meter, verbatim), on the 8,977 real VQAv2 records.

The oracle is `meter.utils.write_vqa.make_arrow` itself, run on the records written as the official files: its
`glob` (the image files) and `path2rest` (one arrow row per image) are stubbed, so that it runs its own vocabulary
lines and hands the `label2ans` it built to the stub. The records all come from the official train2014 file; they
are split by image (as train2014 / val2014 are), a third of the images to "val", so that counts add up across the
two files and the first-occurrence order runs over train, then val.
"""

import gzip
import importlib
import json
import os
import random
import warnings
from collections import Counter

import pytest

from modeling_vkood.conversion.meter_answers import (
    ANNOTATION_FILES,
    MIN_COUNT,
    answer_list_from_records,
    meter_answer_list,
    normalize_word,
)
from tests.utils.paths import REFDATA

needs_refdata = pytest.mark.skipif(
    REFDATA is None and not os.environ.get("VKOOD_REQUIRE_REFDATA"),
    reason="../shared/refdata (real official annotation files, METER's code) is absent on this machine "
    "(VKOOD_REQUIRE_REFDATA=1 forbids the skip)",
)
QUESTION_FILES = {
    "train2014": "v2_OpenEnded_mscoco_train2014_questions.json",
    "val2014": "v2_OpenEnded_mscoco_val2014_questions.json",
    "test2015": "v2_OpenEnded_mscoco_test2015_questions.json",
    "test-dev2015": "v2_OpenEnded_mscoco_test-dev2015_questions.json",
}


@pytest.fixture(scope="module")
def meter():
    """METER's `write_vqa` and `glossary` modules, imported from refdata (sys.path restored afterwards)."""
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its regex literals are not raw strings ("\d"): a warning only
        patch.syspath_prepend(str(REFDATA / "meter"))
        return importlib.import_module("meter.utils.write_vqa"), importlib.import_module("meter.utils.glossary")


@pytest.fixture(scope="module")
def records() -> dict[str, tuple[list, list]]:
    """subset -> (questions, annotations): the real records split by image, every third image id to val2014."""
    annotations = json.loads(gzip.open(REFDATA / "vqav2" / "vqa_annotatons_valid.gzip").read())["annotations"]
    questions = json.loads(gzip.open(REFDATA / "vqav2" / "vqa_questions_valid.gzip").read())["questions"]
    assert len(annotations) == len(questions) == 8977 and {r["split"] for r in annotations} == {"valid"}
    subsets = {}
    for subset, in_subset in (("train2014", lambda i: i % 3 != 0), ("val2014", lambda i: i % 3 == 0)):
        subsets[subset] = (
            [q for q in questions if in_subset(q["image_id"])],
            [a for a in annotations if in_subset(a["image_id"])],
        )
    return subsets


def meter_label2ans(write_vqa, records: dict, root, monkeypatch) -> list[str]:
    """The `label2ans` that METER's `make_arrow` builds from `records` written as the official files in `root`."""
    for subset, name in QUESTION_FILES.items():
        questions = records[subset][0] if subset in records else []  # the test splits: no question
        (root / name).write_text(json.dumps({"questions": questions}))
    for subset, name in zip(("train2014", "val2014"), ANNOTATION_FILES):
        (root / name).write_text(json.dumps({"annotations": records[subset][1]}))
    images = {}  # glob pattern -> the image files of the subset's questions
    for subset, (questions, _) in records.items():
        image_ids = sorted({question["image_id"] for question in questions})
        images[f"{root}/{subset}/*.jpg"] = [f"{root}/{subset}/COCO_{subset}_{i:012d}.jpg" for i in image_ids]
    seen = []

    def path2rest(path, split, annotations, label2ans):
        seen.append(label2ans)
        return [b"", [], [], [], [], int(path[-16:-4]), [], split]

    monkeypatch.setattr(write_vqa, "glob", lambda pattern: images.get(pattern, []))
    monkeypatch.setattr(write_vqa, "path2rest", path2rest)
    monkeypatch.setattr(write_vqa, "random", random.Random(0))  # it shuffles the paths: not the global generator
    write_vqa.make_arrow(str(root), str(root / "arrow"))
    assert seen and all(label2ans is seen[0] for label2ans in seen)
    return seen[0]


@needs_refdata
def test_answer_list_equals_the_one_meter_builds(meter, records, tmp_path, monkeypatch):
    write_vqa, _ = meter
    expected = meter_label2ans(write_vqa, records, tmp_path, monkeypatch)
    assert meter_answer_list(tmp_path) == expected
    train, val = records["train2014"][1], records["val2014"][1]
    assert answer_list_from_records(train, val) == expected
    assert len(expected) == 71 and expected[:4] == ["no", "cat", "yes", "4"]

    # The case is exercised: counts add up across the files, and the order is train's first, then val's.
    per_file = [Counter(normalize_word(a["multiple_choice_answer"]) for a in part) for part in (train, val)]
    assert any(max(c[answer] for c in per_file) < MIN_COUNT for answer in expected)
    assert answer_list_from_records(val, train) != expected
    # The threshold is 9: 8 keeps more answers (the list is then a superset, in the same order), 10 fewer.
    lower, higher = answer_list_from_records(train, val, MIN_COUNT - 1), answer_list_from_records(train, val, 10)
    assert len(lower) > len(expected) > len(higher)
    assert [answer for answer in lower if answer in expected] == expected


@needs_refdata
def test_normalize_word_equals_meters(meter, records):
    _, glossary = meter
    tricky = [
        "Dont",  # contractions
        "isnt it?",
        "couldn'tve",
        "y'all'dve",
        "somebody'd",  # the table maps it the other way
        "Ive",  # a capitalised key of the table: never matches after lower-casing
        "none",  # number words
        "The Two dogs.",
        "ten-four",
        "a",  # articles
        "  an   apple ",
        "an\napple",
        "1,000",  # punctuation: a comma between digits deletes every mark
        "x ,y",
        "black/white",
        "hes (maybe)!",
        "e.g. x.y.",
        "10.5.",
        "it's 10:30.",
        "." * 40 + "x",  # only 32 periods go
        "ab-cd\t-",  # a tab is not a space for "touches a space" (the official evaluation: "abcd")
        "\u0661,\u0660\u0660\u0660 cats!",  # Arabic-Indic digits are digits for METER's patterns
        "3.\u0663",
        "\u0130stanbul",
    ]
    for word in tricky:
        assert normalize_word(word) == glossary.normalize_word(word), word
    # Every answer and question text of the real records.
    texts = {q["question"] for questions, _ in records.values() for q in questions}
    for _, annotations in records.values():
        for annotation in annotations:
            texts.add(annotation["multiple_choice_answer"])
            texts.update(answer["answer"] for answer in annotation["answers"])
    assert len(texts) > 10_000
    assert [normalize_word(text) for text in texts] == [glossary.normalize_word(text) for text in texts]


def test_first_occurrence_order_and_threshold_on_records():
    def annotations(*answers):
        return [{"multiple_choice_answer": answer} for answer in answers]

    train = annotations("Two", "cat", "yes", "2", "the cat")
    val = annotations("dog", "yes", "Dog.", "dog", "cat")
    assert answer_list_from_records(train, val, min_count=2) == ["2", "cat", "yes", "dog"]
    assert answer_list_from_records(train, val, min_count=3) == ["cat", "dog"]
    with pytest.raises(ValueError, match="val2014 annotation record 1: no string 'multiple_choice_answer'"):
        answer_list_from_records(train, [{"multiple_choice_answer": "a"}, {"answers": []}])


def test_meter_answer_list_names_a_missing_file(tmp_path):
    (tmp_path / ANNOTATION_FILES[0]).write_text(json.dumps({"annotations": []}))
    with pytest.raises(FileNotFoundError, match="v2_mscoco_val2014_annotations.json"):
        meter_answer_list(tmp_path)
    (tmp_path / ANNOTATION_FILES[1]).write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="expected a JSON object with a list under 'annotations'"):
        meter_answer_list(tmp_path)

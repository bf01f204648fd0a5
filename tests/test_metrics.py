"""Metrics against hand-computed official examples, and the `evaluate` modules loaded offline."""

import numpy as np
import pytest

from modeling_vkood.evaluation import (
    EVALUATE_MODULES,
    OFFICIAL_DECIMALS,
    answer_scores,
    metric_path,
    nlvr2_accuracy,
    normalize_answer,
    retrieval_recall,
    vqa_accuracy,
)
from modeling_vkood.evaluation.vqa import comparable_answers, leave_one_out_accuracy
from modeling_vkood.evaluation.vqa_normalization import process_digit_article, process_punctuation

# ------------------------------------------------------------------------------------- VQA answer normalisation
# Hand-worked cases of the current official rules (vqaEval.py a013f00); tests/test_vqa_official_parity.py checks
# the whole metric against the official script itself on real records.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("black/white", "black white"),  # mark not next to a space: becomes a space
        ("yes, it is", "yes it is"),  # mark next to a space: deleted
        ("1,000", "1000"),  # a comma between digits anywhere: every mark deleted
        ("it's", "it's"),  # the apostrophe is not punctuation ...
        ("10:30", "10:30"),  # ... nor is the colon
        ("t-shirt!", "t shirt "),  # "-" and "!" are
        ("{red}", " red "),
        ("hello.", "hello"),  # a period not followed by a digit is deleted
        ("3.5", "3.5"),  # ... one followed by a digit is kept
        ("a" + "." * 40, "a" + "." * 8),  # the official call removes at most 32 periods
    ],
)
def test_process_punctuation_matches_official_rules(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Two Dogs", "2 dogs"),
        ("none", "0"),
        ("an apple", "apple"),
        ("ten", "10"),
        ("dont", "don't"),  # contraction restored, with an ASCII apostrophe
        ("wouldnt've", "wouldn't've"),
        ("somebody'd", "somebodyd"),  # an entry of the official table that looks reversed, kept
        ("Im", "im"),  # capitalised keys of the official table never match after lower-casing
    ],
)
def test_process_digit_article_matches_official_rules(text, expected):
    assert process_digit_article(text) == expected


def test_normalize_answer_strips_whitespace_then_normalises():
    assert normalize_answer("\tTwo  Cats.\n") == "2 cats"


# -------------------------------------------------------------------------------------------- VQA accuracy


def _official_leave_one_out(prediction: str, references: list[str]) -> float:
    """The official per-question loop, written out: drop each answer in turn, min(1, matches/3), average."""
    accuracies = []
    for held_out in range(len(references)):
        others = references[:held_out] + references[held_out + 1 :]
        accuracies.append(min(1.0, sum(other == prediction for other in others) / 3))
    return sum(accuracies) / len(accuracies)


@pytest.mark.parametrize("num_answers", range(2, 11))
def test_leave_one_out_equals_the_official_loop(num_answers):
    for matches in range(num_answers + 1):
        references = ["cat"] * matches + ["dog"] * (num_answers - matches)
        hits = [reference == "cat" for reference in references]
        assert leave_one_out_accuracy(hits) == _official_leave_one_out("cat", references)


def test_ten_answers_give_the_official_steps():
    steps = [leave_one_out_accuracy([True] * m + [False] * (10 - m)) for m in range(6)]
    assert steps == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0, 1.0])


def test_identical_answers_are_compared_raw_and_stripped():
    # All ten identical: nothing is normalised, so only the exact (stripped) string scores.
    assert answer_scores(["yes", " yes\n", "Yes", "yes."], ["yes"] * 10) == [1.0, 1.0, 0.0, 0.0]
    assert answer_scores(["2"], ["two"] * 10) == [0.0]


def test_disagreeing_answers_and_prediction_are_both_fully_normalised():
    # They disagree: references and prediction go through punctuation, then digits/articles/case.
    assert answer_scores(["yes"], ["Yes."] * 9 + ["yes"]) == [1.0]
    assert answer_scores(["Two."], ["2"] * 4 + ["three"] * 6) == pytest.approx([1.0])
    assert answer_scores(["3"], ["2"] * 4 + ["three"] * 6) == pytest.approx([1.0])
    assert answer_scores(["the dog"], ["a dog", "Dog", "cat"] + ["bird"] * 7) == pytest.approx([0.6])


def test_comparable_answers_names_what_is_compared():
    assert comparable_answers(" Yes ", ["yes"] * 10) == ("Yes", ["yes"] * 10)
    assert comparable_answers(" Yes ", ["yes", "no"]) == ("yes", ["yes", "no"])


def test_single_reference_is_exact_match_of_the_stripped_strings():
    assert answer_scores(["circle", " circle", "Circle", "square"], ["circle"]) == [1.0, 1.0, 0.0, 0.0]


def test_vqa_accuracy_overall_and_per_type_in_percent():
    result = vqa_accuracy(
        ["2", "yes", "red", "no"],
        [["2"] * 3 + ["3"] * 7, ["yes"] * 10, ["blue"] * 10, ["no"] * 2 + ["yes"] * 8],
        answer_types=["number", "yes/no", "other", "yes/no"],
        question_types=["how many", "is", "what color", "is"],
    )
    assert result["overall"] == pytest.approx(100 * (0.9 + 1.0 + 0.0 + 0.6) / 4)
    assert result["per_answer_type"] == pytest.approx({"number": 90.0, "other": 0.0, "yes/no": 80.0})
    assert result["per_question_type"] == pytest.approx({"how many": 90.0, "is": 80.0, "what color": 0.0})
    bare = vqa_accuracy(["2"], [["2"] * 10])
    assert bare["per_answer_type"] == bare["per_question_type"] == {}


def test_vqa_accuracy_rounds_only_when_asked():
    references = [["cat"] * 1 + ["dog"] * 9, ["cat"] * 10, ["cat"] * 10]
    assert vqa_accuracy(["cat"] * 3, references)["overall"] == pytest.approx(230 / 3)
    assert vqa_accuracy(["cat"] * 3, references, decimals=OFFICIAL_DECIMALS)["overall"] == 76.67


@pytest.mark.parametrize(
    ("predictions", "references", "answer_types", "message"),
    [
        (["a"], [], None, "1 predictions for 0 questions"),
        (["a"], [["a"]], ["x", "y"], "2 answer types"),
        (["a"], [[]], None, "without reference answers"),
        ([], [], None, "no predictions"),
    ],
)
def test_vqa_accuracy_rejects_bad_input(predictions, references, answer_types, message):
    with pytest.raises(ValueError, match=message):
        vqa_accuracy(predictions, references, answer_types)


# ------------------------------------------------------------------------------------------------------ NLVR2


def test_nlvr2_accuracy_and_consistency_group_by_sentence_across_pairs():
    identifiers = ["dev-1-0-0", "dev-1-1-0", "dev-1-0-1", "dev-2-0-0"]  # split-set-pair-sentence
    references = ["True", "False", "True", "True"]
    predictions = [True, False, False, True]  # only sentence 1 of set 1 is wrong
    result = nlvr2_accuracy(predictions, references, identifiers)
    # Groups: dev-1-(sentence 0) both pairs right, dev-1-(sentence 1) wrong, dev-2-(sentence 0) right.
    assert result == pytest.approx({"accuracy": 75.0, "consistency": 200 / 3})


def test_nlvr2_accepts_label_spellings():
    result = nlvr2_accuracy(["true", "FALSE", 1, np.int64(0)], [1, 0, "True", False], ["d-1-0-0"] * 4)
    assert result == {"accuracy": 100.0, "consistency": 100.0}


@pytest.mark.parametrize(
    ("predictions", "identifiers", "message"),
    [
        ([1], ["dev-1-0"], "not of the form"),
        ([2], ["dev-1-0-0"], r"predictions\[0\] = 2"),
        ([1, 1], ["a-1-0-0"], "2 predictions"),
    ],
)
def test_nlvr2_rejects_bad_input(predictions, identifiers, message):
    with pytest.raises(ValueError, match=message):
        nlvr2_accuracy(predictions, [1], identifiers)


# -------------------------------------------------------------------------------------------------- retrieval


def test_retrieval_recall_hand_computed():
    scores = np.array([[0.9, 0.1, 0.8, 0.2], [0.3, 0.7, 0.6, 0.5]])  # 2 images x 4 texts
    # Image 0 (texts 0, 1): best caption 0.9 beats every other text -> rank 0. Image 1 (texts 2, 3): best 0.6 is
    # beaten by text 1 (0.7) -> rank 1. Texts: 0 -> rank 0, 1 -> rank 1 (0.7 > 0.1), 2 -> rank 1, 3 -> rank 0.
    result = retrieval_recall(scores, [0, 0, 1, 1], ks=(1, 2))
    assert result == pytest.approx({"i2t_r1": 50.0, "i2t_r2": 100.0, "t2i_r1": 50.0, "t2i_r2": 100.0, "r_mean": 75.0})


def test_retrieval_ties_count_against_the_query():
    result = retrieval_recall(np.zeros((3, 3)), [0, 1, 2])
    assert result["i2t_r1"] == result["t2i_r1"] == 0.0  # a constant scorer gets no credit at R@1
    assert result["i2t_r5"] == result["t2i_r5"] == 100.0  # 2 wrong candidates tie: rank 2 < 5


@pytest.mark.parametrize(
    ("scores", "text_to_image", "message"),
    [
        (np.zeros((2, 3)), [0, 1], "n_images x n_texts"),
        (np.zeros((2, 2)), [0, 2], "outside the score matrix"),
        (np.zeros((2, 2)), [0, 0], r"images \[1\] have no caption"),
    ],
)
def test_retrieval_rejects_bad_input(scores, text_to_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval_recall(scores, text_to_image)


# ---------------------------------------------------------------------------------------- `evaluate` modules


def test_metric_path_names_known_modules():
    assert set(EVALUATE_MODULES) == {"vqa_accuracy", "nlvr2_accuracy", "retrieval_recall"}
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("bleu")


def test_evaluate_modules_load_from_their_folders_and_match_the_plain_functions(tmp_path, monkeypatch):
    """Each module loads from its local folder (no Hub involved) and returns what its plain function returns."""
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")  # keep ~/.cache untouched
    references = [["2"] * 3 + ["3"] * 7, ["no"] * 10]
    vqa = evaluate.load(metric_path("vqa_accuracy")).compute(
        predictions=["2", "yes"], references=references, answer_types=["number", "yes/no"]
    )
    assert vqa == vqa_accuracy(["2", "yes"], references, ["number", "yes/no"])
    assert vqa["overall"] == pytest.approx(45.0)

    identifiers = ["dev-1-0-0", "dev-1-1-0", "dev-2-0-0"]
    nlvr2 = evaluate.load(metric_path("nlvr2_accuracy")).compute(
        predictions=[1, 0, 0], references=[1, 0, 1], identifiers=identifiers
    )
    assert nlvr2 == pytest.approx({"accuracy": 200 / 3, "consistency": 50.0})

    scores = np.array([[0.9, 0.1, 0.8, 0.2], [0.3, 0.7, 0.6, 0.5]])
    retrieval = evaluate.load(metric_path("retrieval_recall")).compute(
        predictions=scores.T.tolist(), references=[0, 0, 1, 1]
    )
    assert retrieval == pytest.approx(retrieval_recall(scores, [0, 0, 1, 1]))

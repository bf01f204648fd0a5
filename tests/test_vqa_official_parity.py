"""Our VQA accuracy against the official evaluation script itself, on the 8,977 real VQAv2 records of refdata.

The oracle is GT-Vision-Lab/VQA `vqaEval.py` (commit a013f00, the current master) read from ../shared/refdata and
converted to Python 3 in memory (only its `print` statements need it). It reads the ground truth from a `vqa`
object and the predictions from a results object; `OfficialVQA` below is the minimal stand-in for the toolkit's
`VQA` class that it needs (the `qa` / `qqa` indexes and `getQuesIds`). Several prediction sets are scored: the
consensus answers, one raw human answer per question, answers disguised with capitals / punctuation / number words
/ articles / whitespace, and wrong answers.
"""

import functools
import gzip
import io
import json
import os
import random
import re
import types
import warnings
from contextlib import redirect_stdout

import pytest

from modeling_vkood.evaluation import OFFICIAL_DECIMALS, answer_scores, metric_path, vqa_accuracy
from modeling_vkood.evaluation.vqa_normalization import _ARTICLES, _CONTRACTIONS, _NUMBER_WORDS, _PUNCTUATION
from tests.utils.paths import REFDATA

pytestmark = pytest.mark.skipif(
    REFDATA is None and not os.environ.get("VKOOD_REQUIRE_REFDATA"),
    reason="../shared/refdata (real official annotation files) is absent on this machine "
    "(VKOOD_REQUIRE_REFDATA=1 forbids the skip)",
)
TOLERANCE = 1e-9


def load_official_module() -> types.ModuleType:
    """vqaEval.py as a Python 3 module: `print x` -> `print(x)`, `.iteritems()` -> `.items()`, nothing else."""
    source = (REFDATA / "vqa_eval" / "vqaEval.py").read_text(encoding="utf-8")
    source = re.sub(r"^(\s*)print (.+)$", r"\1print(\2)", source, flags=re.M).replace(".iteritems()", ".items()")
    module = types.ModuleType("official_vqa_eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its regex literals are not raw strings ("\d"): a warning only
        exec(compile(source, "vqaEval.py", "exec"), module.__dict__)
    return module


class OfficialVQA:
    """What `VQAEval` reads from the toolkit's `VQA` class: annotations and questions indexed by question id."""

    def __init__(self, annotations: list[dict], questions: list[dict] | None = None):
        self.annotations = annotations
        self.qa = {annotation["question_id"]: annotation for annotation in annotations}
        self.qqa = {question["question_id"]: question for question in questions or []}

    def getQuesIds(self) -> list[int]:  # noqa: N802 (the toolkit's name)
        return [annotation["question_id"] for annotation in self.annotations]


def official_scores(module, annotations: list[dict], questions: list[dict], predictions: list[str]) -> dict:
    """The oracle's accuracies: rounded as it reports them, and unrounded (same expressions, before `round`)."""
    # The oracle normalises the answers in place: give it its own copy of the answer records.
    ground_truth = OfficialVQA([{**a, "answers": [dict(x) for x in a["answers"]]} for a in annotations], questions)
    results = OfficialVQA([{"question_id": a["question_id"], "answer": p} for a, p in zip(annotations, predictions)])
    evaluator = module.VQAEval(ground_truth, results, n=OFFICIAL_DECIMALS)
    unrounded = {}
    report_rounded = evaluator.setAccuracy

    def capture(per_question, per_question_type, per_answer_type):
        def percent(values):
            return 100 * float(sum(values)) / len(values)

        unrounded["overall"] = percent(per_question)
        unrounded["per_answer_type"] = {t: percent(v) for t, v in per_answer_type.items()}
        unrounded["per_question_type"] = {t: percent(v) for t, v in per_question_type.items()}
        report_rounded(per_question, per_question_type, per_answer_type)

    evaluator.setAccuracy = capture
    with redirect_stdout(io.StringIO()):  # its progress bar
        evaluator.evaluate()
    return {"rounded": evaluator.accuracy, "unrounded": unrounded, "per_question": evaluator.evalQA}


@pytest.fixture(scope="module")
def official():
    return load_official_module()


@pytest.fixture(scope="module")
def records():
    annotations = json.loads(gzip.open(REFDATA / "vqav2" / "vqa_annotatons_valid.gzip").read())["annotations"]
    questions = json.loads(gzip.open(REFDATA / "vqav2" / "vqa_questions_valid.gzip").read())["questions"]
    assert len(annotations) == len(questions) == 8977
    return annotations, questions


@pytest.fixture(scope="module")
def oracle(official, records):
    """Prediction set name -> (predictions, the oracle's scores), each set scored by the oracle once per module."""
    annotations, questions = records
    sets = prediction_sets(annotations)

    @functools.cache
    def score(name: str) -> tuple[list[str], dict]:
        return sets[name], official_scores(official, annotations, questions, sets[name])

    return score


_NUMBER_NAMES = {digit: word for word, digit in _NUMBER_WORDS.items() if word != "none"}


def disguise(answer: str, rng: random.Random) -> str:
    """The same answer as a model might write it: capitals, punctuation, number words, articles, whitespace."""
    form = rng.randrange(9)
    if form == 0:
        return answer.capitalize()
    if form == 1:
        return answer.upper() + "!"
    if form == 2:
        return " ".join(_NUMBER_NAMES.get(word, word) for word in answer.split())
    if form == 3:
        return rng.choice(["the ", "a ", "an "]) + answer + "."
    if form == 4:
        return f'"{answer}"'
    if form == 5:
        return "\t" + answer.replace(" ", "-") + "\n"
    if form == 6:
        return answer.replace("'", "") + "?"
    if form == 7:
        return re.sub(r"(\d)(\d{3})\b", r"\1,\2", answer) + " ,"
    return f"({answer}); {answer}/{answer}"


def prediction_sets(annotations: list[dict]) -> dict[str, list[str]]:
    rng = random.Random(0)
    consensus = [a["multiple_choice_answer"] for a in annotations]
    one_human = [a["answers"][i % 10]["answer"] for i, a in enumerate(annotations)]
    return {
        "multiple_choice_answer": consensus,
        "one_raw_human_answer": one_human,
        "disguised": [disguise(rng.choice([c, h]), rng) for c, h in zip(consensus, one_human)],
        "wrong_or_mixed": [
            rng.choice([consensus[i - 1], consensus[i], "", "zero", "Yes", "NO", "two dogs", one_human[i - 7]])
            for i in range(len(annotations))
        ],
    }


def test_tables_equal_the_official_ones(official, records):
    evaluator = official.VQAEval(OfficialVQA(records[0][:1]), OfficialVQA([]))
    assert _CONTRACTIONS == evaluator.contractions
    assert list(_PUNCTUATION) == evaluator.punct
    assert _NUMBER_WORDS == evaluator.manualMap and _ARTICLES == set(evaluator.articles)


@pytest.mark.parametrize("name", ["multiple_choice_answer", "one_raw_human_answer", "disguised", "wrong_or_mixed"])
def test_accuracy_equals_the_official_script(oracle, records, name):
    annotations, _ = records
    predictions, expected = oracle(name)
    references = [[answer["answer"] for answer in a["answers"]] for a in annotations]
    answer_types = [a["answer_type"] for a in annotations]
    question_types = [a["question_type"] for a in annotations]
    ours = vqa_accuracy(predictions, references, answer_types, question_types)

    per_question = {
        a["question_id"]: round(100 * answer_scores([p], r)[0], OFFICIAL_DECIMALS)
        for a, p, r in zip(annotations, predictions, references)
    }
    assert per_question == expected["per_question"]
    unrounded = expected["unrounded"]
    assert ours["overall"] == pytest.approx(unrounded["overall"], abs=TOLERANCE)
    assert ours["per_answer_type"].keys() == unrounded["per_answer_type"].keys() == {"yes/no", "number", "other"}
    for kind in ("per_answer_type", "per_question_type"):
        assert ours[kind] == pytest.approx(unrounded[kind], abs=TOLERANCE)
    rounded = vqa_accuracy(predictions, references, answer_types, question_types, decimals=OFFICIAL_DECIMALS)
    assert rounded["overall"] == expected["rounded"]["overall"]
    assert rounded["per_answer_type"] == expected["rounded"]["perAnswerType"]
    assert rounded["per_question_type"] == expected["rounded"]["perQuestionType"]
    if name != "multiple_choice_answer":  # the sets are hard enough to tell the rules apart
        assert 0 < ours["overall"] < 100


def test_evaluate_module_loaded_offline_equals_the_official_script(oracle, records, tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")  # keep ~/.cache untouched
    annotations, _ = records
    metric = evaluate.load(metric_path("vqa_accuracy"))
    references = [[answer["answer"] for answer in a["answers"]] for a in annotations]
    answer_types = [a["answer_type"] for a in annotations]
    question_types = [a["question_type"] for a in annotations]
    for name in ("one_raw_human_answer", "disguised"):
        predictions, scores = oracle(name)
        expected = scores["unrounded"]
        result = metric.compute(
            predictions=predictions, references=references, answer_types=answer_types, question_types=question_types
        )
        assert result["overall"] == pytest.approx(expected["overall"], abs=TOLERANCE)
        assert result["per_answer_type"] == pytest.approx(expected["per_answer_type"], abs=TOLERANCE)
        assert result["per_question_type"] == pytest.approx(expected["per_question_type"], abs=TOLERANCE)

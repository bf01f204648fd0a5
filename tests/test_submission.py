"""Official-format prediction files: the writers, `train.py --predict_split` on tiny runs, and the files read back
the way the official tools read them.

The readers below re-implement, from their published logic, how the VQA toolkit's `VQA.loadRes` (used by the
evaluation server) and NLVR2's `nlvr2/eval/metrics.py` parse a submission.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from modeling_vkood.evaluation import nlvr2_accuracy, vqa_accuracy
from modeling_vkood.evaluation.submission import (
    official_question_ids,
    vqa_results,
    write_nlvr2_predictions,
    write_vqa_results,
)
from modeling_vkood.training.predictions import official_ids
from tests.utils.generated_data import draw, write_nlvr2
from tests.utils.paths import REFDATA
from tests.utils.tiny import tiny_decoder_config
from tests.utils.train_script import read_results, tiny_config, train

# ------------------------------------------------------------------------------- the official tools' readers


def read_as_vqa_server(path: Path, question_ids: list[int]) -> dict[int, str]:
    """`VQA.loadRes`: a JSON list of objects whose question ids are exactly the split's; question id -> answer."""
    results = json.loads(path.read_text())
    assert type(results) is list, "results is not an array of objects"
    assert {result["question_id"] for result in results} == set(question_ids), "results do not match the split"
    assert all(type(result["question_id"]) is int and type(result["answer"]) is str for result in results)
    return {result["question_id"]: result["answer"] for result in results}


def read_as_nlvr2_metrics(path: Path, labeled_examples: list[dict]) -> dict[str, float]:
    """NLVR2's metrics.py: every line `identifier,prediction`; a prediction is right when it equals the label
    ignoring case; consistency per sentence, the identifier's pair field blanked."""
    predictions = {}
    for line in path.read_text().splitlines(keepends=True):
        if line:
            identifier, prediction = line.strip().split(",")[:2]
            predictions[identifier] = prediction
    assert len(predictions) >= len(labeled_examples), "Some predictions are missing!"
    correct, consistent = 0, {}
    for example in labeled_examples:
        parts = example["identifier"].split("-")
        parts[2] = ""
        sentence = "-".join(parts)
        consistent.setdefault(sentence, True)
        if predictions[example["identifier"]].lower() == example["label"].lower():
            correct += 1
        else:
            consistent[sentence] = False
    return {"precision": correct / len(labeled_examples), "consistency": sum(consistent.values()) / len(consistent)}


# ------------------------------------------------------------------------------------------------ the writers


def test_vqa_results_file_has_every_question_once(tmp_path):
    path = write_vqa_results(tmp_path / "out" / "results.json", np.array([3, 1, 2]), ["yes", "2", "red"], [1, 2, 3])
    assert json.loads(path.read_text()) == [
        {"question_id": 3, "answer": "yes"},
        {"question_id": 1, "answer": "2"},
        {"question_id": 2, "answer": "red"},
    ]
    assert read_as_vqa_server(path, [1, 2, 3]) == {1: "2", 2: "red", 3: "yes"}
    assert not list(tmp_path.glob("out/*.tmp"))


@pytest.mark.parametrize(
    ("question_ids", "answers", "expected", "message"),
    [
        ([1, 1], ["a", "b"], None, "1 question_ids appear more than once"),
        ([1, 2], ["a", "b"], [1, 2, 3], r"1 missing \(e.g. \[3\]\), 0 not in the split"),
        ([1, 4], ["a", "b"], [1], r"0 missing .* 1 not in the split \(e.g. \[4\]\)"),
        ([1], ["a", "b"], None, "2 answers for 1 questions"),
        ([1], [7], None, "must be a string"),
    ],
)
def test_vqa_results_reject_what_the_server_would_reject(question_ids, answers, expected, message):
    with pytest.raises(ValueError, match=message):
        vqa_results(question_ids, answers, expected)


def test_official_question_ids_read_the_questions_file(tmp_path):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps({"task_type": "Open-Ended", "questions": [{"question_id": 5}, {"question_id": 9}]}))
    assert official_question_ids(path) == [5, 9]


def test_nlvr2_csv_reads_as_the_official_metrics_script(tmp_path):
    identifiers = ["dev-1-0-0", "dev-1-1-0", "dev-2-0-1"]
    path = write_nlvr2_predictions(tmp_path / "predictions.csv", identifiers, [1, np.int64(0), "True"], identifiers)
    assert path.read_text() == "dev-1-0-0,True\ndev-1-1-0,False\ndev-2-0-1,True\n"
    labeled = [{"identifier": i, "label": label} for i, label in zip(identifiers, ["True", "True", "True"])]
    assert read_as_nlvr2_metrics(path, labeled) == {"precision": pytest.approx(2 / 3), "consistency": 0.5}


@pytest.mark.parametrize(
    ("identifiers", "predictions", "expected", "message"),
    [
        (["a-1-0-0"], [2], None, "must be 0/1"),
        (["a-1-0-0"], ["yes"], None, "must be 0/1"),
        (["a-1-0-0", "a-1-0-0"], [1, 0], None, "1 identifiers appear more than once"),
        (["a-1-0-0"], [1], ["a-1-0-0", "a-1-1-0"], "1 missing"),
        (["a,1"], [1], None, "cannot hold a comma"),
    ],
)
def test_nlvr2_predictions_reject_bad_input(tmp_path, identifiers, predictions, expected, message):
    with pytest.raises(ValueError, match=message):
        write_nlvr2_predictions(tmp_path / "p.csv", identifiers, predictions, expected)


@pytest.mark.skipif(
    REFDATA is None and not os.environ.get("VKOOD_REQUIRE_REFDATA"),
    reason="../shared/refdata (real official annotation files) is absent on this machine "
    "(VKOOD_REQUIRE_REFDATA=1 forbids the skip)",
)
def test_nlvr2_metrics_on_the_real_dev_file_equal_ours(tmp_path):
    examples = [json.loads(line) for line in (REFDATA / "nlvr2" / "dev.json").read_text().splitlines() if line]
    identifiers = [example["identifier"] for example in examples]
    rng = np.random.default_rng(0)
    truth = np.array([example["label"] == "True" for example in examples])
    predictions = np.where(rng.random(len(examples)) < 0.8, truth, ~truth).astype(int)  # about 80 % right
    path = write_nlvr2_predictions(tmp_path / "dev.csv", identifiers, predictions, identifiers)
    official = read_as_nlvr2_metrics(path, examples)
    ours = nlvr2_accuracy(predictions.tolist(), [example["label"] for example in examples], identifiers)
    assert ours["accuracy"] == pytest.approx(100 * official["precision"], abs=1e-9)
    assert ours["consistency"] == pytest.approx(100 * official["consistency"], abs=1e-9)
    assert 70 < ours["accuracy"] < 90 and ours["consistency"] < ours["accuracy"]


# ------------------------------------------------------------------------------------ train.py --predict_split


def write_vqav2_with_test_questions(root: Path) -> list[int]:
    """Official VQAv2 files: 18 annotated train questions ("yes" / "no" 9 times each, the vocabulary threshold)
    and 5 test2015 questions with no annotation file, as the release has them; returns the test question ids."""
    documents = {"train2014": [], "test2015": []}
    annotations = []
    for index in range(18):
        image_id, answer = 1 + index // 3, "yes" if index % 2 else "no"
        question_id = image_id * 1000 + index % 3
        documents["train2014"].append(
            {"image_id": image_id, "question": f"is there a red shape {index}?", "question_id": question_id}
        )
        answers = [{"answer": answer, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]
        annotations.append(
            {
                "image_id": image_id,
                "question_id": question_id,
                "answers": answers,
                "answer_type": "yes/no",
                "question_type": "is there",
                "multiple_choice_answer": answer,
            }
        )
    for index in range(5):
        documents["test2015"].append(
            {
                "image_id": 500 + index // 2,
                "question": "is there a blue shape?",
                "question_id": (500 + index // 2) * 1000 + index % 2,
            }
        )
    for subtype, questions in documents.items():
        header = {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype}
        questions_file = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        questions_file.write_text(json.dumps({**header, "questions": questions}))
        for image_id in {question["image_id"] for question in questions}:
            (root / subtype).mkdir(parents=True, exist_ok=True)
            draw("circle", "red").save(root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg")
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return [question["question_id"] for question in documents["test2015"]]


def test_train_py_predicts_vqav2_test_questions_in_the_results_format(workdir, tiny_text_model):
    root = workdir / "vqav2_submission"
    root.mkdir()
    test_ids = write_vqav2_with_test_questions(root)
    output = workdir / "vqav2_predict_out"
    config = tiny_config(
        workdir,
        tiny_text_model,
        task="vqa",
        dataset="vqav2",
        dataset_root=str(root),
        max_steps=1,
        do_eval=False,
        predict_split="test",
    )
    train.main([str(config), "--output_dir", str(output)])
    answers = read_as_vqa_server(output / "predictions_test.json", test_ids)
    assert len(json.loads((output / "predictions_test.json").read_text())) == len(test_ids) == 5
    assert set(answers.values()) <= {"yes", "no"}  # answers come from the model's answer vocabulary
    # The file was checked against the official questions file, not only against the built rows.
    assert official_ids(SimpleNamespace(dataset="vqav2", dataset_root=str(root)), "test") == test_ids


def generative_vqav2_config(workdir, tiny_text_model, root, **overrides):
    return tiny_config(
        workdir,
        tiny_text_model,
        task="generative_vqa",
        dataset="vqav2",
        dataset_root=str(root),
        decoder_config=tiny_decoder_config(),
        generation_max_new_tokens=3,
        **overrides,
    )


@pytest.mark.slow
def test_train_py_predicts_vqav2_test_questions_with_the_generative_head(workdir, tiny_text_model):
    root = workdir / "vqav2_generative_submission"
    root.mkdir()
    test_ids = write_vqav2_with_test_questions(root)
    output = workdir / "vqav2_generative_predict_out"
    config = generative_vqav2_config(workdir, tiny_text_model, root, max_steps=1, do_eval=False, predict_split="test")
    train.main([str(config), "--output_dir", str(output)])
    read_as_vqa_server(output / "predictions_test.json", test_ids)  # one string answer per official test question
    assert len(json.loads((output / "predictions_test.json").read_text())) == len(test_ids) == 5


@pytest.mark.slow
def test_generated_predictions_score_what_the_generative_evaluation_scores(workdir, tiny_text_model):
    """Predicting the evaluated split: the file's answers, scored with the official accuracy, give eval's figure."""
    root = workdir / "vqav2_generative_scored"
    root.mkdir()
    write_vqav2_with_test_questions(root)
    output = workdir / "vqav2_generative_scored_out"
    config = generative_vqav2_config(
        workdir,
        tiny_text_model,
        root,
        max_steps=30,
        eval_split="train",
        predict_split="train",
        learning_rate=1e-2,
        new_modules_learning_rate=1e-2,
        lr_scheduler_type="constant",
        per_device_train_batch_size=6,
    )
    train.main([str(config), "--output_dir", str(output)])
    annotations = json.loads((root / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    answers = read_as_vqa_server(output / "predictions_train.json", [a["question_id"] for a in annotations])
    references = [[answer["answer"] for answer in a["answers"]] for a in annotations]
    official = vqa_accuracy([answers[a["question_id"]] for a in annotations], references)["overall"]
    assert official == pytest.approx(read_results(output)["eval_vqa_accuracy"])
    assert any(answers.values())  # the decoder generated text, not only end tokens


@pytest.mark.slow
def test_train_py_predicts_nlvr2_as_the_official_csv_and_its_score_is_the_eval_score(workdir, tiny_text_model):
    root = write_nlvr2(workdir / "nlvr2_submission")
    # 9 True / 3 False: a mix-up of the two labels in the file would then show as 100 - accuracy.
    examples = [json.loads(line) for line in (root / "dev.json").read_text().splitlines() if line]
    examples = [{**example, "label": "True" if index < 9 else "False"} for index, example in enumerate(examples)]
    (root / "dev.json").write_text("".join(json.dumps(example) + "\n" for example in examples))
    output, path = workdir / "nlvr2_predict_out", workdir / "submissions" / "dev.csv"
    config = tiny_config(
        workdir,
        tiny_text_model,
        task="nlvr2",
        dataset="nlvr2",
        dataset_root=str(root),
        image_root=str(root / "images"),
        max_steps=1,
        predict_split="validation",
        predictions_file=str(path),
    )
    train.main([str(config), "--output_dir", str(output)])
    official = read_as_nlvr2_metrics(path, examples)
    assert len(path.read_text().splitlines()) == len(examples) == 12
    results = read_results(output)
    assert results["eval_nlvr2_accuracy"] == pytest.approx(100 * official["precision"])
    assert results["eval_nlvr2_consistency"] == pytest.approx(100 * official["consistency"])
    assert official["precision"] != 0.5


def test_predict_split_is_refused_for_retrieval():
    from modeling_vkood.training import DataArguments

    with pytest.raises(ValueError, match="retrieval has no such format"):
        DataArguments(task="retrieval", predict_split="test")

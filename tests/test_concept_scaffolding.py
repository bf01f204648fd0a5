"""benchmarks/concept_scaffolding.py on a few questions and a WordNet-format vocabulary: where the slots go before and
after scaffolding is left out, and the results and provenance files it writes."""

import gzip
import json

from benchmarks import concept_scaffolding

QUESTIONS = [
    "What color is the car?",
    "Is the man holding a bat?",
    "What time is it?",
    "How many dogs are on the couch?",
]
LEMMAS = {
    "noun": ["car", "man", "bat", "color", "time", "dog", "couch", "ice_cream"],
    "verb": ["hold", "holding"],
    "adj": ["red"],
    "adv": ["very"],
}


def test_the_benchmark_counts_the_slots_scaffolding_takes(tmp_path):
    with gzip.open(tmp_path / "questions.gzip", "wt", encoding="utf-8") as handle:
        json.dump({"questions": [{"question": q, "question_id": i} for i, q in enumerate(QUESTIONS)]}, handle)
    wordnet = tmp_path / "wordnet"
    wordnet.mkdir()
    for part, lemmas in LEMMAS.items():  # the licence header's lines start with spaces, as in WordNet's files
        lines = [
            "  1 This software and database is being provided",
            *(f"{lemma} n 1 1 @ 1 0 00000001" for lemma in lemmas),
        ]
        (wordnet / f"index.{part}").write_text("\n".join(lines) + "\n")
    out = tmp_path / "results" / "results.json"
    argv = ["--questions", str(tmp_path / "questions.gzip"), "--wordnet", str(wordnet), "--out", str(out)]

    report = concept_scaffolding.main(argv)

    assert json.loads(out.read_text()) == report and report["questions"] == 4
    before, after = report["before"], report["after"]
    # 16 slots dealt round-robin over 5 relation groups per concept, in order: color 10 of "what color is the car"
    # (car 6), time all 16 of "what time is it", holding 5 of "is the man holding a bat" (man 6, bat 5)
    assert before["issue_words"]["color"]["question_share"] == 0.25
    assert before["scaffolding_slots"] == 10 + 16 + 5
    assert before["questions_without_items"] == 0
    assert after["scaffolding_slots"] == 0 and after["questions_without_items"] == 1  # "what time is it?"
    assert after["mean_object_slots_per_question"] > before["mean_object_slots_per_question"]
    assert report["object_concepts_lost"] == 0 and report["questions_changed"] == 3
    assert {"question": "Is the man holding a bat?", "before": ["man", "holding", "bat"], "after": ["man", "bat"]} in (
        report["examples"]
    )
    (run,) = json.loads((out.parent / "provenance.json").read_text())["runs"]
    assert run["outputs"] == ["results.json"] and run["arguments"]["wordnet"] == str(wordnet)

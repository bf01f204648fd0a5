"""Question scaffolding in retrieval: the share of knowledge slots that go to words of the question frame.

With a vocabulary as large as ConceptNet's, words that say how a VQA question asks ("what color is", "is the man
holding") are concepts too, and retrieval gives them item slots that the question's objects would otherwise get.
This runs the real retrieval (`KnowledgeIndex.retrieve`, 16 slots dealt round-robin over (concept, relation)
groups) on every real VQAv2 question of ../shared/refdata, once keeping scaffolding (`scaffolding=()`, extraction as
it was before) and once leaving it out (the default `SCAFFOLDING`), and counts where the slots go.

The full ConceptNet dump is not available offline, so the vocabulary is WordNet 3.0's (Debian `wordnet-base`: every
noun, verb, adjective and adverb lemma, 146,665 names). ConceptNet 5.7 imports WordNet, so every one of these is a
ConceptNet node; ConceptNet has more (phrases, inflected forms), so this is a lower bound on what it matches. Every
concept found gets the same edges (`DEFAULT_PER_RELATION` per default relation, as ConceptNet's common words have
at least), so the slot counts measure what extraction decides, not which words the graph happens to know well.

    python benchmarks/concept_scaffolding.py

Prints the JSON and writes it to benchmarks/results/concept_scaffolding/results.json (or `--out`), with the
commit, command and arguments in that folder's provenance.json (benchmarks/provenance.py).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import provenance
from modeling_vkood import knowledge_vkood
from modeling_vkood.knowledge import DEFAULT_RELATIONS, KnowledgeBase
from modeling_vkood.knowledge.concepts import SCAFFOLDING, extract_concepts, normalize_name
from modeling_vkood.knowledge_vkood import DEFAULT_MAX_ITEMS, DEFAULT_PER_RELATION, index_from_edge_lines

QUESTIONS = REPO_ROOT.parent / "shared" / "refdata" / "vqav2" / "vqa_questions_valid.gzip"
WORDNET = Path("/usr/share/wordnet")
OUT = REPO_ROOT / "benchmarks" / "results" / "concept_scaffolding" / "results.json"
# The words the issue counted (question share on 3,000 questions, full ConceptNet vocabulary): color 10%, person 6.6%,
# man 6.2%, wearing 3.6%, holding 2%. "person" and "man" are kept on purpose (they name what is in the image).
ISSUE_WORDS = ("color", "person", "man", "wearing", "holding")
SETTINGS = {"before": (), "after": SCAFFOLDING}
TOP = 25


def load_questions(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [record["question"] for record in json.load(handle)["questions"]]


def wordnet_vocabulary(folder: Path) -> frozenset[str]:
    """Every lemma of WordNet's four index files, in the index's normal form ("ice_cream" -> "ice cream")."""
    names = set()
    for part in ("noun", "verb", "adj", "adv"):
        path = folder / f"index.{part}"
        if not path.is_file():
            raise SystemExit(f"{path} not found: install WordNet 3.0 (apt-get install wordnet-base) or pass --wordnet")
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if not line.startswith(" "):  # the licence header lines start with spaces
                    names.add(normalize_name(line.split(" ", 1)[0].replace("_", " ")))
    names.discard("")
    return frozenset(names)


def stand_in_index(concepts: set[str], folder: Path) -> knowledge_vkood.KnowledgeIndex:
    """An index whose heads are `concepts`, each with `DEFAULT_PER_RELATION` edges in every default relation.

    Its vocabulary is only the concepts the questions can reach, which the caller checks gives the same matches as
    the whole WordNet vocabulary (matching only looks up n-grams of the text)."""
    path = folder / "edges.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for concept in sorted(concepts):
            for relation in DEFAULT_RELATIONS:
                for k in range(DEFAULT_PER_RELATION):
                    edge = {"head": concept, "relation": relation, "tail": f"tail {k}", "weight": 1.0 - k / 10}
                    handle.write(json.dumps(edge) + "\n")
    return KnowledgeBase(index_from_edge_lines(path, cache_dir=folder))


def measure(questions: list[str], index, scaffolding) -> dict:
    """Where the slots of `index.retrieve` go over `questions` when extraction passes over `scaffolding`."""
    slots, questions_with = Counter(), Counter()
    empty = 0
    extract = functools.partial(extract_concepts, scaffolding=scaffolding)
    with mock.patch.object(knowledge_vkood, "extract_concepts", extract):
        for question in questions:
            items = index.retrieve(question, max_items=DEFAULT_MAX_ITEMS)
            heads = Counter(item.head for item in items)
            slots.update(heads)
            questions_with.update(heads.keys())
            empty += not items
    total = sum(slots.values())
    scaffold = sum(count for concept, count in slots.items() if concept in SCAFFOLDING)
    object_pairs = sum(count for concept, count in questions_with.items() if concept not in SCAFFOLDING)
    n = len(questions)
    return {
        "slots": total,
        "scaffolding_slots": scaffold,
        "scaffolding_slot_share": round(scaffold / total, 4),
        "questions_with_a_scaffolding_concept": sum(
            1 for q in questions if any(c in SCAFFOLDING for c in extract_concepts(q, index, scaffolding=scaffolding))
        ),
        "questions_without_items": empty,
        "mean_concepts_with_slots": round(sum(questions_with.values()) / n, 3),
        "mean_object_slots_per_question": round((total - scaffold) / n, 3),
        "mean_slots_per_object_concept": round((total - scaffold) / object_pairs, 3),
        "issue_words": {
            word: {"question_share": round(questions_with[word] / n, 4), "slot_share": round(slots[word] / total, 4)}
            for word in ISSUE_WORDS
        },
        "top_scaffolding_by_slot_share": {
            concept: round(count / total, 4) for concept, count in slots.most_common() if concept in SCAFFOLDING
        }
        if scaffold
        else {},
        "top_concepts_by_question_share": {
            concept: round(count / n, 4) for concept, count in questions_with.most_common(TOP)
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=Path, default=QUESTIONS, help="VQAv2 questions file (gzip JSON)")
    parser.add_argument("--wordnet", type=Path, default=WORDNET, help="folder of WordNet 3.0's index.* files")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    run = provenance.begin(args, argv=None if argv is None else [__file__, *argv])
    started = time.perf_counter()

    questions = load_questions(args.questions)
    vocabulary = wordnet_vocabulary(args.wordnet)
    found = {
        setting: [extract_concepts(q, vocabulary, scaffolding=s) for q in questions] for setting, s in SETTINGS.items()
    }
    reachable = {concept for concepts in found["before"] for concept in concepts}
    with tempfile.TemporaryDirectory() as folder, stand_in_index(reachable, Path(folder)) as index:
        for setting, scaffolding in SETTINGS.items():  # the stand-in index matches as the whole vocabulary does
            assert all(
                extract_concepts(q, index, scaffolding=scaffolding) == concepts
                for q, concepts in zip(questions, found[setting])
            ), setting
        results = {setting: measure(questions, index, scaffolding) for setting, scaffolding in SETTINGS.items()}
    changed = [(q, b, a) for q, b, a in zip(questions, found["before"], found["after"]) if b != a]
    report = {
        "questions": len(questions),
        "questions_file": str(args.questions),
        "vocabulary": f"WordNet 3.0 lemmas (noun, verb, adj, adv): {len(vocabulary):,}, standing in for ConceptNet",
        "concepts_reached": len(reachable),
        "retrieval": {
            "max_items": DEFAULT_MAX_ITEMS,
            "per_relation": DEFAULT_PER_RELATION,
            "relations": list(DEFAULT_RELATIONS),
            "edges_per_concept": len(DEFAULT_RELATIONS) * DEFAULT_PER_RELATION,
        },
        "scaffolding_words": sorted(SCAFFOLDING),
        **results,
        "questions_changed": len(changed),
        # must be 0: leaving scaffolding out drops nothing else (matching takes the same n-grams either way)
        "object_concepts_lost": sum(len(set(b) - SCAFFOLDING - set(a)) for _, b, a in changed),
        "examples": [{"question": q, "before": b, "after": a} for q, b, a in changed[:12]],
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    provenance.record(args.out.parent, run, outputs=[args.out.name])
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

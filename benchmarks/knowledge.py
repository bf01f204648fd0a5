"""Knowledge index benchmark: build time and size on a ConceptNet-sized dump, retrieval throughput on VQA questions.

The real conceptnet-assertions-5.7.0.csv.gz has 34,074,917 lines; the issue counts 3.4 million English edges in
the five default relations among them. This writes a synthetic dump in the exact release format with those
proportions at `--scale` (1.0 = full size), builds the index, and extrapolates build time and size linearly to
full scale (the build is one streaming pass plus a sort, so it is close to linear). Retrieval is timed in one
process on the real VQAv2 questions from ../shared/refdata when present (else on generated questions), once
with cold caches and once warm, against the synthetic index and against the bundled starter graph; the one-time
vocabulary load per process is timed apart and extrapolated linearly.

    python benchmarks/knowledge.py --scale 0.05

Writes the JSON to benchmarks/results/knowledge/knowledge.json (or `--out`) and records the commit, command and
arguments in that folder's provenance.json (benchmarks/provenance.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from modeling_vkood.knowledge import DEFAULT_RELATIONS, KnowledgeBase
from modeling_vkood.knowledge.concepts import STOP_WORDS, tokenize

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import provenance

FULL_LINES = 34_074_917
FULL_ENGLISH_DEFAULT_EDGES = 3_400_000
DEFAULT_RELATION_SHARE = {"IsA": 0.5, "UsedFor": 0.15, "AtLocation": 0.15, "PartOf": 0.12, "HasA": 0.08}
OTHER_RELATIONS = (
    "Antonym",
    "DerivedFrom",
    "EtymologicallyRelatedTo",
    "ExternalURL",
    "FormOf",
    "HasContext",
    "RelatedTo",
    "Synonym",
)
OTHER_LANGUAGES = ("de", "es", "fr", "it", "ja", "nl", "pt", "ru", "zh")
QUESTIONS = Path(__file__).resolve().parent.parent.parent / "shared" / "refdata" / "vqav2" / "vqa_questions_valid.gzip"
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def load_questions(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [record["question"] for record in json.load(f)["questions"]]


def generated_questions(words: list[str], count: int, rng: random.Random) -> list[str]:
    templates = (
        "What color is the {}?",
        "Is there a {} near the {}?",
        "What is the {} used for?",
        "How many {}s are on the {}?",
        "Where is the {} in this picture?",
    )
    return [rng.choice(templates).format(*rng.sample(words, 2)) for _ in range(count)]


def invented_word(rng: random.Random) -> str:
    return "".join(rng.choices(SYLLABLES, k=rng.randint(2, 4)))


def info_json(weight: float, dataset: str, rng: random.Random) -> str:
    return json.dumps(
        {
            "dataset": dataset,
            "license": "cc:by/4.0",
            "sources": [
                {
                    "activity": "/s/activity/omcs/omcs1_possibly_free_text",
                    "contributor": f"/s/contributor/omcs/user{rng.randint(1, 9999)}",
                }
            ],
            "weight": weight,
        }
    )


def edge(relation: str, start: str, end: str, info: str) -> str:
    return f"/a/[/r/{relation}/,{start}/,{end}/]\t/r/{relation}\t{start}\t{end}\t{info}\n"


def english_uri(name: str, rng: random.Random) -> str:
    """Concept URI with the release's mix of bare, POS-tagged and sense-tagged forms."""
    suffix = rng.choice(("", "", "/n", "/n/wn/artifact", "/v"))
    return f"/c/en/{name.replace(' ', '_')}{suffix}"


def write_synthetic_dump(path: Path, scale: float, seed_words: list[str], rng: random.Random) -> dict:
    """Write the dump one relation block at a time (each sorted by edge URI, as in the release) to bound memory."""
    english_edges = round(FULL_ENGLISH_DEFAULT_EDGES * scale)
    other_lines = round(FULL_LINES * scale) - english_edges
    # About one head per three edges; the question words are frequent heads, invented words the long tail.
    invented = [
        invented_word(rng) + (" " + invented_word(rng) if rng.random() < 0.3 else "") for _ in range(english_edges // 3)
    ]
    heads = seed_words + invented
    head_weights = [20.0] * len(seed_words) + [1.0] * len(invented)
    tails = seed_words + invented[: len(invented) // 4]
    relations = sorted(OTHER_RELATIONS + tuple(DEFAULT_RELATION_SHARE))
    filler_per_relation, filler_remainder = divmod(other_lines, len(relations))
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for index, relation in enumerate(relations):
            block = []
            english = round(english_edges * DEFAULT_RELATION_SHARE.get(relation, 0.0))
            for head in rng.choices(heads, weights=head_weights, k=english):
                weight = rng.choice((0.5, 1.0, 1.0, 2.0, 2.828, 3.464))
                block.append(
                    edge(
                        relation,
                        english_uri(head, rng),
                        english_uri(rng.choice(tails), rng),
                        info_json(weight, "/d/conceptnet/4/en", rng),
                    )
                )
            for _ in range(filler_per_relation + (index < filler_remainder)):
                if relation in DEFAULT_RELATION_SHARE or rng.random() < 0.6:
                    language = rng.choice(OTHER_LANGUAGES)  # default relations appear here only in other languages
                    start, end = f"/c/{language}/{invented_word(rng)}", f"/c/{language}/{invented_word(rng)}/n"
                else:
                    start, end = english_uri(rng.choice(heads), rng), english_uri(invented_word(rng), rng)
                block.append(edge(relation, start, end, info_json(1.0, "/d/wiktionary/en", rng)))
            f.writelines(sorted(block))
    return {"lines": english_edges + other_lines, "english_default_edges": english_edges}


def time_retrieval(kb: KnowledgeBase, questions: list[str]) -> dict:
    """One-time open cost (the vocabulary load), then questions/s with cold and with warm caches."""
    kb.close()  # drop connection and caches: the first pass pays for every SQL query
    started = time.perf_counter()
    len(kb)  # loads the vocabulary, as each worker process does once
    open_s = time.perf_counter() - started
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        results = kb.retrieve_batch(questions)
        timings.append(time.perf_counter() - started)
    return {
        "open_s": round(open_s, 3),
        "questions": len(questions),
        "questions_per_s_cold": round(len(questions) / timings[0]),
        "questions_per_s_warm": round(len(questions) / timings[1]),
        "mean_items": round(sum(map(len, results)) / len(questions), 2),
        "share_with_knowledge": round(sum(bool(r) for r in results) / len(questions), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.05, help="fraction of the full dump size (default 1/20)")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the dump and index (default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "knowledge" / "knowledge.json"
    )
    args = parser.parse_args()
    run = provenance.begin(args)
    rng = random.Random(args.seed)

    questions = load_questions(QUESTIONS)
    source = "vqav2 refdata" if questions else "generated"
    question_words = sorted({t for q in questions or [] for t in tokenize(q) if t not in STOP_WORDS and len(t) > 2})
    seed_words = question_words or sorted({w for w in DEFAULT_RELATION_SHARE} | {"cup", "dog", "table", "car"})
    questions = questions or generated_questions(seed_words, 10_000, rng)

    with tempfile.TemporaryDirectory() as temp:
        workdir = args.workdir or Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        dump = workdir / "synthetic-conceptnet-assertions.csv.gz"
        started = time.perf_counter()
        written = write_synthetic_dump(dump, args.scale, seed_words, rng)
        generate_s = time.perf_counter() - started
        dump_mb = dump.stat().st_size / 2**20

        started = time.perf_counter()
        report = KnowledgeBase.build(dump, workdir / "index.sqlite", force=True)
        build_s = time.perf_counter() - started
        index_mb = (workdir / "index.sqlite").stat().st_size / 2**20
        with KnowledgeBase.open(workdir / "index.sqlite") as kb:
            synthetic = time_retrieval(kb, questions)
        with KnowledgeBase.starter(cache_dir=workdir / "cache") as kb:
            starter = time_retrieval(kb, questions)

    summary = {
        "scale": args.scale,
        "dump": {**written, "gzip_mb": round(dump_mb, 1), "generate_s": round(generate_s, 1)},
        "build": {
            "seconds": round(build_s, 2),
            "seconds_extrapolated_full_scale": round(build_s / args.scale, 1),
            "target_full_scale_s": 600,
            "index_mb": round(index_mb, 1),
            "index_mb_extrapolated_full_scale": round(index_mb / args.scale),
            "kept": report.kept,
            "edges": report.edges,
            "concepts": report.concepts,
            "malformed": report.malformed,
            "skipped_language": report.skipped_language,
            "skipped_relation": report.skipped_relation,
        },
        "retrieval": {
            "questions_source": source,
            "target_questions_per_s": 3000,
            "synthetic_index": synthetic,
            "synthetic_open_s_extrapolated_full_scale": round(synthetic["open_s"] / args.scale, 2),
            "starter_graph": starter,
        },
        "relations": list(DEFAULT_RELATIONS),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    provenance.record(args.out.parent, run, outputs=[args.out])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

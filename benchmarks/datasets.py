"""Rows/s of the VQAv2 build with knowledge from the starter graph, num_proc 1 vs 2 side by side; prints JSON.

Input: the real VQAv2 records of `--vqav2-records` (a folder like ../shared/refdata/vqav2: gzip JSON
`vqa_questions_valid.gzip` / `vqa_annotatons_valid.gzip` plus `header_sample/`), or else `--questions` synthetic
questions about the 80 COCO objects in the official format. Images are one placeholder hard-linked under every
official file name (image decoding is not part of a path-mode build). Two figures per setting, best of
`--repeats` runs (settings alternate so that background load hits both alike):
- build_rows_per_s: the whole `vqav2.build` (reading, vocabulary, soft targets, knowledge);
- knowledge_rows_per_s: the knowledge `map` alone, the stage `num_proc` parallelises.

    python benchmarks/datasets.py --vqav2-records ../shared/refdata/vqav2

Writes the JSON to benchmarks/results/datasets/datasets.json (or `--out`) and records the commit, command and
arguments in that folder's provenance.json (benchmarks/provenance.py).
"""

import sys
from pathlib import Path

# This file shares its name with the `datasets` library: run as a script, its own folder (first on sys.path)
# would shadow the library, so it is taken off the path before anything imports `datasets`.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from datasets import disable_progress_bars  # noqa: E402
from PIL import Image  # noqa: E402

from data_scripts import vqav2  # noqa: E402
from data_scripts.common import KnowledgeAnnotator  # noqa: E402
from modeling_vkood.knowledge import KnowledgeBase  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from benchmarks import provenance

COCO_OBJECTS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven "
    "toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()
TEMPLATES = (
    "What color is the {}?",
    "Is there a {} in the picture?",
    "How many {}s are there?",
    "What is the {} used for?",
    "Where is the {}?",
)


def real_records(folder: Path) -> tuple[dict, dict]:
    """The refdata VQAv2 records wrapped in the official header (they come from the train2014 files)."""
    questions = json.loads(gzip.open(folder / "vqa_questions_valid.gzip").read())["questions"]
    annotations = json.loads(gzip.open(folder / "vqa_annotatons_valid.gzip").read())["annotations"]
    header_q = json.loads((folder / "header_sample" / "questions.json").read_text())
    header_a = json.loads((folder / "header_sample" / "annotations.json").read_text())
    return {**header_q, "questions": questions}, {**header_a, "annotations": annotations}


def synthetic_records(count: int, seed: int = 0) -> tuple[dict, dict]:
    """`count` questions about COCO objects, 10 answers each, in the official format."""
    rng = random.Random(seed)
    questions, annotations = [], []
    for index in range(count):
        image_id, obj = index // 5 + 1, rng.choice(COCO_OBJECTS).replace("_", " ")
        question_id = image_id * 1000 + index % 5
        answers = [rng.choice(("yes", "no", "2", "red", "kitchen")) for _ in range(10)]
        question = rng.choice(TEMPLATES).format(obj)
        questions.append({"image_id": image_id, "question": question, "question_id": question_id})
        annotations.append(
            {
                "question_id": question_id,
                "image_id": image_id,
                "question_type": "what",
                "answer_type": "other",
                "multiple_choice_answer": answers[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
                ],
            }
        )
    return {"questions": questions}, {"annotations": annotations}


def write_inputs(folder: Path, questions: dict, annotations: dict) -> tuple[Path, Path]:
    root, images = folder / "annotations", folder / "images" / "train2014"
    root.mkdir(parents=True)
    images.mkdir(parents=True)
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(questions))
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(annotations))
    placeholder = folder / "placeholder.jpg"
    Image.new("RGB", (8, 8), (90, 140, 200)).save(placeholder)
    for image_id in {q["image_id"] for q in questions["questions"]}:
        os.link(placeholder, images / f"COCO_train2014_{image_id:012d}.jpg")
    return root, images.parent


def time_build(root: Path, images: Path, index: Path, num_proc: int) -> tuple[int, float, float]:
    """(rows, seconds of the whole build, seconds of the knowledge map alone), each with a cold edge cache."""
    start = time.perf_counter()
    dataset, _ = vqav2.build(root, images, KnowledgeBase.open(index), num_proc=num_proc)
    build_seconds = time.perf_counter() - start
    questions = dataset["train"].select_columns(["question"])
    start = time.perf_counter()
    questions.map(
        KnowledgeAnnotator(KnowledgeBase.open(index), "question", 16, several_texts=False),
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        keep_in_memory=True,
        new_fingerprint=f"bench-{num_proc}-{start}",
    )
    return len(dataset["train"]), build_seconds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqav2-records", type=Path, help="folder of the refdata VQAv2 records (else synthetic)")
    parser.add_argument("--questions", type=int, default=20_000, help="synthetic questions (without --vqav2-records)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "datasets" / "datasets.json")
    args = parser.parse_args()
    run = provenance.begin(args)
    disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        if args.vqav2_records:
            questions, annotations = real_records(args.vqav2_records)
            source = f"real VQAv2 records ({args.vqav2_records})"
        else:
            questions, annotations = synthetic_records(args.questions)
            source = "synthetic questions about COCO objects"
        root, images = write_inputs(Path(tmp), questions, annotations)
        index = KnowledgeBase.starter(cache_dir=Path(tmp) / "knowledge").path
        runs = {1: [], 2: []}
        for _ in range(args.repeats):
            for num_proc in runs:
                runs[num_proc].append(time_build(root, images, index, num_proc))
    results = []
    for num_proc, timings in runs.items():
        rows = timings[0][0]
        build_s, knowledge_s = min(t[1] for t in timings), min(t[2] for t in timings)
        results.append(
            {
                "num_proc": num_proc,
                "rows": rows,
                "build_seconds": round(build_s, 3),
                "build_rows_per_s": round(rows / build_s, 1),
                "knowledge_seconds": round(knowledge_s, 3),
                "knowledge_rows_per_s": round(rows / knowledge_s, 1),
            }
        )
    summary = {
        "benchmark": "vqav2 build, starter knowledge graph, image_mode=path",
        "input": source,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "results": results,
        "knowledge_speedup_2_vs_1": round(results[0]["knowledge_seconds"] / results[1]["knowledge_seconds"], 2),
        "build_speedup_2_vs_1": round(results[0]["build_seconds"] / results[1]["build_seconds"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    provenance.record(args.out.parent, run, outputs=[args.out])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

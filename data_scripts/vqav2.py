"""VQAv2 from the official files, plus the reader of the official VQA file format (OK-VQA uses the same format).

Inputs (names unchanged) in `root`: `v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015,test2015}_questions.json`
and `v2_mscoco_{train2014,val2014}_annotations.json`; images `COCO_{folder}_{image_id:012d}.jpg` in
`image_root/{folder}/` (as the COCO zips unpack) or directly in `image_root`; test-dev uses the test2015 images.
Splits: train, validation, test_dev, test (the test splits have no answers: empty answer and label lists).

Vocabulary: the answers that are the consensus answer (`multiple_choice_answer`, officially normalised) of at
least 9 questions of train+val, the setting that gives the standard 3,129 answers. It is always counted on every
annotation file present in `root`, whichever splits are built, so that every build shares one label space.
`vocabulary=` (CLI `--answer-vocabulary`) gives the answers and their label order instead, e.g. a converted
checkpoint's `id2label` (`modeling_vkood.conversion.meter_answers` for METER's): then no counting happens, and the
targets are computed against it as against a selected one (answers outside it get no label; a question none of
whose human answers is in it keeps its row, with empty `label_ids` / `label_scores`).
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hub_cards.dataset_card import DatasetDescription
from modeling_vkood.evaluation import normalize_answer

from .common import (
    BuildResult,
    ImageFinder,
    SkipReport,
    build_splits,
    check_record,
    checked_vocabulary,
    load_json,
    progress,
    question_record,
    record_error,
    record_list,
    select_splits,
    select_vocabulary,
    vqa_features,
    vqa_targets,
)

QUESTION_FIELDS = {"question_id": int, "image_id": int, "question": str}
ANNOTATION_FIELDS = {"question_id": int, "image_id": int, "answers": list, "answer_type": str, "question_type": str}
# VQAv2 records carry the consensus answer; OK-VQA's do not (see `consensus_answer`).
CONSENSUS_FIELD = {"multiple_choice_answer": str}


@dataclass(frozen=True)
class VqaSplit:
    """Official file names of one split: questions, annotations (None for test splits), COCO image folder."""

    questions: str
    annotations: str | None
    images: str


@dataclass(frozen=True)
class VocabularyRule:
    """Which human answers count towards the vocabulary, and how many questions an answer needs."""

    min_questions: int
    all_answers: bool  # False: only the consensus `multiple_choice_answer` of each question


SPLITS = {
    "train": VqaSplit(
        "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014"
    ),
    "validation": VqaSplit(
        "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"
    ),
    "test_dev": VqaSplit("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
    "test": VqaSplit("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
}
VOCABULARY = VocabularyRule(min_questions=9, all_answers=False)

DESCRIPTION = DatasetDescription(
    name="vqav2",
    pretty_name="VQAv2 with ConceptNet knowledge",
    summary="VQA v2.0 (balanced real images, COCO) with the official answers, soft answer targets over a "
    "3,129-style answer vocabulary and commonsense knowledge retrieved for every question.",
    homepage="https://visualqa.org",
    task_categories=["visual-question-answering"],
    licenses=["cc-by-4.0", "cc-by-sa-4.0", "other"],
    licence_notes=[
        "Questions and answers: CC-BY 4.0 (VQA).",
        "Images: COCO, under the COCO terms of use (Flickr terms of use for the photographs).",
    ],
    citations=[
        """@inproceedings{goyal2017making,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={CVPR}, year={2017}}""",
        """@inproceedings{lin2014microsoft,
  title={Microsoft {COCO}: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
          Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle={ECCV}, year={2014}}""",
    ],
    notes=[
        "`label_ids`/`label_scores`: every vocabulary answer among the 10 human answers with the official VQA "
        "accuracy of answering it (0.3/0.6/0.9/1.0 for 1/2/3/4+ annotators); the vocabulary is the ClassLabel "
        "of `label_ids`: answers that are the consensus answer of at least 9 train+val questions.",
        "Test splits carry no answers: their answer and label columns are empty.",
        "`knowledge`: retrieved from the question text.",
    ],
)


def consensus_answer(answers: Sequence[str]) -> str:
    """The most common human answer, ties going to the one given first (OK-VQA records name no consensus)."""
    return Counter(answers).most_common(1)[0][0] if answers else ""


def load_annotations(path: Path, consensus_in_file: bool) -> dict[int, dict]:
    """Annotations of one official file keyed by question id, each checked (answers must be {"answer": str}).

    The evaluated human answer is each entry's `answer` (OK-VQA's `raw_answer` and the confidences are not used).
    `consensus_in_file`: records must carry `multiple_choice_answer` (VQAv2); otherwise (OK-VQA) it is used where
    present and derived with `consensus_answer` where not.
    """
    required = {**ANNOTATION_FIELDS, **CONSENSUS_FIELD} if consensus_in_file else ANNOTATION_FIELDS
    records = record_list(load_json(path), "annotations", path)
    annotations = {}
    for index, record in progress(records, path):
        check_record(record, required, path, index)
        answers = record["answers"]
        if not all(isinstance(answer, dict) and isinstance(answer.get("answer"), str) for answer in answers):
            raise record_error(path, index, 'every entry of "answers" must be an object with a string "answer"')
        if record["question_id"] in annotations:
            raise record_error(path, index, f"question_id {record['question_id']} appears twice")
        answers = [answer["answer"] for answer in answers]
        consensus = record.get("multiple_choice_answer")
        if consensus is None:
            consensus = consensus_answer(answers)
        elif not isinstance(consensus, str):
            raise record_error(path, index, f"field 'multiple_choice_answer' should be str, got {consensus!r}")
        annotations[record["question_id"]] = {
            "image_id": record["image_id"],
            "answers": answers,
            "answer_type": record["answer_type"],
            "question_type": record["question_type"],
            "multiple_choice_answer": consensus,
        }
    return annotations


def count_answer_questions(annotation_sets: Sequence[dict[int, dict]], rule: VocabularyRule) -> Counter:
    """For each normalised answer, the number of questions it answers under `rule`."""
    counts = Counter()
    for annotations in annotation_sets:
        for annotation in annotations.values():
            answers = annotation["answers"] if rule.all_answers else [annotation["multiple_choice_answer"]]
            counts.update({normalize_answer(answer) for answer in answers})
    return counts


def read_vqa_split(
    root: Path,
    image_root: Path,
    spec: VqaSplit,
    split: str,
    annotations: dict[int, dict] | None,
    vocabulary_index: dict[str, int],
    finder: ImageFinder,
    report: SkipReport,
) -> dict[str, list]:
    """Columns of one split in the official VQA format (questions joined with their annotations)."""
    path = root / spec.questions
    questions = record_list(load_json(path), "questions", path)
    if annotations is not None and len(annotations) != len(questions):
        raise ValueError(f"{path}: {len(questions)} questions but {len(annotations)} annotations in {spec.annotations}")
    columns = {name: [] for name in vqa_features([]) if name != "knowledge"}
    for index, record in progress(questions, path):
        check_record(record, QUESTION_FIELDS, path, index)
        question_id, image_id = record["question_id"], record["image_id"]
        if annotations is None:
            annotation = {"answers": [], "answer_type": "", "question_type": "", "multiple_choice_answer": ""}
        elif question_id not in annotations:
            raise record_error(path, index, f"question_id {question_id} has no annotation in {spec.annotations}")
        else:
            annotation = annotations[question_id]
            if annotation["image_id"] != image_id:
                raise record_error(path, index, f"image_id {image_id} differs from its annotation's")
        name = f"COCO_{spec.images}_{image_id:012d}.jpg"
        image = finder((image_root / spec.images / name, image_root / name))
        if image is None:
            report.missing_image(split, f"question_id={question_id}", image_root / spec.images / name)
            continue
        label_ids, label_scores = vqa_targets(annotation["answers"], vocabulary_index)
        row = {
            "question_id": question_id,
            "image_id": image_id,
            "image": str(image),
            "question": record["question"],
            "answers": annotation["answers"],
            "answer_type": annotation["answer_type"],
            "question_type": annotation["question_type"],
            "multiple_choice_answer": annotation["multiple_choice_answer"],
            "label_ids": label_ids,
            "label_scores": label_scores,
        }
        for key, value in row.items():
            columns[key].append(value)
    return columns


def build_vqa_format(
    name: str,
    split_files: dict[str, VqaSplit],
    vocabulary_rule: VocabularyRule,
    root,
    image_root,
    knowledge,
    splits: Sequence[str] | None,
    consensus_in_file: bool = True,
    vocabulary: Sequence[str] | None = None,
    **options,
) -> BuildResult:
    """Build a dataset shipped in the official VQA format (VQAv2, OK-VQA); see `load_annotations` for
    `consensus_in_file`. `vocabulary`: the answers in label order, replacing the one `vocabulary_rule` selects
    (only the annotation files of the chosen splits are read then)."""
    root, image_root = Path(root), Path(image_root)
    chosen = select_splits(splits, {split: root / spec.questions for split, spec in split_files.items()}, name)
    annotations = {
        split: load_annotations(root / spec.annotations, consensus_in_file)
        for split, spec in split_files.items()
        if spec.annotations is not None
        and (split in chosen or (vocabulary is None and (root / spec.annotations).is_file()))
    }
    if vocabulary is not None:
        vocabulary = checked_vocabulary(vocabulary, f"{name}: the given answer vocabulary")
    elif not annotations:
        raise FileNotFoundError(f"{name}: no annotation file in {root}; the answer vocabulary needs one")
    else:
        counts = count_answer_questions(list(annotations.values()), vocabulary_rule)
        vocabulary = select_vocabulary(counts, vocabulary_rule.min_questions, name)
    vocabulary_index = {answer: label for label, answer in enumerate(vocabulary)}
    finder = ImageFinder()

    def read_split(split: str, report: SkipReport) -> dict[str, list]:
        return read_vqa_split(
            root, image_root, split_files[split], split, annotations.get(split), vocabulary_index, finder, report
        )

    features, text = vqa_features(vocabulary), "question"
    return build_splits(name, chosen, read_split, features, knowledge, text, record_name=question_record, **options)


def build(
    root,
    image_root,
    knowledge,
    splits: Sequence[str] | None = None,
    max_knowledge_items: int = 16,
    num_proc: int = 1,
    strict: bool = False,
    image_mode: str = "path",
    check_images: str = "decode",
    work_dir: Path | None = None,
    vocabulary: Sequence[str] | None = None,
) -> BuildResult:
    """VQAv2 from the official files in `root` and the COCO images in `image_root` (see the module docstring);
    `vocabulary`: fixed answers in label order instead of the selected ones."""
    return build_vqa_format(
        "vqav2",
        SPLITS,
        VOCABULARY,
        root,
        image_root,
        knowledge,
        splits,
        vocabulary=vocabulary,
        strict=strict,
        max_knowledge_items=max_knowledge_items,
        num_proc=num_proc,
        image_mode=image_mode,
        check_images=check_images,
        work_dir=work_dir,
    )

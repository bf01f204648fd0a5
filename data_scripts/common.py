"""Building blocks shared by the dataset builders.

Record checks (a malformed record raises a ValueError naming file and record index), the skip report (a missing
or unreadable image is counted and named, or raises under `strict`), dropping rows whose image files cannot be read
(`image_check`), knowledge annotation (batched `datasets.map`), the VQA answer vocabulary and soft targets, and the
final assembly of one split.

Soft VQA targets. `label_scores[k]` is the official VQA accuracy a model would score by answering vocabulary
entry `label_ids[k]`: min(1, matches/3) averaged over the leave-one-out subsets of the human answers
(`modeling_vkood.evaluation.answer_scores`). With 10 answers that is 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >=4
matching annotators: the same numbers as the widely used "bottom-up" targets, which were an approximation of this
rule, while the plain min(1, count/3) would give 0.33 / 0.67 / 1.0 and reward answers the metric does not fully
credit. Training on the metric itself is the reason for this choice; entries scoring 0 are left out (as the
official metric does, a question whose ten answers are all "Yes" credits only "Yes", not the vocabulary's "yes").
A single reference answer (easy-VQA) gives a one-hot target (exact match).
"""

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from datasets.table import embed_table_storage
from tqdm.auto import tqdm

from modeling_vkood.evaluation import answer_scores, clean_answer, normalize_answer
from modeling_vkood.knowledge import KnowledgeBase

from .image_check import ImageChecker

IMAGE_MODES = ("path", "bytes")
KNOWLEDGE_FEATURE = List(
    {
        "head": Value("string"),
        "relation": Value("string"),
        "tail": Value("string"),
        "weight": Value("float32"),
        "text": Value("string"),
    }
)
# Rows per Arrow batch when images are embedded: keeps the memory of one batch of image bytes small.
_IMAGE_BATCH = 100


# ----------------------------------------------------------------------------------------------- input records


def record_error(file: os.PathLike, index: int, problem: str) -> ValueError:
    """The error for a malformed record: names the file and the record's 0-based index in it."""
    return ValueError(f"{file}: record {index}: {problem}")


def load_json(path: Path) -> object:
    """Parse one JSON file, naming it when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def load_json_lines(path: Path) -> list:
    """Parse a JSON-lines file (NLVR2); a bad line is reported with its record index."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(tqdm(handle, desc=f"reading {path.name}", unit=" lines")):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise record_error(path, index, f"not valid JSON ({error})") from error
    return records


def record_list(document: object, key: str, path: Path) -> list:
    """The list of records under `key` of an official JSON document (e.g. "questions", "images")."""
    if not isinstance(document, dict) or not isinstance(document.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a list under {key!r}")
    return document[key]


def check_record(record: object, fields: dict[str, type | tuple[type, ...]], path: Path, index: int) -> dict:
    """Return `record` after checking it is an object with `fields` of the given types (bool is not an int)."""
    if not isinstance(record, dict):
        raise record_error(path, index, f"expected an object, got {type(record).__name__}")
    for key, kind in fields.items():
        if key not in record:
            raise record_error(path, index, f"missing field {key!r}")
        value = record[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            expected = " or ".join(k.__name__ for k in _as_tuple(kind))
            raise record_error(path, index, f"field {key!r} should be {expected}, got {value!r}")
    return record


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def progress(records: Sequence, path: Path) -> Iterable[tuple[int, object]]:
    """(index, record) pairs with a progress bar named after the file."""
    return enumerate(tqdm(records, desc=f"reading {path.name}", unit=" records"))


def select_splits(requested: Sequence[str] | None, available: dict[str, Path], dataset: str) -> list[str]:
    """The splits to build, in canonical order: the requested ones (each must exist), else all whose file exists."""
    if requested is None:
        chosen = [split for split, path in available.items() if path.is_file()]
        if not chosen:
            names = ", ".join(str(path) for path in available.values())
            raise FileNotFoundError(f"{dataset}: none of the official files was found ({names})")
        return chosen
    unknown = sorted(set(requested) - set(available))
    if unknown:
        raise ValueError(f"{dataset}: unknown split(s) {unknown}; choose from {list(available)}")
    for split in requested:
        if not available[split].is_file():
            raise FileNotFoundError(f"{dataset}: split {split!r} needs {available[split]}, which does not exist")
    return [split for split in available if split in requested]


# ---------------------------------------------------------------------------------------- images, skip report


@dataclass
class SkipReport:
    """Every record left out of a build, with the reason and the file concerned; `strict` raises instead."""

    dataset: str
    strict: bool = False
    image_check: str = "decode"
    skipped: list[dict] = field(default_factory=list)

    def missing_image(self, split: str, record: str, path: Path) -> None:
        """Record a missing image; under `strict` stop the build instead."""
        if self.strict:
            raise FileNotFoundError(f"{self.dataset} {split}: image {path} of record {record} does not exist")
        self.skipped.append({"split": split, "record": record, "reason": "missing image", "path": str(path)})

    def unreadable_image(self, split: str, record: str, path: str, error: str) -> None:
        """Record an image file that cannot be read (`image_check.image_problem`); under `strict` stop instead."""
        if self.strict:
            raise ValueError(f"{self.dataset} {split}: image {path} of record {record} cannot be read ({error})")
        self.skipped.append(
            {"split": split, "record": record, "reason": "unreadable image", "path": str(path), "error": error}
        )

    def per_split(self) -> dict[str, int]:
        return dict(sorted(Counter(entry["split"] for entry in self.skipped).items()))

    def per_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(entry["reason"] for entry in self.skipped).items()))

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "image_check": self.image_check,
            "total_skipped": len(self.skipped),
            "per_split": self.per_split(),
            "per_reason": self.per_reason(),
            "skipped": self.skipped,
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


class BuildResult(NamedTuple):
    """What a builder returns: the dataset and the report of what it skipped."""

    dataset: DatasetDict
    skips: SkipReport


class ImageFinder:
    """Looks an image up under its candidate locations once, remembering the answer (VQA reuses images)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Path, ...], Path | None] = {}

    def __call__(self, candidates: tuple[Path, ...]) -> Path | None:
        if candidates not in self._seen:
            self._seen[candidates] = next((path.absolute() for path in candidates if path.is_file()), None)
        return self._seen[candidates]


# -------------------------------------------------------------------------------------------------- knowledge


def open_knowledge(knowledge: "KnowledgeBase | str | os.PathLike") -> KnowledgeBase:
    """A KnowledgeBase from `--knowledge`: the word "starter", a path to a built index, or a KnowledgeBase."""
    if isinstance(knowledge, KnowledgeBase):
        return knowledge
    if str(knowledge) == "starter":
        return KnowledgeBase.starter()
    return KnowledgeBase.open(knowledge)


def merge_knowledge(per_text: Sequence[Sequence], max_items: int) -> list:
    """Knowledge for several texts of one row (the captions of an image), merged into one list.

    Round-robin over the texts (first item of each text, then the second...), so every caption contributes, with
    duplicates (same head, relation, tail) kept once, up to `max_items`.
    """
    merged, seen = [], set()
    for rank in range(max((len(items) for items in per_text), default=0)):
        for items in per_text:
            if rank < len(items):
                item = items[rank]
                key = (item.head, item.relation, item.tail)
                if key not in seen:
                    seen.add(key)
                    merged.append(item)
                    if len(merged) == max_items:
                        return merged
    return merged


class KnowledgeAnnotator:
    """Batched `datasets.map` function adding the `knowledge` column (picklable, so it runs with num_proc > 1)."""

    def __init__(self, knowledge_base: KnowledgeBase, text_column: str, max_items: int, several_texts: bool) -> None:
        self.knowledge_base = knowledge_base
        self.text_column = text_column
        self.max_items = max_items
        self.several_texts = several_texts

    def __call__(self, batch: dict) -> dict:
        texts = batch[self.text_column]
        if self.several_texts:
            flat = [text for row in texts for text in row]
            retrieved = self.knowledge_base.retrieve_batch(flat, max_items=self.max_items)
            rows, start = [], 0
            for row in texts:
                rows.append(merge_knowledge(retrieved[start : start + len(row)], self.max_items))
                start += len(row)
        else:
            rows = self.knowledge_base.retrieve_batch(list(texts), max_items=self.max_items)
        return {"knowledge": [[item.to_dict() for item in items] for items in rows]}


# ------------------------------------------------------------------------------------------- VQA answer labels


def vqa_features(vocabulary: Sequence[str]) -> Features:
    """Columns of the VQA sets; the answer vocabulary travels with the data as the ClassLabel of `label_ids`."""
    return Features(
        {
            "question_id": Value("int64"),
            "image_id": Value("int64"),
            "image": Image(),
            "question": Value("string"),
            "answers": List(Value("string")),
            "answer_type": Value("string"),
            "question_type": Value("string"),
            "multiple_choice_answer": Value("string"),
            "label_ids": List(ClassLabel(names=list(vocabulary))),
            "label_scores": List(Value("float32")),
            "knowledge": KNOWLEDGE_FEATURE,
        }
    )


def answer_vocabulary(dataset: Dataset | DatasetDict) -> list[str]:
    """The answer vocabulary stored in a built VQA dataset (label id -> answer), identical on every split."""
    splits = dataset.values() if isinstance(dataset, DatasetDict) else [dataset]
    vocabularies = {tuple(split.features["label_ids"].feature.names) for split in splits}
    if len(vocabularies) != 1:
        raise ValueError("the splits carry different answer vocabularies")
    return list(vocabularies.pop())


def select_vocabulary(answer_questions: Counter, min_questions: int, dataset: str) -> list[str]:
    """Answers seen for at least `min_questions` questions, most frequent first (ties alphabetical).

    An empty vocabulary cannot be trained or evaluated (the classifier would have no output), so it fails here,
    at build time, with the counts that explain it.
    """
    counts = {answer: count for answer, count in answer_questions.items() if answer}
    kept = [(count, answer) for answer, count in counts.items() if count >= min_questions]
    if not kept:
        most = max(counts.values(), default=0)
        raise ValueError(
            f"{dataset}: no answer reaches the vocabulary threshold of {min_questions} questions "
            f"({len(counts)} distinct answers, the most frequent answers {most} question(s)); "
            "build from more annotations"
        )
    return [answer for _, answer in sorted(kept, key=lambda pair: (-pair[0], pair[1]))]


def checked_vocabulary(vocabulary: Sequence[str], source: str) -> list[str]:
    """A given answer vocabulary (label id -> answer) as a list, after checking that it is a non-empty sequence of
    strings, each once: a label id must name one answer and an answer one label id."""
    if isinstance(vocabulary, str | bytes) or not isinstance(vocabulary, Sequence):
        raise ValueError(f"{source}: expected a list of answers, got {type(vocabulary).__name__}")
    answers = list(vocabulary)
    if not answers:
        raise ValueError(f"{source}: the answer vocabulary is empty")
    wrong = next((answer for answer in answers if not isinstance(answer, str)), None)
    if wrong is not None:
        raise ValueError(f"{source}: every answer must be a string, got {wrong!r}")
    repeated = sorted(answer for answer, count in Counter(answers).items() if count > 1)
    if repeated:
        raise ValueError(f"{source}: answers given more than once: {repeated[:10]}")
    return answers


def read_answer_vocabulary(path: str | os.PathLike) -> list[str]:
    """The answer vocabulary in label order stored at `path` (`--answer-vocabulary`): a JSON list of answers, or a
    model folder whose config.json (or that config.json itself) has `id2label` naming every label id 0..n-1."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"answer vocabulary: {path} does not exist")
    document = load_json(path)
    if isinstance(document, list):
        return checked_vocabulary(document, str(path))
    if not isinstance(document, dict) or not isinstance(document.get("id2label"), dict):
        raise ValueError(f"{path}: expected a JSON list of answers or a model config with an 'id2label' object")
    try:
        labels = {int(label_id): answer for label_id, answer in document["id2label"].items()}
    except ValueError as error:
        raise ValueError(f"{path}: 'id2label' keys must be label ids (integers)") from error
    if sorted(labels) != list(range(len(labels))):
        raise ValueError(f"{path}: 'id2label' must name every label id 0..{len(labels) - 1} once")
    return checked_vocabulary([labels[label_id] for label_id in range(len(labels))], f"{path} id2label")


def vqa_targets(answers: Sequence[str], vocabulary_index: dict[str, int]) -> tuple[list[int], list[float]]:
    """(label_ids, label_scores): each vocabulary answer the official metric credits on these human answers.

    The candidates are the human answers in both forms the metric compares (fully normalised when the annotators
    disagree, only cleaned when they all agree); `answer_scores` keeps those that score.
    """
    if not answers:
        return [], []
    forms = {normalize_answer(answer) for answer in answers} | {clean_answer(answer) for answer in answers}
    candidates = sorted((form for form in forms if form in vocabulary_index), key=vocabulary_index.__getitem__)
    kept = [(vocabulary_index[c], s) for c, s in zip(candidates, answer_scores(candidates, answers)) if s > 0]
    return [label for label, _ in kept], [score for _, score in kept]


# ------------------------------------------------------------------------------------------ assembling a split


def finish_split(
    columns: dict[str, list],
    features: Features,
    knowledge_base: KnowledgeBase | None,
    text_column: str | None,
    *,
    split: str,
    max_knowledge_items: int,
    num_proc: int,
    image_mode: str,
    work_dir: Path | None,
    several_texts: bool = False,
) -> Dataset:
    """Arrow dataset of one split: the read columns, the `knowledge` column, images embedded in "bytes" mode.

    `knowledge_base` None: `columns` already hold the `knowledge` column (a builder that writes its own items).

    `work_dir` receives the intermediate Arrow files (needed for full-size builds, above all in "bytes" mode);
    without it everything stays in memory.
    """
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
    base = Features({name: feature for name, feature in features.items() if name != "knowledge"})
    if knowledge_base is None:  # the builder wrote the knowledge column itself
        return _embed_images(
            Dataset.from_dict(columns, features=features, split=datasets.Split(split)),
            split,
            num_proc,
            image_mode,
            work_dir,
        )
    dataset = Dataset.from_dict(columns, features=base, split=datasets.Split(split))
    dataset = dataset.map(
        KnowledgeAnnotator(knowledge_base, text_column, max_knowledge_items, several_texts),
        batched=True,
        num_proc=num_proc if num_proc > 1 and len(dataset) > 1 else None,
        features=features,
        desc=f"knowledge {split}",
        new_fingerprint=f"vkood-knowledge-{split}",
        **_map_storage(work_dir, f"{split}-knowledge"),
    )
    return _embed_images(dataset, split, num_proc, image_mode, work_dir)


def _embed_images(dataset: Dataset, split: str, num_proc: int, image_mode: str, work_dir: Path | None) -> Dataset:
    """In "bytes" mode, the image files' bytes go into the table; "path" mode leaves the paths."""
    if image_mode == "bytes":
        dataset = dataset.with_format("arrow").map(
            embed_table_storage,
            batched=True,
            batch_size=_IMAGE_BATCH,
            writer_batch_size=_IMAGE_BATCH,
            num_proc=num_proc if num_proc > 1 and len(dataset) > 1 else None,
            desc=f"embedding images {split}",
            new_fingerprint=f"vkood-embed-{split}",
            **_map_storage(work_dir, f"{split}-images"),
        )
        dataset = dataset.with_format(None)
    return dataset


def _map_storage(work_dir: Path | None, name: str) -> dict:
    if work_dir is None:
        return {"keep_in_memory": True}
    work_dir.mkdir(parents=True, exist_ok=True)
    return {"cache_file_name": str(work_dir / f"{name}.arrow")}


def drop_unreadable_images(
    columns: dict[str, list],
    features: Features,
    checker: ImageChecker,
    report: SkipReport,
    split: str,
    record_name: Callable[[dict], str],
) -> dict[str, list]:
    """The rows of `columns` whose image files (every `Image` column) can all be read; the others are reported.

    A row is reported once, with its first unreadable image, in row order, so `strict` names the first bad file.
    """
    image_columns = [name for name, feature in features.items() if isinstance(feature, Image)]
    problems = checker.problems((path for name in image_columns for path in columns[name]), split)
    num_rows = len(columns[image_columns[0]]) if image_columns else 0
    keep = []
    for row in range(num_rows):
        bad = next((columns[name][row] for name in image_columns if problems[columns[name][row]]), None)
        if bad is None:
            keep.append(row)
        else:
            record = record_name({name: values[row] for name, values in columns.items()})
            report.unreadable_image(split, record, bad, problems[bad])
    if len(keep) == num_rows:
        return columns
    return {name: [values[row] for row in keep] for name, values in columns.items()}


def question_record(row: dict) -> str:
    """How the VQA-format builders name a record in the skip report."""
    return f"question_id={row['question_id']}"


def build_splits(
    name: str,
    splits: Sequence[str],
    read_split: Callable[[str, SkipReport], dict[str, list]],
    features: Features,
    knowledge,
    text_column: str,
    *,
    record_name: Callable[[dict], str],
    strict: bool,
    check_images: str,
    max_knowledge_items: int,
    num_proc: int,
    image_mode: str,
    work_dir: Path | None,
    several_texts: bool = False,
) -> BuildResult:
    """Read each split with `read_split(split, report)`, drop rows with unreadable images, and finish the split.

    The common tail of every builder. `record_name(row)` names a row in the skip report as its builder names the
    records it skips while reading. Each distinct image file is checked once per build (`check_images`).
    """
    report = SkipReport(name, strict=strict, image_check=check_images)
    checker = ImageChecker(check_images, num_proc)
    knowledge_base = open_knowledge(knowledge)
    built = {}
    for split in splits:
        columns = drop_unreadable_images(read_split(split, report), features, checker, report, split, record_name)
        built[split] = finish_split(
            columns,
            features,
            knowledge_base,
            text_column,
            split=split,
            max_knowledge_items=max_knowledge_items,
            num_proc=num_proc,
            image_mode=image_mode,
            work_dir=work_dir,
            several_texts=several_texts,
        )
    return BuildResult(DatasetDict(built), report)

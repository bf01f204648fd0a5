"""COCO with the Karpathy splits, and the reader of the Karpathy split-file format (Flickr30k uses the same one).

Input (name unchanged) in `root`: `dataset_coco.json` (`images[]` with `filepath`, `filename`, `split`,
`sentences[].raw`, `cocoid`). Images: `image_root/{filepath}/{filename}` (as the COCO zips unpack) or
`image_root/{filename}`. Splits: train, validation, test; Karpathy's `restval` images go to train (the usual
"113k train" setting) unless `restval_to_train=False`, which keeps them as a `restval` split. The `split` column
keeps each image's Karpathy split, so restval rows stay identifiable inside train.

One row per image with all its captions. Knowledge is per image: retrieved for every caption, then merged
round-robin and deduplicated up to `max_knowledge_items` (`common.merge_knowledge`), so every caption
contributes and an image's knowledge does not depend on which caption a training step samples.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

from datasets import Features, Image, List, Value

from hub_cards.dataset_card import DatasetDescription

from .common import (
    KNOWLEDGE_FEATURE,
    BuildResult,
    ImageFinder,
    SkipReport,
    build_splits,
    check_record,
    load_json,
    progress,
    record_error,
    record_list,
    select_splits,
)

FILE = "dataset_coco.json"
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
FEATURES = Features(
    {
        "image_id": Value("int64"),
        "image": Image(),
        "filename": Value("string"),
        "captions": List(Value("string")),
        "split": Value("string"),
        "knowledge": KNOWLEDGE_FEATURE,
    }
)

DESCRIPTION = DatasetDescription(
    name="coco_karpathy",
    pretty_name="COCO Karpathy splits with ConceptNet knowledge",
    summary="COCO captions in the Karpathy splits (image-text retrieval), one row per image with its captions "
    "and commonsense knowledge retrieved from them.",
    homepage="https://cocodataset.org",
    task_categories=["image-to-text", "text-to-image"],
    licenses=["cc-by-4.0", "cc-by-sa-4.0", "other"],
    licence_notes=[
        "Captions: COCO annotations, CC-BY 4.0; split file by Karpathy and Fei-Fei.",
        "Images: COCO, under the COCO terms of use (Flickr terms of use for the photographs).",
    ],
    citations=[
        """@inproceedings{lin2014microsoft,
  title={Microsoft {COCO}: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
          Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle={ECCV}, year={2014}}""",
        """@inproceedings{karpathy2015deep,
  title={Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li}, booktitle={CVPR}, year={2015}}""",
    ],
    notes=[
        "`image_id`: the COCO id (`cocoid`); `split`: the image's Karpathy split (restval rows are in train).",
        "`knowledge`: per image, retrieved from every caption, merged round-robin and deduplicated.",
    ],
)


def read_karpathy(
    path: Path,
    split_names: dict[str, str],
    wanted: Sequence[str],
    fields: dict[str, type],
    image_id: Callable[[dict], int],
    image_candidates: Callable[[dict], tuple[Path, ...]],
    report: SkipReport,
) -> dict[str, dict[str, list]]:
    """Columns of the `wanted` dataset splits of a Karpathy split file (`split_names`: Karpathy -> dataset split).

    Every record is checked; only those of wanted splits have their image looked up.
    """
    records = record_list(load_json(path), "images", path)
    columns = {split: {name: [] for name in FEATURES if name != "knowledge"} for split in wanted}
    finder = ImageFinder()
    for index, record in progress(records, path):
        check_record(record, {"filename": str, "split": str, "sentences": list, **fields}, path, index)
        if record["split"] not in split_names:
            raise record_error(path, index, f"split {record['split']!r} is not one of {sorted(split_names)}")
        sentences = record["sentences"]
        if not sentences or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise record_error(path, index, 'needs at least one sentence, each an object with a string "raw"')
        split = split_names[record["split"]]
        if split not in columns:
            continue
        candidates = image_candidates(record)
        image = finder(candidates)
        if image is None:
            report.missing_image(split, record["filename"], candidates[0])
            continue
        row = {
            "image_id": image_id(record),
            "image": str(image),
            "filename": record["filename"],
            "captions": [sentence["raw"].strip() for sentence in sentences],
            "split": record["split"],
        }
        for key, value in row.items():
            columns[split][key].append(value)
    return columns


def build_karpathy_format(
    name: str,
    path: Path,
    split_names: dict[str, str],
    fields: dict[str, type],
    image_id: Callable[[dict], int],
    image_candidates: Callable[[dict], tuple[Path, ...]],
    knowledge,
    splits: Sequence[str] | None,
    **options,
) -> BuildResult:
    """Build a retrieval dataset from a Karpathy split file; the file is read once for all splits."""
    dataset_splits = list(dict.fromkeys(split_names.values()))
    chosen = select_splits(splits, {split: path for split in dataset_splits}, name)
    per_split: dict[str, dict[str, list]] = {}

    def read_split(split: str, report: SkipReport) -> dict[str, list]:
        if not per_split:  # first split: read the file once for all chosen splits
            per_split.update(read_karpathy(path, split_names, chosen, fields, image_id, image_candidates, report))
        return per_split.pop(split)

    return build_splits(
        name,
        chosen,
        read_split,
        FEATURES,
        knowledge,
        "captions",
        record_name=lambda row: row["filename"],
        several_texts=True,
        **options,
    )


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
    restval_to_train: bool = True,
) -> BuildResult:
    """COCO Karpathy splits from `root/dataset_coco.json` and the images in `image_root` (see the module docstring)."""
    root, image_root = Path(root), Path(image_root)
    split_names = KARPATHY_SPLITS if restval_to_train else {**KARPATHY_SPLITS, "restval": "restval"}
    return build_karpathy_format(
        "coco_karpathy",
        root / FILE,
        split_names,
        {"filepath": str, "cocoid": int},
        lambda record: record["cocoid"],
        lambda record: (image_root / record["filepath"] / record["filename"], image_root / record["filename"]),
        knowledge,
        splits,
        strict=strict,
        max_knowledge_items=max_knowledge_items,
        num_proc=num_proc,
        image_mode=image_mode,
        check_images=check_images,
        work_dir=work_dir,
    )

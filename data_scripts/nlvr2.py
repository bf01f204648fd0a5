"""NLVR2 from the official files.

Inputs (names unchanged) in `root`: `train.json`, `dev.json`, `test1.json` (JSON lines; `label` is "True"/"False";
train records also have `directory`, the numbered image sub-folder). Images: `{split}-{set}-{pair}-img0.png` and
`-img1.png` in `image_root/{train/DIRECTORY,dev,test1}/` (as the official image archives unpack) or directly in
`image_root` (train: `image_root/DIRECTORY/`). Splits: train, validation (dev), test (test1), named as every builder
names them (`--predict_split test` writes the test file); `splits` also takes NLVR2's own names, `dev` and `test1`.

Consistency (see `modeling_vkood.evaluation.nlvr2_accuracy`) groups rows by `identifier` without its pair field,
as the official evaluation script does: the identifier is `{split}-{set}-{pair}-{sentence}`, and every image
pair written for one sentence of one set forms a group.
"""

from collections.abc import Sequence
from pathlib import Path

from datasets import ClassLabel, Features, Image, Value

from hub_cards.dataset_card import DatasetDescription

from .common import (
    KNOWLEDGE_FEATURE,
    BuildResult,
    ImageFinder,
    SkipReport,
    build_splits,
    check_record,
    load_json_lines,
    progress,
    record_error,
    select_splits,
)

FILES = {"train": "train.json", "validation": "dev.json", "test": "test1.json"}
OFFICIAL_NAMES = {"dev": "validation", "test1": "test"}  # NLVR2's split names (its files') -> the built dataset's
RECORD_FIELDS = {"identifier": str, "sentence": str, "label": str}
LABELS = ("False", "True")
FEATURES = Features(
    {
        "identifier": Value("string"),
        "image_0": Image(),
        "image_1": Image(),
        "sentence": Value("string"),
        "label": ClassLabel(names=list(LABELS)),
        "knowledge": KNOWLEDGE_FEATURE,
    }
)

DESCRIPTION = DatasetDescription(
    name="nlvr2",
    pretty_name="NLVR2 with ConceptNet knowledge",
    summary="NLVR2 (is a sentence true of a pair of web photographs?) with the official labels and commonsense "
    "knowledge retrieved for every sentence.",
    homepage="https://lil.nlp.cornell.edu/nlvr/",
    task_categories=["visual-question-answering"],
    licenses=["cc-by-4.0", "cc-by-sa-4.0", "other"],
    licence_notes=[
        "Sentences and labels: CC-BY 4.0 (NLVR2).",
        "Images: web photographs distributed by the NLVR2 authors on request; their copyright stays with the "
        "owners (see the NLVR2 terms).",
    ],
    citations=[
        """@inproceedings{suhr2019corpus,
  title={A Corpus for Reasoning about Natural Language Grounded in Photographs},
  author={Suhr, Alane and Zhou, Stephanie and Zhang, Ally and Zhang, Iris and Bai, Huajun and Artzi, Yoav},
  booktitle={ACL}, year={2019}}""",
    ],
    notes=[
        "`label`: ClassLabel(['False', 'True']).",
        "Consistency groups rows by `identifier` without its pair field (`split-set-pair-sentence`).",
        "`knowledge`: retrieved from the sentence.",
    ],
)


def read_nlvr2_split(
    root: Path, image_root: Path, split: str, finder: ImageFinder, report: SkipReport
) -> dict[str, list]:
    """Columns of one NLVR2 split; a row needs both of its images."""
    path = root / FILES[split]
    image_folder = path.stem  # train / dev / test1, as the image archives name their folders
    columns = {name: [] for name in FEATURES if name != "knowledge"}
    for index, record in progress(load_json_lines(path), path):
        check_record(record, RECORD_FIELDS, path, index)
        identifier = record["identifier"]
        if len(identifier.split("-")) != 4:
            raise record_error(path, index, f"identifier {identifier!r} is not split-set-pair-sentence")
        if record["label"] not in LABELS:
            raise record_error(path, index, f"label {record['label']!r} is not 'True' or 'False'")
        sub_folder = ()
        if "directory" in record:
            check_record(record, {"directory": (int, str)}, path, index)
            sub_folder = (str(record["directory"]),)
        stem = identifier.rsplit("-", 1)[0]
        images = []
        for side in (0, 1):
            name = f"{stem}-img{side}.png"
            official = image_root.joinpath(image_folder, *sub_folder, name)
            image = finder((official, image_root.joinpath(*sub_folder, name)))
            if image is None:
                report.missing_image(split, identifier, official)
                break
            images.append(str(image))
        else:
            columns["identifier"].append(identifier)
            columns["image_0"].append(images[0])
            columns["image_1"].append(images[1])
            columns["sentence"].append(record["sentence"])
            columns["label"].append(LABELS.index(record["label"]))
    return columns


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
) -> BuildResult:
    """NLVR2 from the official files in `root` and the images in `image_root` (see the module docstring)."""
    root, image_root = Path(root), Path(image_root)
    if splits is not None:
        splits = [OFFICIAL_NAMES.get(split, split) for split in splits]
    chosen = select_splits(splits, {split: root / name for split, name in FILES.items()}, "nlvr2")
    finder = ImageFinder()

    def read_split(split: str, report: SkipReport) -> dict[str, list]:
        return read_nlvr2_split(root, image_root, split, finder, report)

    return build_splits(
        "nlvr2",
        chosen,
        read_split,
        FEATURES,
        knowledge,
        "sentence",
        record_name=lambda row: row["identifier"],
        strict=strict,
        max_knowledge_items=max_knowledge_items,
        num_proc=num_proc,
        image_mode=image_mode,
        check_images=check_images,
        work_dir=work_dir,
    )

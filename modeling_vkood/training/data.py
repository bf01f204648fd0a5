"""The run's dataset: built from official files by a `data_scripts` builder, or loaded ready-built (folder/Hub).

A build reads the raw annotation files, checks every image and retrieves knowledge for every text: minutes at
VQAv2 scale. So a built dataset is saved under `dataset_cache_dir`, keyed by everything the build reads (the
sizes and modification times of the files under the dataset and image roots and of the knowledge index, the
builder options, the source of the builders and of the knowledge code), and later runs and the other processes of
a distributed run load it from there. train.py calls `load_splits` inside `main_process_first`: the main process
builds, the others then find the cache.
"""

import hashlib
import importlib
import json
import math
import os
import shutil
from pathlib import Path

import datasets
import torch
from datasets import DatasetDict, Features, Value, load_dataset, load_from_disk

import data_scripts
import modeling_vkood

BUILDERS = ("easy_vqa", "vqav2", "okvqa", "nlvr2", "coco_karpathy", "flickr30k", "knowledge_vqa")
FIXED_VOCABULARY = ("vqav2", "okvqa")  # builders that take a given answer vocabulary (`vocabulary=`)
PACKAGE = Path(modeling_vkood.__file__).parent
STARTER_GRAPH = PACKAGE / "knowledge" / "data" / "starter.csv"
# Folders and files of the code whose behaviour a built dataset depends on (the knowledge extraction lives in the
# remote-code files the processor shares).
BUILD_CODE = (
    Path(data_scripts.__file__).parent,
    PACKAGE / "knowledge",
    *(PACKAGE / f"{name}_vkood.py" for name in ("concepts", "knowledge", "verbalize")),
)


TRAIN_FRACTION_SEED = 0  # `train_fraction` keeps the same rows whatever the run's seed
IMAGE_STORAGE = {"bytes": Value("binary"), "path": Value("string")}  # how an Image column is stored in Arrow
IMAGE_COLUMNS_FILE = "vkood_image_columns.json"


def default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "vkood"


def _files_state(folder: Path) -> list:
    """(relative path, size, mtime in ns) of every file under `folder`, sorted; [] for a missing folder."""
    state = []
    for directory, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(directory, name))
            state.append((os.path.relpath(os.path.join(directory, name), folder), stat.st_size, stat.st_mtime_ns))
    return sorted(state)


def _source_digest() -> str:
    digest = hashlib.sha256()
    for location in BUILD_CODE:
        for path in sorted(location.rglob("*.py")) if location.is_dir() else [location]:
            digest.update(str(path.relative_to(location.parent)).encode() + path.read_bytes())
    return digest.hexdigest()


def build_key(
    data_args, splits: list[str], max_knowledge_items: int, answer_vocabulary: list[str] | None = None
) -> str:
    """Hex digest of everything a build of `splits` reads; any change to an input or option gives a new key."""
    roots = {data_args.dataset_root, data_args.image_root} - {None}
    knowledge = STARTER_GRAPH if data_args.knowledge == "starter" else Path(data_args.knowledge)
    inputs = {
        "builder": data_args.dataset,
        "splits": sorted(splits),
        "max_knowledge_items": max_knowledge_items,
        "check_images": data_args.check_images,
        "roots": {str(Path(root).resolve()): _files_state(Path(root)) for root in sorted(roots)},
        "image_root": data_args.image_root,
        "knowledge": [str(knowledge.resolve()), knowledge.stat().st_size, knowledge.stat().st_mtime_ns],
        "code": _source_digest(),
    }
    if answer_vocabulary is not None:  # absent otherwise: a build without one is keyed as before
        inputs["answer_vocabulary"] = list(answer_vocabulary)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def build_dataset(
    data_args, splits: list[str], max_knowledge_items: int, answer_vocabulary: list[str] | None = None
) -> DatasetDict:
    """The splits built by the `data_args.dataset` builder with at most `max_knowledge_items` items per row (the model
    config's cap), from the cache when the same build was saved before. `answer_vocabulary`: see `load_splits`."""
    key = build_key(data_args, splits, max_knowledge_items, answer_vocabulary)
    cache = Path(data_args.dataset_cache_dir or default_cache_dir()) / f"{data_args.dataset}-{key}"
    if cache.is_dir():
        return _load_cached(cache)
    builder = importlib.import_module(f"data_scripts.{data_args.dataset}")
    fixed = {} if answer_vocabulary is None else {"vocabulary": answer_vocabulary}
    dataset = builder.build(
        root=data_args.dataset_root,
        image_root=data_args.image_root or data_args.dataset_root,
        knowledge=data_args.knowledge,
        splits=splits,
        max_knowledge_items=max_knowledge_items,
        num_proc=data_args.preprocessing_num_workers,
        check_images=data_args.check_images,
        **fixed,
    ).dataset
    partial = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
    _save_cached(dataset, partial)
    try:
        partial.rename(cache)  # atomic: a reader sees a complete dataset or none
    except OSError:  # another process saved the same build first
        shutil.rmtree(partial, ignore_errors=True)
    return _load_cached(cache)


def _save_cached(dataset: DatasetDict, path: Path) -> None:
    """`save_to_disk`, keeping image paths as paths: it would copy every image file into the cache, so the image
    columns are stored as their plain {bytes, path} struct and named in IMAGE_COLUMNS_FILE."""
    image_columns = {
        split: [name for name, feature in part.features.items() if isinstance(feature, datasets.Image)]
        for split, part in dataset.items()
    }
    plain = DatasetDict(
        {
            split: part.cast(
                Features(
                    {
                        name: IMAGE_STORAGE if name in image_columns[split] else feature
                        for name, feature in part.features.items()
                    }
                )
            )
            for split, part in dataset.items()
        }
    )
    plain.save_to_disk(str(path))
    (path / IMAGE_COLUMNS_FILE).write_text(json.dumps(image_columns))


def _load_cached(path: Path) -> DatasetDict:
    image_columns = json.loads((path / IMAGE_COLUMNS_FILE).read_text())
    dataset = load_from_disk(str(path))
    for split, names in image_columns.items():
        for name in names:
            dataset[split] = dataset[split].cast_column(name, datasets.Image())
    return dataset


def knowledge_is_retrieved(data_args) -> bool:
    """Whether the dataset's knowledge items come from the run's index (so inference can retrieve them the same
    way), rather than being drawn per example by the builder (`PER_EXAMPLE_KNOWLEDGE`, e.g. knowledge-VQA)."""
    if data_args.dataset not in BUILDERS:
        return True
    return not getattr(importlib.import_module(f"data_scripts.{data_args.dataset}"), "PER_EXAMPLE_KNOWLEDGE", False)


def load_splits(
    data_args,
    splits: list[str],
    max_knowledge_items: int = modeling_vkood.VKOODConfig.max_knowledge_items,
    answer_vocabulary: list[str] | None = None,
) -> DatasetDict:
    """The requested splits, capped by max_*_samples, with image columns left undecoded for the PixelCache. A builder
    keeps at most `max_knowledge_items` items per row (the model config's cap; a built dataset brings its own).

    `answer_vocabulary`: the answers in label order (e.g. a converted checkpoint's `id2label`), which the VQA
    builders (FIXED_VOCABULARY) use instead of selecting their own; a ready-built dataset must already carry it.
    """
    if answer_vocabulary is not None and data_args.dataset in BUILDERS and data_args.dataset not in FIXED_VOCABULARY:
        raise ValueError(f"answer_vocabulary is for the builders {FIXED_VOCABULARY}, not {data_args.dataset!r}")
    if data_args.dataset in BUILDERS:
        dataset = build_dataset(data_args, splits, max_knowledge_items, answer_vocabulary)
    else:
        loaded = load_dataset(data_args.dataset)
        missing = sorted(set(splits) - set(loaded))
        if missing:
            raise ValueError(f"{data_args.dataset}: no split(s) {missing}; it has {sorted(loaded)}")
        dataset = DatasetDict({split: loaded[split] for split in splits})
        if answer_vocabulary is not None:
            vqa = "label_ids" in dataset[splits[0]].features
            if not vqa or data_scripts.answer_vocabulary(dataset) != list(answer_vocabulary):
                raise ValueError(f"{data_args.dataset}: its answer vocabulary is not the given answer_vocabulary")
    for name, feature in dataset[splits[0]].features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    if data_args.task == "retrieval" and data_args.train_split in dataset:
        dataset[data_args.train_split] = one_row_per_caption(dataset[data_args.train_split])
    train_split = data_args.train_split
    if train_split in dataset and getattr(data_args, "labelled_fraction", None) is not None:
        dataset[train_split] = labelled_subset(
            dataset[train_split], data_args.labelled_fraction, data_args.labelled_fraction_seed
        )
    caps = {data_args.train_split: data_args.max_train_samples, data_args.eval_split: data_args.max_eval_samples}
    for split, cap in caps.items():
        if split in dataset and cap is not None:
            dataset[split] = dataset[split].select(range(min(cap, len(dataset[split]))))
    if data_args.train_fraction is not None and data_args.train_split in dataset:
        train = dataset[data_args.train_split]
        rows = max(1, round(data_args.train_fraction * len(train)))
        dataset[data_args.train_split] = train.shuffle(seed=TRAIN_FRACTION_SEED).select(range(rows))
    if train_split in dataset and getattr(data_args, "pseudo_labelled_dataset", None):
        dataset[train_split] = with_pseudo_labels(dataset[train_split], data_args.pseudo_labelled_dataset)
    return dataset


def labelled_image_ids(split: datasets.Dataset, fraction: float, seed: int) -> set[int]:
    """The training images whose questions stay labelled: ceil(fraction x images) of the split's distinct
    `image_id`s, drawn with `seed` (the same draw for every run seed, so runs that differ only in their seed see the
    same labelled questions). The other images are the unlabelled pool."""
    images = sorted(set(split["image_id"]))
    count = math.ceil(fraction * len(images))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return {images[index] for index in order.tolist()}


def labelled_subset(split: datasets.Dataset, fraction: float, seed: int) -> datasets.Dataset:
    """The questions of `labelled_image_ids` (in their original order): the data-scarce training split."""
    kept = labelled_image_ids(split, fraction, seed)
    rows = [index for index, image_id in enumerate(split["image_id"]) if image_id in kept]
    return split.select(rows)


def with_pseudo_labels(split: datasets.Dataset, pseudo_labelled: str) -> datasets.Dataset:
    """`split` followed by the train split of the pseudo-labelled dataset `pseudo_labelled` (a folder or Hub id
    written by `modeling_vkood.training.seltda`), which must hold the same columns and answer vocabulary."""
    # A local folder is read afresh: `datasets` keys its cache of a folder by the file names, not their contents, so a
    # folder pseudo-labelled again (same names) would otherwise come back with the rows of the previous labelling.
    fresh = {"download_mode": "force_redownload"} if Path(pseudo_labelled).is_dir() else {}
    pseudo = load_dataset(pseudo_labelled, split="train", **fresh)
    for name, feature in pseudo.features.items():
        if isinstance(feature, datasets.Image):
            pseudo = pseudo.cast_column(name, datasets.Image(decode=False))
    if pseudo.features != split.features:
        differing = sorted(
            name
            for name in set(pseudo.features) | set(split.features)
            if pseudo.features.get(name) != split.features.get(name)
        )
        raise ValueError(
            f"{pseudo_labelled}: its columns differ from the training split's in {differing} (a "
            "pseudo-labelled dataset must be written against the same dataset and vocabulary)"
        )
    return datasets.concatenate_datasets([split, pseudo])


def one_row_per_caption(split: datasets.Dataset) -> datasets.Dataset:
    """A retrieval training split with one row per (image, caption) pair, `captions` holding that one caption.

    So that an epoch trains on every caption (as ALBEF/BLIP do: COCO has 5 per image) instead of one drawn per
    image. The rows of an image keep its `image_id`, which makes them positives of each other in ITC.
    """

    def explode(rows):
        counts = [len(captions) for captions in rows["captions"]]
        pairs = {
            name: [value for value, count in zip(values, counts) for _ in range(count)]
            for name, values in rows.items()
            if name != "captions"
        }
        pairs["captions"] = [[caption] for captions in rows["captions"] for caption in captions]
        return pairs

    return split.map(explode, batched=True, features=split.features, desc="one row per caption")

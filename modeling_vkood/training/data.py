"""The run's dataset: built from official files by a `data_scripts` builder, or loaded ready-built (folder/Hub)."""

import importlib

import datasets
from datasets import DatasetDict, load_dataset

BUILDERS = ("easy_vqa", "vqav2", "okvqa", "nlvr2", "coco_karpathy", "flickr30k", "knowledge_vqa")


def load_splits(data_args, splits: list[str]) -> DatasetDict:
    """The requested splits, capped by max_*_samples, with image columns left undecoded for the PixelCache."""
    if data_args.dataset in BUILDERS:
        builder = importlib.import_module(f"data_scripts.{data_args.dataset}")
        options = {"root": data_args.dataset_root, "image_root": data_args.image_root or data_args.dataset_root}
        dataset = builder.build(
            **options,
            knowledge=data_args.knowledge,
            splits=splits,
            max_knowledge_items=data_args.max_knowledge_items,
            num_proc=data_args.preprocessing_num_workers,
        ).dataset
    else:
        loaded = load_dataset(data_args.dataset)
        missing = sorted(set(splits) - set(loaded))
        if missing:
            raise ValueError(f"{data_args.dataset}: no split(s) {missing}; it has {sorted(loaded)}")
        dataset = DatasetDict({split: loaded[split] for split in splits})
    caps = {data_args.train_split: data_args.max_train_samples, data_args.eval_split: data_args.max_eval_samples}
    for split, cap in caps.items():
        if split in dataset and cap is not None:
            dataset[split] = dataset[split].select(range(min(cap, len(dataset[split]))))
    for name, feature in dataset[splits[0]].features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset

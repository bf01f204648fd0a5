"""Dataset cards for the built datasets: Hub YAML metadata plus source, licences, splits, knowledge, skip report.

The YAML carries `configs` (Parquet files per split, the layout `DatasetDict.push_to_hub` uses) and `dataset_info`
(features and split sizes), both written with the `datasets` library's own serialisers, so the Hub and
`datasets.load_dataset` read exactly what the builder wrote.
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
from datasets import DatasetDict, DatasetInfo, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

TEMPLATE_PATH = Path(__file__).with_name("dataset_card_template.md")
DATA_DIR = "data"
KNOWLEDGE_LICENCE = (
    "Knowledge column: ConceptNet 5 edges (or the vkood starter graph, written in ConceptNet's format under the "
    "same licence), CC-BY-SA 4.0; derived rows carry the share-alike obligation for that column."
)
CONCEPTNET_CITATION = """@inproceedings{speer2017conceptnet,
  title={{ConceptNet} 5.5: An Open Multilingual Graph of General Knowledge},
  author={Speer, Robyn and Chin, Joshua and Havasi, Catherine},
  booktitle={AAAI}, year={2017}}"""
_SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)
_SKIPS_SHOWN = 20


@dataclass(frozen=True)
class DatasetDescription:
    """What a builder knows about its source: names, licences, citations, and notes on derived columns."""

    name: str
    pretty_name: str
    summary: str
    homepage: str
    task_categories: list[str]
    licenses: list[str]  # Hub licence identifiers of everything in the rows
    licence_notes: list[str]  # which licence covers which part (annotations, images, ...)
    citations: list[str]
    notes: list[str] = field(default_factory=list)


def size_category(num_rows: int) -> str:
    """The Hub's size bucket for a row count."""
    return next((label for limit, label in _SIZE_CATEGORIES if num_rows < limit), "n>1M")


def knowledge_statistics(dataset: DatasetDict) -> dict:
    """Per split: rows, share of rows with knowledge, mean and max items per row; relation histogram overall."""
    per_split, relations = {}, Counter()
    for split, data in dataset.items():
        column = data.data.column("knowledge")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        per_split[split] = {
            "rows": len(lengths),
            "with_knowledge": float((lengths > 0).mean()) if len(lengths) else 0.0,
            "mean_items": float(lengths.mean()) if len(lengths) else 0.0,
            "max_items": int(lengths.max()) if len(lengths) else 0,
        }
        names = pc.struct_field(pc.list_flatten(column), "relation")
        relations.update({entry["values"]: entry["counts"] for entry in pc.value_counts(names).to_pylist()})
    histogram = dict(sorted(relations.items(), key=lambda pair: (-pair[1], pair[0])))
    return {"per_split": per_split, "relations": histogram}


def _card_data(description: DatasetDescription, dataset: DatasetDict) -> DatasetCardData:
    card_data = DatasetCardData(
        language=["en"],
        license=description.licenses,
        task_categories=description.task_categories,
        pretty_name=description.pretty_name,
        size_categories=[size_category(sum(len(split) for split in dataset.values()))],
        tags=["vkood", "knowledge", "conceptnet"],
    )
    configs = {"default": {"data_files": [{"split": s, "path": f"{DATA_DIR}/{s}-*"} for s in dataset]}}
    MetadataConfigs(configs).to_dataset_card_data(card_data)
    features = next(iter(dataset.values())).features
    splits = SplitDict()
    for split, data in dataset.items():
        splits.add(SplitInfo(name=split, num_examples=len(data)))
    DatasetInfosDict({"default": DatasetInfo(features=features, splits=splits)}).to_dataset_card_data(card_data)
    return card_data


def dataset_card(
    description: DatasetDescription,
    dataset: DatasetDict,
    skip_report: dict,
    knowledge_source: str,
    image_mode: str,
    repo_id: str | None = None,
) -> DatasetCard:
    """The README.md of a build. `skip_report` is `SkipReport.to_dict()`; `repo_id` only changes the load example."""
    features = next(iter(dataset.values())).features
    return DatasetCard.from_template(
        _card_data(description, dataset),
        template_path=str(TEMPLATE_PATH),
        description=description,
        splits={split: len(data) for split, data in dataset.items()},
        columns={
            name: repr(feature) if len(repr(feature)) < 120 else type(feature).__name__
            for name, feature in features.items()
        },
        knowledge=knowledge_statistics(dataset),
        knowledge_source=knowledge_source,
        knowledge_licence=KNOWLEDGE_LICENCE,
        citations=[*description.citations, CONCEPTNET_CITATION],
        skips=skip_report,
        skips_shown=skip_report["skipped"][:_SKIPS_SHOWN],
        image_mode=image_mode,
        repo_id=repo_id,
    )

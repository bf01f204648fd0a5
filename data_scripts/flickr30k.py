"""Flickr30k with the Karpathy splits (read with `coco_karpathy.build_karpathy_format`; same file format).

Input (name unchanged) in `root`: `dataset_flickr30k.json` (`images[]` with `filename`, `split`,
`sentences[].raw`, `imgid`). Images: `image_root/{filename}` (the `flickr30k-images` folder). Splits: train,
validation, test. `image_id` is Karpathy's `imgid` (the index in the split file), which every file of this format
has; the Flickr photo id is the `filename` stem. Knowledge as for COCO: per image, merged over its captions.
"""

from collections.abc import Sequence
from pathlib import Path

from hub_cards.dataset_card import DatasetDescription

from .coco_karpathy import build_karpathy_format
from .common import BuildResult

FILE = "dataset_flickr30k.json"
KARPATHY_SPLITS = {"train": "train", "val": "validation", "test": "test"}

DESCRIPTION = DatasetDescription(
    name="flickr30k",
    pretty_name="Flickr30k Karpathy splits with ConceptNet knowledge",
    summary="Flickr30k captions in the Karpathy splits (image-text retrieval), one row per image with its "
    "captions and commonsense knowledge retrieved from them.",
    homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
    task_categories=["image-to-text", "text-to-image"],
    licenses=["cc-by-sa-4.0", "other"],
    licence_notes=[
        "Captions and images: Flickr30k terms of use (non-commercial research and education; the photographs "
        "remain under the Flickr terms of use of their owners); split file by Karpathy and Fei-Fei.",
    ],
    citations=[
        """@article{young2014image,
  title={From image descriptions to visual denotations: New similarity metrics for semantic inference over
         event descriptions},
  author={Young, Peter and Lai, Alice and Hodosh, Micah and Hockenmaier, Julia},
  journal={TACL}, volume={2}, pages={67--78}, year={2014}}""",
        """@inproceedings{karpathy2015deep,
  title={Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li}, booktitle={CVPR}, year={2015}}""",
    ],
    notes=[
        "`image_id`: Karpathy's `imgid`; `split`: the image's Karpathy split.",
        "`knowledge`: per image, retrieved from every caption, merged round-robin and deduplicated.",
    ],
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
) -> BuildResult:
    """Flickr30k Karpathy splits from `root/dataset_flickr30k.json` and the images in `image_root`."""
    root, image_root = Path(root), Path(image_root)
    return build_karpathy_format(
        "flickr30k",
        root / FILE,
        KARPATHY_SPLITS,
        {"imgid": int},
        lambda record: record["imgid"],
        lambda record: (image_root / record["filename"],),
        knowledge,
        splits,
        strict=strict,
        max_knowledge_items=max_knowledge_items,
        num_proc=num_proc,
        image_mode=image_mode,
        check_images=check_images,
        work_dir=work_dir,
    )

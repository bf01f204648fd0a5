"""Dataset builders: official release files in, Parquet with knowledge annotations and a dataset card out.

One module per dataset (vqav2, okvqa, nlvr2, coco_karpathy, flickr30k, easy_vqa), each with
`build(root, image_root, knowledge, splits=None, max_knowledge_items=16, num_proc=1, strict=False,
image_mode="path", work_dir=None) -> BuildResult(dataset, skips)` (vqav2 and okvqa also take `vocabulary=`, a given
answer list in label order); `python -m data_scripts --help` for the CLI.
"""

from .common import BuildResult, SkipReport, answer_vocabulary

__all__ = ["BuildResult", "SkipReport", "answer_vocabulary"]

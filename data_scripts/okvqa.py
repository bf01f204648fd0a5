"""OK-VQA v1.0 from the official files, which use the VQA format (read by `vqav2.build_vqa_format`).

Inputs (names unchanged) in `root`: `OpenEnded_mscoco_{train,val}2014_questions.json` and
`mscoco_{train,val}2014_annotations.json`; images are COCO 2014 (`COCO_{train,val}2014_{image_id:012d}.jpg` in
`image_root/{train,val}2014/` or directly in `image_root`). Splits: train, validation.

Annotations: OK-VQA's records (v1.0 / v1.1) carry image_id, question_id, question_type, answer_type, confidence and
10 `answers` with answer / raw_answer / answer_confidence / answer_id, but no `multiple_choice_answer`: the column of
that name is derived as the most common `answer` (ties to the one given first). The metric and the targets use the
`answer` strings, as the official evaluation does.

Vocabulary: OK-VQA's own, from all 10 human answers (officially normalised) rather than the consensus answer only,
because OK-VQA answers are open-ended knowledge answers with weak consensus; an answer enters when it was given
for at least 3 questions of train+val. That keeps answers the metric can credit (3 matches score 0.9) while
dropping one-off spellings. `vocabulary=` (CLI `--answer-vocabulary`) gives the answers and their label order
instead, as for VQAv2 (see `vqav2`).
"""

from collections.abc import Sequence
from pathlib import Path

from hub_cards.dataset_card import DatasetDescription

from .common import BuildResult
from .vqav2 import VocabularyRule, VqaSplit, build_vqa_format

SPLITS = {
    "train": VqaSplit("OpenEnded_mscoco_train2014_questions.json", "mscoco_train2014_annotations.json", "train2014"),
    "validation": VqaSplit("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json", "val2014"),
}
VOCABULARY = VocabularyRule(min_questions=3, all_answers=True)

DESCRIPTION = DatasetDescription(
    name="okvqa",
    pretty_name="OK-VQA with ConceptNet knowledge",
    summary="OK-VQA v1.0 (outside-knowledge VQA on COCO images) with the official answers, soft answer targets "
    "over its own answer vocabulary and commonsense knowledge retrieved for every question.",
    homepage="https://okvqa.allenai.org",
    task_categories=["visual-question-answering"],
    licenses=["cc-by-4.0", "cc-by-sa-4.0", "other"],
    licence_notes=[
        "Questions and answers: CC-BY 4.0 (OK-VQA).",
        "Images: COCO, under the COCO terms of use (Flickr terms of use for the photographs).",
    ],
    citations=[
        """@inproceedings{marino2019okvqa,
  title={{OK-VQA}: A Visual Question Answering Benchmark Requiring External Knowledge},
  author={Marino, Kenneth and Rastegari, Mohammad and Farhadi, Ali and Mottaghi, Roozbeh},
  booktitle={CVPR}, year={2019}}""",
    ],
    notes=[
        "`label_ids`/`label_scores`: every vocabulary answer among the 10 human answers with the official VQA "
        "accuracy of answering it; the vocabulary is the ClassLabel of `label_ids`: answers given by annotators "
        "for at least 3 train+val questions.",
        "`answers`: the `answer` field of OK-VQA's 10 answer records (their `raw_answer`, `answer_confidence` and the "
        "question's `confidence` are not kept).",
        "`multiple_choice_answer`: OK-VQA's files name no consensus answer; this column holds the most common of "
        "the 10 answers (ties go to the one given first).",
        "`knowledge`: retrieved from the question text.",
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
    vocabulary: Sequence[str] | None = None,
) -> BuildResult:
    """OK-VQA from the official files in `root` and the COCO images in `image_root` (see the module docstring);
    `vocabulary`: fixed answers in label order instead of the selected ones."""
    return build_vqa_format(
        "okvqa",
        SPLITS,
        VOCABULARY,
        root,
        image_root,
        knowledge,
        splits,
        consensus_in_file=False,
        vocabulary=vocabulary,
        strict=strict,
        max_knowledge_items=max_knowledge_items,
        num_proc=num_proc,
        image_mode=image_mode,
        check_images=check_images,
        work_dir=work_dir,
    )

"""`--predict_split`: run the trained model on a split (which may have no answers, e.g. VQAv2 test-dev / test-std)
and write the official submission file (`modeling_vkood.evaluation.submission`): the classifier's answers, or the
generative head's generated answers (as its evaluation generates them), in the VQA results format.

When the dataset is built from official files (`--dataset vqav2 | okvqa | nlvr2` with `--dataset_root`), the file is
checked against the split's official question / identifier list: a build that skipped records (missing images)
cannot make a complete submission, and the run says so instead of writing a file the server would reject.
"""

import json
import logging
from pathlib import Path

import numpy as np

from data_scripts import nlvr2, okvqa, vqav2
from modeling_vkood.evaluation.submission import official_question_ids, write_nlvr2_predictions, write_vqa_results
from modeling_vkood.training.arguments import TEXT_ANSWER_TASKS, VQA_TASKS

logger = logging.getLogger(__name__)
SUFFIX = {"vqa": ".json", "generative_vqa": ".json", "blip_vqa": ".json", "nlvr2": ".csv"}


def predictions_path(data_args, output_dir: str) -> Path:
    """`--predictions_file`, or `<output_dir>/predictions_<split>.json` (VQA) / `.csv` (NLVR2)."""
    if data_args.predictions_file:
        return Path(data_args.predictions_file)
    return Path(output_dir) / f"predictions_{data_args.predict_split}{SUFFIX[data_args.task]}"


def official_ids(data_args, split: str) -> list | None:
    """The question ids / identifiers of `split`'s official file, when the run builds from official files."""
    if data_args.dataset not in ("vqav2", "okvqa", "nlvr2") or not data_args.dataset_root:
        return None
    root = Path(data_args.dataset_root)
    if data_args.dataset == "nlvr2":
        lines = (root / nlvr2.FILES[split]).read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["identifier"] for line in lines if line.strip()]
    splits = (vqav2 if data_args.dataset == "vqav2" else okvqa).SPLITS
    return official_question_ids(root / splits[split].questions)


def predicted_classes(trainer, dataset) -> np.ndarray:
    """The predicted class of every row of `dataset` (all processes take part; rows in dataset order).

    The run's `compute_metrics` belongs to the evaluation split and needs references this split may lack, so it
    is off during this pass.
    """
    compute_metrics, trainer.compute_metrics = trainer.compute_metrics, None
    try:
        output = trainer.predict(dataset, metric_key_prefix="predict")
    finally:
        trainer.compute_metrics = compute_metrics
    classes = np.asarray(output.predictions).reshape(-1)
    if classes.shape[0] != len(dataset):
        raise ValueError(f"{classes.shape[0]} predictions for the {len(dataset)} rows of the predicted split")
    return classes


def export_predictions(trainer, dataset, data_args, id2label: dict[int, str], output_dir: str) -> Path | None:
    """Predict `dataset[data_args.predict_split]` and write the submission file (main process); returns its path."""
    split = data_args.predict_split
    rows = dataset[split]
    if data_args.task in TEXT_ANSWER_TASKS:  # generated (or, VK-OOD-BLIP, ranked) as the evaluation answers
        labels = trainer.generate_answers(rows, description="predicting")
    else:
        labels = [id2label[int(label)] for label in predicted_classes(trainer, rows)]
    if not trainer.is_world_process_zero():
        return None
    path, expected = predictions_path(data_args, output_dir), official_ids(data_args, split)
    if data_args.task in VQA_TASKS:
        write_vqa_results(path, rows["question_id"], labels, expected)
    else:
        write_nlvr2_predictions(path, rows["identifier"], labels, expected)
    logger.info("wrote %d %s predictions in the official format to %s", len(labels), split, path)
    return path

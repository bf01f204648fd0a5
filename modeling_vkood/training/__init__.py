"""Training pieces behind train.py (not Hub remote code): arguments, data, collators, model set-up, Trainer, the OOD
layer's training objectives, metrics, retrieval evaluation, plots and the output folder."""

from .arguments import (
    PACKAGE_SCHEME,
    CardArguments,
    DataArguments,
    ModelArguments,
    VKOODTrainingArguments,
    parse_arguments,
    resolve_model_path,
)
from .collators import (
    BlipVQACollator,
    GenerativeVQACollator,
    NLVR2Collator,
    PixelCache,
    RetrievalCollator,
    VQACollator,
    soft_score_labels,
)
from .data import load_splits
from .gate_forcing import GateForcingSchedule
from .metrics import NLVR2Metrics, VQAMetrics, predicted_class
from .model_factory import BuiltModel, apply_finetuning, build_model, merged_model, new_parameter_names
from .ood_objectives import OODAlignmentLoss, calibrate_threshold, capture_ood_outputs
from .outputs import push_output_folder, save_output_folder
from .retrieval_eval import evaluate_retrieval
from .trainer import VKOODTrainer, collect_ood_scores

__all__ = [
    "PACKAGE_SCHEME",
    "BlipVQACollator",
    "BuiltModel",
    "CardArguments",
    "GenerativeVQACollator",
    "DataArguments",
    "GateForcingSchedule",
    "ModelArguments",
    "OODAlignmentLoss",
    "NLVR2Collator",
    "NLVR2Metrics",
    "PixelCache",
    "RetrievalCollator",
    "VKOODTrainer",
    "VKOODTrainingArguments",
    "VQACollator",
    "VQAMetrics",
    "apply_finetuning",
    "build_model",
    "calibrate_threshold",
    "capture_ood_outputs",
    "collect_ood_scores",
    "evaluate_retrieval",
    "load_splits",
    "merged_model",
    "new_parameter_names",
    "parse_arguments",
    "predicted_class",
    "push_output_folder",
    "resolve_model_path",
    "save_output_folder",
    "soft_score_labels",
]

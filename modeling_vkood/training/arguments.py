"""Run configuration: model, data and card arguments and `VKOODTrainingArguments`, filled from a YAML file, then from
the command line.

`python train.py configuration/vqav2.yaml --learning_rate 1e-4`: the YAML gives the run, CLI flags override single
fields; `--FIELD none` resets an optional field to None. Without a YAML file the embedded default
(`configuration/knowledge_vqa.yaml`) is used. The run configs ship with the package (`configuration/` is installed
as package data beside `modeling_vkood/`), so a `configuration/NAME.yaml` that does not exist relative to the
working directory is read from the installed copy: the README commands work outside a checkout too.
"""

import importlib.util
import json
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from data_scripts.image_check import IMAGE_CHECKS
from modeling_vkood.processing_vkood import KNOWLEDGE_PADDING

from .ood_objectives import OOD_ALIGNMENTS, OODAlignmentLoss

# "blip_vqa": VK-OOD-BLIP (`VKOODBlipForQuestionAnswering`), a VQA model of its own family: BLIP's weights from
# `init_from` (e.g. Salesforce/blip-vqa-base) or from `vision_config` / `text_config`, answers generated or ranked.
TASKS = ("vqa", "nlvr2", "retrieval", "generative_vqa", "blip_vqa")
VQA_TASKS = ("vqa", "generative_vqa", "blip_vqa")  # the tasks that read VQA datasets
# The tasks whose answers are texts the model writes or ranks (evaluated and predicted through `generate_texts`).
TEXT_ANSWER_TASKS = ("generative_vqa", "blip_vqa")
# What the generative head learns to write: the answer to the question, or (the SelTDA teacher) a question and its
# answer for the image alone.
GENERATION_TARGETS = ("answer", "question_answer")
FINETUNING = ("lora", "full")
PACKAGE_SCHEME = "package://"
# `configuration/` sits beside `modeling_vkood/` both in a checkout and in an installed wheel (package data).
SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configuration"
# The embedded default is the knowledge task: its answers are only in facts, two of eleven fit the image, so the run
# shows what the OOD layer is for (easy-VQA's answers are in the image: configuration/easy_vqa.yaml).
DEFAULT_CONFIG = SHIPPED_CONFIGS / "knowledge_vqa.yaml"
# Training arguments that transformers removed, and what replaces them, for a clear error on an older YAML.
REMOVED_TRAINING_ARGUMENTS = {
    "warmup_ratio": "warmup_steps (a float below 1 is a fraction of the training steps: warmup_steps: 0.1)",
}


def resolve_model_path(name_or_path: str | None) -> str | None:
    """`package://PKG/sub/dir` -> that folder inside the installed Python package PKG; anything else unchanged.

    Lets a run config name a model shipped inside a pip package (the embedded default's all-MiniLM-L6-v2) without
    an absolute path, so the YAML works on any machine.
    """
    if not name_or_path or not name_or_path.startswith(PACKAGE_SCHEME):
        return name_or_path
    package, _, inner = name_or_path[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name_or_path}: Python package {package!r} is not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / inner
    if not folder.is_dir():
        raise ValueError(f"{name_or_path}: {folder} does not exist")
    return str(folder)


def _json_field(value, name: str):
    """Dict fields come as dicts from YAML and as JSON strings from the command line."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"--{name} must be a JSON object, got {value!r} ({error})") from error
    return value


@dataclass
class ModelArguments:
    """Where the weights come from and how they are fine-tuned."""

    init_from: str | None = field(
        default=None,
        metadata={
            "aliases": ["--model_name_or_path"],
            "help": "a vkood checkpoint (Hub id or folder, e.g. a converted METER checkpoint) whose weights the run "
            "starts from; replaces the backbone options. With other labels than the checkpoint's (another answer "
            "vocabulary) the classifier's answer projection starts anew and its hidden layers are kept; a VQA run "
            "from a checkpoint with a VQA head builds its data over that head's answers",
        },
    )
    vision_model: str | None = field(default=None, metadata={"help": "pretrained vision backbone (Hub id or folder)"})
    vision_config: dict | str | None = field(
        default=None, metadata={"help": "vision backbone built from this config (trained from scratch), JSON"}
    )
    text_model: str | None = field(
        default=None, metadata={"help": "pretrained text backbone (Hub id, folder, or package://PKG/dir)"}
    )
    text_config: dict | str | None = field(default=None, metadata={"help": "text backbone built from a config, JSON"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer (default: the text backbone's)"})
    decoder_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "generative_vqa: the text decoder built from this config (any causal LM config with "
            "cross-attention, e.g. a small BERT), JSON; default: the text backbone's config as a decoder. "
            "It reads the processor's tokenizer, so its vocabulary must cover it"
        },
    )
    decoder_model: str | None = field(
        default=None,
        metadata={
            "help": "generative_vqa: a pretrained causal LM checkpoint as the decoder (loaded with "
            "is_decoder=True and new cross-attention layers, trained in full); it must share the text "
            "backbone's tokenizer (e.g. the text backbone itself, as BLIP initialises its decoder from BERT)"
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "image side for a vision backbone built from a config (default: its image_size)"},
    )
    vkood_config: dict | str | None = field(
        default=None, metadata={"help": "VKOODConfig fields (hidden_size, num_fusion_layers, ood_*, ...), JSON"}
    )
    backbone_dropout: float | None = field(
        default=None,
        metadata={
            "help": "set every dropout probability of the pretrained backbones' configs to this value "
            "(default: keep theirs); 0 on short CPU runs saves the time of drawing the dropout masks"
        },
    )
    finetuning: str = field(default="lora", metadata={"help": f"one of {FINETUNING}"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "attention projection names adapted with LoRA inside the pretrained backbones (default: "
            "the model's `lora_projections`: query, key, value, q_proj, k_proj, v_proj)"
        },
    )
    lora_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "indices of the backbone layers that get LoRA (default: all); the backward pass then stops "
            "at the lowest adapted layer"
        },
    )
    given_backbones: dict = field(
        init=False,
        default_factory=dict,
        metadata={"help": "the backbone names as given, before package:// is resolved"},
    )

    def __post_init__(self):
        self.given_backbones = {"vision": self.vision_model, "text": self.text_model}  # for the model card
        for name in ("vision_config", "text_config", "vkood_config", "decoder_config"):
            setattr(self, name, _json_field(getattr(self, name), name))
        self.vkood_config = dict(self.vkood_config or {})
        if self.finetuning not in FINETUNING:
            raise ValueError(f"--finetuning must be one of {FINETUNING}, got {self.finetuning!r}")
        self.text_model = resolve_model_path(self.text_model)
        self.vision_model = resolve_model_path(self.vision_model)
        self.decoder_model = resolve_model_path(self.decoder_model)
        if self.decoder_model is not None and self.decoder_config is not None:
            raise ValueError("give at most one of --decoder_model (pretrained) and --decoder_config (from scratch)")
        self.tokenizer_name = resolve_model_path(self.tokenizer_name)
        if self.init_from is None:
            for side in ("vision", "text"):
                given = [getattr(self, f"{side}_model") is not None, getattr(self, f"{side}_config") is not None]
                if sum(given) != 1:
                    raise ValueError(
                        f"give exactly one of --{side}_model (pretrained) and --{side}_config (from scratch), "
                        "or a vkood checkpoint with --init_from"
                    )


@dataclass
class DataArguments:
    """Which dataset, which splits, and how the examples are prepared."""

    task: str = field(default="vqa", metadata={"help": f"one of {TASKS}"})
    dataset: str = field(
        default="knowledge_vqa",
        metadata={
            "help": "a data_scripts builder (easy_vqa, vqav2, okvqa, nlvr2, coco_karpathy, flickr30k), or a "
            "built dataset (folder written by `python -m data_scripts` or a Hub dataset id)"
        },
    )
    dataset_root: str | None = field(default=None, metadata={"help": "official annotation files (builders)"})
    image_root: str | None = field(default=None, metadata={"help": "images (builders; default dataset_root)"})
    knowledge: str = field(
        default="starter", metadata={"help": 'knowledge index for builders and retrieval texts: a path or "starter"'}
    )
    train_split: str = "train"
    eval_split: str = "validation"
    predict_split: str | None = field(
        default=None,
        metadata={
            "help": "a split to predict at the end (it may have no answers: VQAv2 test_dev / test), written "
            "in the official submission format: VQA results JSON (the classifier's or the generated answers), "
            "NLVR2 identifier,prediction CSV"
        },
    )
    predictions_file: str | None = field(
        default=None,
        metadata={"help": "where --predict_split's file goes (default: output_dir/predictions_<split>.json / .csv)"},
    )
    max_train_samples: int | None = None
    train_fraction: float | None = field(
        default=None,
        metadata={
            "help": "train on this share of the training split (0 < f <= 1): the first round(f * rows) rows of "
            "a fixed shuffle (seed 0, whatever --seed: runs of different seeds see the same rows); after "
            "max_train_samples"
        },
    )
    max_eval_samples: int | None = None
    preprocessing_num_workers: int = 1
    check_images: str = field(
        default="decode",
        metadata={
            "help": 'how builders check each image file: "decode" (fully, as the collator will), "header" '
            '(open only: fast, misses truncated files) or "none" (existence only)'
        },
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "where built datasets are kept, keyed by their inputs, for later runs and the other "
            "processes (default: HF_DATASETS_CACHE/vkood)"
        },
    )
    pixel_cache_size: int = field(
        default=0,
        metadata={
            "help": "images whose pixel values the collator keeps in memory (0: none); set it to the number "
            "of distinct images of a small dataset so each image is decoded once"
        },
    )
    balance_by: str | None = field(
        default=None,
        metadata={
            "help": "a training column (e.g. question_type): draw rows with replacement so that each of its "
            "values is equally frequent; for a task type that is rare in the data but needs its own features"
        },
    )

    labelled_fraction: float | None = field(
        default=None,
        metadata={
            "help": "VQA tasks, data-scarce setting: keep the questions of this fraction of the training "
            "images (drawn with --labelled_fraction_seed); the other training images are the unlabelled pool "
            "that SelTDA pseudo-labels (`python -m modeling_vkood.training.seltda`). None: every question"
        },
    )
    labelled_fraction_seed: int = field(
        default=0, metadata={"help": "seed of the draw of --labelled_fraction's images (the same for every run seed)"}
    )
    pseudo_labelled_dataset: str | None = field(
        default=None,
        metadata={
            "help": "VQA tasks: a dataset written by `python -m modeling_vkood.training.seltda` (a folder or a "
            "Hub id) whose train split is added to the (labelled) training split: SelTDA's step 3"
        },
    )
    generation_target: str = field(
        default="answer",
        metadata={
            "help": f"generative_vqa: one of {GENERATION_TARGETS}: the most frequent human answer of each "
            'question, or "question: Q answer: A" for the image alone (the SelTDA teacher, no question '
            "and no knowledge given)"
        },
    )
    max_answer_length: int = field(
        default=32,
        metadata={"help": "generative_vqa, blip_vqa: tokens of a target text, start and end tokens included"},
    )

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.generation_target not in GENERATION_TARGETS:
            raise ValueError(f"--generation_target must be one of {GENERATION_TARGETS}, got {self.generation_target!r}")
        if self.labelled_fraction is not None and not 0.0 < self.labelled_fraction <= 1.0:
            raise ValueError(f"--labelled_fraction must be in (0, 1], got {self.labelled_fraction}")
        if (self.labelled_fraction is not None or self.pseudo_labelled_dataset) and self.task not in VQA_TASKS:
            raise ValueError("--labelled_fraction / --pseudo_labelled_dataset are for the VQA tasks")
        if self.predict_split is not None and self.task == "generative_vqa" and self.generation_target != "answer":
            raise ValueError(
                "--predict_split writes answers: a generative_vqa run predicts with "
                f"--generation_target answer, not {self.generation_target!r}"
            )
        if self.predict_split is not None and self.task == "retrieval":
            raise ValueError("--predict_split writes VQA or NLVR2 submission files; retrieval has no such format")
        if self.train_fraction is not None and not 0 < self.train_fraction <= 1:
            raise ValueError(f"--train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.check_images not in IMAGE_CHECKS:
            raise ValueError(f"--check_images must be one of {IMAGE_CHECKS}, got {self.check_images!r}")


@dataclass
class VKOODTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments` plus what a vkood run trains and evaluates with: learning rates of the new
    modules and of tau, the training objectives (OOD alignment and calibration, gate forcing, MAD, MASD), WiSE-FT, the
    frozen-text cache, generative decoding and the OOD plots. None of it is saved with the model."""

    new_modules_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the newly initialised modules (fusion, OOD, heads, from-scratch "
            "backbones); default: learning_rate"
        },
    )
    ood_threshold_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the OOD threshold tau (no weight decay); default: "
            "new_modules_learning_rate. Adam moves a parameter by about its learning rate per step, and tau "
            "lives on the scale of the scores (units, not 1e-4s): a gate trained by `ood_alignment=gate` "
            "needs tau to travel several units"
        },
    )
    ood_gate_forcing_steps: int = field(
        default=0,
        metadata={
            "help": "optimizer steps during which the fusion sees the relevance labels (the knowledge items "
            "that state the training answer) as the OOD gate, while the OOD layer learns from its alignment "
            "loss (VQA; see modeling_vkood/training/gate_forcing.py); 0: the learned gate from the start"
        },
    )
    ood_gate_handover_steps: int = field(
        default=0,
        metadata={
            "help": "optimizer steps after --ood_gate_forcing_steps over which the forced gate hands over "
            "linearly to the learned one"
        },
    )
    mad_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of multimodal adaptive distillation (MAD): the pretrained unimodal encoders, as they "
            "were before fine-tuning, teach the fused question and image tokens (VQA; a backbone trained from "
            "scratch is not distilled; see modeling_vkood/training/distillation.py); 0: off"
        },
    )
    mad_temperature: float = field(
        default=0.05, metadata={"help": "MAD: temperature of the teacher's token salience (lower: sharper choice)"}
    )
    mad_token_fraction: float = field(
        default=0.5, metadata={"help": "MAD: share of each example's real tokens distilled, the most salient first"}
    )
    masd_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of modality-augmented self-distillation (MASD): the model on an input with one "
            "modality removed learns its own predictions on the full input (VQA, NLVR2; see "
            "modeling_vkood/training/self_distillation.py); 0: off"
        },
    )
    masd_temperature: float = field(default=1.0, metadata={"help": "MASD: distillation temperature"})
    masd_augmentations: list[str] = field(
        default_factory=lambda: ["image", "question", "shorten", "knowledge"],
        metadata={"help": "MASD: the modality augmentations drawn per example (image, question, shorten, knowledge)"},
    )
    wise_ft_alpha: float | None = field(
        default=None,
        metadata={
            "help": "WiSE-FT after training: the pretrained backbones' weights become (1 - alpha) initial + "
            "alpha fine-tuned (LoRA: the adapter delta scaled by alpha); the new modules keep their "
            "fine-tuned weights (see modeling_vkood/training/wise_ft.py). Applied once training ends: the "
            "checkpoints keep the fine-tuned weights (a resumed run interpolates at its end); None: off"
        },
    )

    knowledge_padding: str | None = field(
        default=None,
        metadata={
            "help": "how batches pad their knowledge items (VKOODProcessor's knowledge_padding): longest, max_length "
            "or bucket (item length to a multiple of 8, the item count at the cap: few shapes for torch.compile); "
            "None: bucket under FSDP (every process must encode as many item rows), else longest"
        },
    )
    cache_frozen_text_blocks: bool = field(
        default=False,
        metadata={
            "help": "keep the outputs of the text encoder's frozen lower blocks (below the lowest LoRA layer) "
            "per distinct token row and look them up instead of recomputing them; needs backbone dropout 0 "
            "(see modeling_vkood/training/frozen_text_cache.py)"
        },
    )
    ood_alignment: str = field(
        default="gate",
        metadata={
            "help": f"the OOD layer's alignment objective, one of {OOD_ALIGNMENTS} (see "
            "modeling_vkood/training/ood_objectives.py); applied with --ood_alignment_weight > 0"
        },
    )
    ood_alignment_weight: float = field(
        default=0.0, metadata={"help": "weight of the OOD alignment objective (VQA, NLVR2, generative VQA); 0: off"}
    )
    ood_alignment_temperature: float = field(
        default=1.0, metadata={"help": "divides the OOD scores in the alignment's InfoNCE logits"}
    )
    ood_cross_image_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight, within the contrastive and gate alignments, of the cross-image InfoNCE: each item "
            "that states a training answer must score higher under its own image's mixture than under the "
            "batch's other images'; 0: off"
        },
    )
    ood_calibration_quantile: float | None = field(
        default=0.1,
        metadata={
            "help": "before training, an OOD layer whose score has no natural zero (GEM) and whose tau was never "
            "set from data starts tau at this quantile of the scores of the first step's examples, so that the "
            "knowledge path starts open; none: keep ImplicitOODConfig.threshold"
        },
    )
    generation_max_new_tokens: int = field(
        default=16, metadata={"help": "generative_vqa, blip_vqa evaluation: most tokens generated per answer"}
    )
    generation_num_beams: int = field(
        default=1,
        metadata={"help": "generative_vqa, blip_vqa evaluation: beams of the beam search (1: greedy decoding)"},
    )
    ood_plot_examples: int = field(default=512, metadata={"help": "eval examples whose OOD scores are plotted"})

    def __post_init__(self):
        super().__post_init__()
        if self.mad_weight < 0 or self.masd_weight < 0:
            raise ValueError(f"--mad_weight and --masd_weight must be >= 0, got {self.mad_weight}, {self.masd_weight}")
        if self.wise_ft_alpha is not None and not 0 <= self.wise_ft_alpha <= 1:
            raise ValueError(f"--wise_ft_alpha must be in [0, 1], got {self.wise_ft_alpha}")
        if self.ood_calibration_quantile is not None and not 0.0 <= self.ood_calibration_quantile <= 1.0:
            raise ValueError(f"--ood_calibration_quantile must be in [0, 1], got {self.ood_calibration_quantile}")
        # the objective validates its own settings
        OODAlignmentLoss(
            self.ood_alignment, self.ood_alignment_weight, self.ood_alignment_temperature, self.ood_cross_image_weight
        )


@dataclass
class CardArguments:
    """What the model card says beyond the measured results."""

    model_name: str | None = field(default=None, metadata={"help": "card title (default: output_dir's name)"})
    dataset_id: str | None = field(default=None, metadata={"help": "Hub id of the dataset for the card metadata"})
    license: str = "apache-2.0"


ARGUMENT_CLASSES = (ModelArguments, DataArguments, CardArguments, VKOODTrainingArguments)


def resolve_config_path(given: str) -> Path:
    """The run config `given`: that file if it exists, else the shipped copy of `configuration/NAME.yaml`."""
    path = Path(given)
    if path.is_file():
        return path
    parts = path.parts
    shipped = SHIPPED_CONFIGS.joinpath(*parts[1:]) if len(parts) > 1 and parts[0] == SHIPPED_CONFIGS.name else None
    if shipped is not None and shipped.is_file():
        return shipped
    shipped_names = sorted(config.name for config in SHIPPED_CONFIGS.glob("*.yaml"))
    raise FileNotFoundError(f"{given}: no such run config (shipped in {SHIPPED_CONFIGS}: {shipped_names})")


def parse_arguments(argv: list[str] | None = None):
    """(model, data, card, training) arguments from `[config.yaml] [--field value ...]`; CLI wins over YAML."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = resolve_config_path(argv.pop(0)) if argv and argv[0].endswith((".yaml", ".yml")) else DEFAULT_CONFIG
    values = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{config_path}: expected a mapping of argument names to values")
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = "".join(
            f"; {name} was removed by transformers: use {REMOVED_TRAINING_ARGUMENTS[name]}"
            for name in unknown
            if name in REMOVED_TRAINING_ARGUMENTS
        )
        raise ValueError(f"{config_path}: unknown argument(s) {unknown}{hints}")
    argv, reset = _none_resets(argv)
    # Without an accelerator device, run in accelerate's CPU mode: then the processes of `accelerate launch
    # --config_file configuration/accelerate/ddp.yaml --num_processes N` (or torchrun) form one gloo group; with
    # use_cpu=False on such a machine accelerate reports no distribution and every process trains alone.
    machine = {"use_cpu": not torch.accelerator.is_available()}
    parser.set_defaults(**{**machine, **values, **reset})
    parsed = parser.parse_args_into_dataclasses(args=argv)
    training_args = parsed[-1]
    # accelerate applies an FSDP config on accelerator devices only (`AcceleratorState` enters FSDP from the
    # multi-GPU/XPU/NPU/... types): in its CPU mode it runs plain data parallel, and with use_cpu=False on a machine
    # without a device every process trains alone. The FSDP code paths themselves run on CPU (tests/test_fsdp.py).
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and (training_args.use_cpu or not torch.accelerator.is_available()):
        raise ValueError(
            "FSDP needs an accelerator device: on CPU accelerate ignores the FSDP config and would run "
            "plain data parallel; use configuration/accelerate/ddp.yaml on CPU"
        )
    if training_args.knowledge_padding is None:
        training_args.knowledge_padding = "bucket" if fsdp else "longest"
    if training_args.knowledge_padding not in KNOWLEDGE_PADDING:
        raise ValueError(
            f"--knowledge_padding must be one of {KNOWLEDGE_PADDING}, got {training_args.knowledge_padding!r}"
        )
    if training_args.dataloader_num_workers == 0:
        # Persistent workers need workers (torch's DataLoader raises otherwise): a YAML that keeps its 8 workers
        # alive stays usable with `--dataloader_num_workers 0`.
        training_args.dataloader_persistent_workers = False
    return parsed


def _optional_fields() -> set[str]:
    """The argument fields that accept None."""
    names = set()
    for cls in ARGUMENT_CLASSES:
        hints = typing.get_type_hints(cls)
        names.update(f.name for f in fields(cls) if f.init and type(None) in typing.get_args(hints[f.name]))
    return names


def _none_resets(argv: list[str]) -> tuple[list[str], dict]:
    """(argv without them, {field: None}) for each `--FIELD none` / `--FIELD=none` of an optional field, so the
    command line can unset what the YAML sets (e.g. `--balance_by none`, or `--vision_config none` next to
    `--vision_model`); argparse itself would read "none" as a string, or fail to parse it as a number."""
    optional, kept, reset = _optional_fields(), [], {}
    index = 0
    while index < len(argv):
        flag, has_value, value = argv[index].partition("=")
        if not has_value and index + 1 < len(argv):
            value = argv[index + 1]
        name = flag[2:] if flag.startswith("--") else None
        if name in optional and value.lower() == "none":
            reset[name] = None
            index += 1 if has_value else 2
            continue
        kept.append(argv[index])
        index += 1
    return kept, reset

"""Build the VK-OOD model and processor for a run, then set up what is trained (LoRA via PEFT, or everything).

Rule for LoRA runs: LoRA adapts the attention of backbones loaded with *pretrained* weights; every module that
starts from a random initialisation (fusion, OOD layer, heads, projections, and a backbone built from a config) is
trained in full through PEFT's `modules_to_save`.
"""

import logging
from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    PretrainedConfig,
)

from modeling_vkood import (
    VKOODBlipConfig,
    VKOODBlipForQuestionAnswering,
    VKOODBlipProcessor,
    VKOODConfig,
    VKOODForConditionalGeneration,
    VKOODForImagesAndTextClassification,
    VKOODForImageTextRetrieval,
    VKOODForQuestionAnswering,
    VKOODProcessor,
)
from modeling_vkood.decoder_targets_vkood import tokenizer_decoder_tokens
from modeling_vkood.modeling_vkood import backbone_kwargs

logger = logging.getLogger(__name__)

TASK_MODELS = {
    "vqa": VKOODForQuestionAnswering,
    "nlvr2": VKOODForImagesAndTextClassification,
    "retrieval": VKOODForImageTextRetrieval,
    "generative_vqa": VKOODForConditionalGeneration,
}


@dataclass
class BuiltModel:
    """The model to train and its processor."""

    model: nn.Module
    processor: VKOODProcessor

    @property
    def pretrained_backbones(self) -> tuple[str, ...]:
        """The backbones that hold pretrained weights (LoRA targets), as the model's config records them."""
        return tuple(self.model.config.pretrained_backbones)


def _override_dropout(config, probability: float):
    """Every float field named *dropout* / *dropout_prob* (BERT, CLIP, ViT and most families name them so)."""
    for name, value in config.to_dict().items():
        if (name.endswith("dropout") or name.endswith("dropout_prob")) and isinstance(value, float):
            setattr(config, name, probability)


def _backbone(name_or_path, config_dict, side: str, dropout: float | None = None):
    """(config, pretrained module or None) of one backbone; a composite checkpoint gives its vision tower."""
    if name_or_path is None:
        config_dict = dict(config_dict)
        return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict), None
    config = AutoConfig.from_pretrained(name_or_path)
    if side == "vision":
        config = getattr(config, "vision_config", None) or config
    if dropout is not None:
        _override_dropout(config, dropout)
    return config, AutoModel.from_pretrained(name_or_path, config=config, **backbone_kwargs(config))


def _image_processor(model_args, vision_config):
    """The pretrained backbone's image processor, or a CLIP-style one (PIL backend) for a from-scratch backbone."""
    if model_args.vision_model is not None:
        return AutoImageProcessor.from_pretrained(model_args.vision_model, backend="pil")  # no torchvision needed
    size = model_args.image_size or getattr(vision_config, "image_size", None)
    if size is None:
        raise ValueError("set --image_size for a vision backbone built from a config without image_size")
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def max_knowledge_items(model_args) -> int:
    """The model config's cap on the knowledge items per example (`VKOODConfig.max_knowledge_items`), known before
    the model is built: the run's `vkood_config`, else the checkpoint's config, else the default. The datasets that
    train.py builds, the collators and the processor all take it from here."""
    if "max_knowledge_items" in model_args.vkood_config:
        return model_args.vkood_config["max_knowledge_items"]
    if model_args.init_from is not None:
        return checkpoint_config(model_args.init_from).max_knowledge_items
    return VKOODConfig.max_knowledge_items  # the field's default, without building a config


def checkpoint_model_type(name_or_path: str) -> str | None:
    """The `model_type` a checkpoint's config.json names (BLIP's "blip", "vkood_blip", "vkood", ...)."""
    return PretrainedConfig.get_config_dict(name_or_path)[0].get("model_type")


def checkpoint_config(name_or_path: str):
    """The config of an `--init_from` checkpoint: a `VKOODBlipConfig` for a BLIP (`Salesforce/blip-vqa-*`) or
    VK-OOD-BLIP checkpoint (a BLIP config reads as one, with VK-OOD's defaults), else a `VKOODConfig`."""
    blip = checkpoint_model_type(name_or_path) in ("blip", VKOODBlipConfig.model_type)
    return (VKOODBlipConfig if blip else VKOODConfig).from_pretrained(name_or_path)


def checkpoint_answers(model_args) -> list[str] | None:
    """The answers of the `--init_from` checkpoint's VQA classifier in label order, or None when it has no VQA head.

    A VQA run from such a checkpoint builds its labels over this list (the VQA builders take it), so that the trained
    classifier keeps answering with the same outputs. A converted METER checkpoint whose labels are only numbered
    (`answer_{i}`: converted without the annotation files) cannot say which answer an output stands for."""
    if model_args.init_from is None:
        return None
    config = checkpoint_config(model_args.init_from)
    if isinstance(config, VKOODBlipConfig):  # VK-OOD-BLIP ranks over its answer list (a BLIP checkpoint has none)
        return config.answer_list
    if "VKOODForQuestionAnswering" not in (config.architectures or []):
        return None
    answers = [config.id2label[index] for index in range(len(config.id2label))]
    if all(answer == f"answer_{index}" for index, answer in enumerate(answers)):
        raise ValueError(
            f"{model_args.init_from}: its VQA labels are numbered, not named; convert the METER checkpoint with "
            "--vqa_annotations DIR (the official annotation files) to name them by METER's answer list"
        )
    return answers


def build_model(model_args, task: str, id2label: dict[int, str] | None = None) -> BuiltModel:
    """The task model from a vkood checkpoint or from two backbones (each pretrained or built from a config)."""
    model_class = TASK_MODELS[task]
    labels = {} if id2label is None else {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if model_args.init_from is not None:
        saved_labels = VKOODConfig.from_pretrained(model_args.init_from).id2label
        model, loading = model_class.from_pretrained(
            model_args.init_from,
            **labels,
            **model_args.vkood_config,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
        if id2label is not None and saved_labels != id2label and hasattr(model, "classifier"):
            # Other labels (another vocabulary, or the same answers in another order): the answer projection, whose
            # rows are the labels, starts anew (transformers already re-drew it if its size changed); the
            # classifier's hidden layers are kept: in the warm-start study (benchmarks/README.md) a warm start kept
            # them and learnt, a whole new classifier stayed at chance.
            answers = [module for module in model.classifier.modules() if isinstance(module, nn.Linear)][-1]
            if not any(key.startswith("classifier.") for key, *_ in loading["mismatched_keys"]):
                logger.warning(
                    "%s: other labels than this run's; its answer projection starts anew", model_args.init_from
                )
                for tensor in answers.parameters():  # loaded tensors are marked initialised: unmark them
                    tensor._is_hf_initialized = False
                answers._is_hf_initialized = False
                model._init_weights(answers)
        processor = AutoProcessor.from_pretrained(model_args.init_from)
        return BuiltModel(model, processor)  # the checkpoint's config says which backbones were pretrained

    dropout = model_args.backbone_dropout
    vision_config, vision = _backbone(model_args.vision_model, model_args.vision_config, "vision", dropout)
    text_config, text = _backbone(model_args.text_model, model_args.text_config, "text", dropout)
    loaded = {"vision_model": vision, "text_model": text}
    tokenizer_name = model_args.tokenizer_name or model_args.text_model
    if tokenizer_name is None:
        raise ValueError("a text backbone built from a config needs --tokenizer_name")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    decoder_config, decoder = None, None
    if task == "generative_vqa":
        decoder_config, decoder = _decoder(model_args, text_config, tokenizer)
    config = VKOODConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        decoder_config=decoder_config,
        pretrained_backbones=[name for name, module in loaded.items() if module is not None],
        **labels,
        **model_args.vkood_config,
    )
    model = model_class(config)
    for name in config.pretrained_backbones:
        setattr(model.vkood, name, loaded[name])
        loaded[name].config = getattr(model.config, name.replace("_model", "_config"))
    if decoder is not None:  # trained in full: its new cross-attention layers start from a random initialisation
        model.text_decoder = decoder
        decoder.config = model.config.decoder_config
    processor = VKOODProcessor.from_model_config(_image_processor(model_args, vision_config), tokenizer, config)
    return BuiltModel(model, processor)


def _decoder(model_args, text_config, tokenizer) -> tuple[dict, nn.Module | None]:
    """(decoder config as a dict, pretrained decoder or None) of a generative run: `--decoder_model` loaded as a
    causal LM with cross-attention, or a decoder built from `--decoder_config` (default: the text backbone's
    config). Its start / end / padding tokens are the tokenizer's (`VKOODProcessor.decoder_special_tokens`)."""
    special = tokenizer_decoder_tokens(tokenizer)
    decoder = None
    if model_args.decoder_model is not None:
        decoder = AutoModelForCausalLM.from_pretrained(
            model_args.decoder_model, is_decoder=True, add_cross_attention=True, **special
        )
        config = decoder.config.to_dict()
    elif model_args.decoder_config is not None:
        config = dict(model_args.decoder_config)
    else:
        config = text_config.to_dict()
    config.update(special)
    vocabulary = config.get("vocab_size")
    if vocabulary is not None and vocabulary < len(tokenizer):
        raise ValueError(
            f"the decoder's vocab_size ({vocabulary}) is smaller than the tokenizer's {len(tokenizer)} "
            "tokens: the decoder writes the processor's tokens"
        )
    return config, decoder


def build_blip_model(model_args, answer_list: list[str] | None = None) -> BuiltModel:
    """VK-OOD-BLIP and its processor: from a BLIP or VK-OOD-BLIP checkpoint (`init_from`, e.g.
    Salesforce/blip-vqa-base: every BLIP weight loaded as it is, the VK-OOD modules new) or built from
    `vision_config` / `text_config` (BLIP's sub-configs; trained from scratch, `tokenizer_name` needed).

    `vkood_config` sets `VKOODBlipConfig` fields (ood_config, knowledge caps, inference, k_test); `answer_list` (the
    dataset's answer vocabulary) becomes the candidates of rank inference. `image_size` makes that the vision tower's
    size as BLIP fine-tunes at 480 px from its 384 px checkpoints (`resize_image_size`); `backbone_dropout` sets
    every dropout of BLIP's sub-configs."""
    settings = dict(model_args.vkood_config)
    if answer_list is not None:
        settings["answer_list"] = list(answer_list)
    if model_args.init_from is not None:
        config = VKOODBlipConfig.from_pretrained(model_args.init_from, **settings)
    else:
        if model_args.tokenizer_name is None:
            raise ValueError("a VK-OOD-BLIP built from configs needs --tokenizer_name")
        config = VKOODBlipConfig(
            vision_config=model_args.vision_config,
            text_config=model_args.text_config,
            pretrained_backbones=[],
            **settings,
        )
    if model_args.backbone_dropout is not None:
        _override_dropout(config.vision_config, model_args.backbone_dropout)
        _override_dropout(config.text_config, model_args.backbone_dropout)
    if model_args.init_from is None:
        model = VKOODBlipForQuestionAnswering(config)
        size = config.vision_config.image_size
        image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
        processor = VKOODBlipProcessor.from_model_config(image_processor, tokenizer, config)
    else:
        model = VKOODBlipForQuestionAnswering.from_pretrained(model_args.init_from, config=config)
        if checkpoint_model_type(model_args.init_from) == VKOODBlipConfig.model_type:
            processor = VKOODBlipProcessor.from_pretrained(model_args.init_from)  # its knowledge source with it
        else:
            processor = VKOODBlipProcessor.from_blip_pretrained(model_args.init_from, config)
    if model_args.image_size is not None:
        model.resize_image_size(model_args.image_size)
        processor.image_processor.size = {"height": model_args.image_size, "width": model_args.image_size}
    return BuiltModel(model, processor)


def apply_finetuning(built: BuiltModel, model_args) -> nn.Module:
    """Full fine-tuning (model unchanged) or a PeftModel with LoRA on the pretrained backbones' attention."""
    model = built.model
    if model_args.finetuning == "full":
        model.requires_grad_(True)
        return model
    lora = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model.lora_target_modules(model_args.lora_target_modules, model_args.lora_layers),
        modules_to_save=model.modules_to_save(),
    )
    return get_peft_model(model, lora)


def new_parameter_names(model: nn.Module, pretrained_backbones: tuple[str, ...]) -> set[str]:
    """Trainable parameters that start from a random initialisation (they get `new_modules_learning_rate`)."""
    if isinstance(model, PeftModel):
        return {name for name, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in name}
    # A VK-OOD head holds its backbones inside its base model; VK-OOD-BLIP holds them itself, as BLIP's heads do.
    prefix = f"{model.base_model_prefix}." if hasattr(model, model.base_model_prefix) else ""
    inside_backbone = tuple(f"{prefix}{name}." for name in pretrained_backbones)
    return {name for name, p in model.named_parameters() if p.requires_grad and not name.startswith(inside_backbone)}


def merged_model(model: nn.Module) -> nn.Module:
    """The plain task model to publish: LoRA folded into the backbone weights, trained module copies swapped in."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model

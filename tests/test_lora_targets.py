"""LoRA targets come from one place (the model), and a checkpoint remembers which backbones were pretrained, so a run
continuing from it adapts those with LoRA and keeps training a from-scratch backbone in full."""

import re

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from modeling_vkood import VKOODForQuestionAnswering
from modeling_vkood.training import apply_finetuning, build_model
from modeling_vkood.training.arguments import ModelArguments
from tests.utils.tiny import tiny_vkood_config

RESNET = {
    "model_type": "resnet",
    "num_channels": 3,
    "embedding_size": 8,
    "hidden_sizes": [8, 16],
    "depths": [1, 1],
    "layer_type": "basic",
}
VKOOD = {
    "hidden_size": 16,
    "num_fusion_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "ood_config": {"projection_dim": 4, "max_iter": 3},
    "max_knowledge_items": 2,
    "knowledge_max_length": 8,
}


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, minilm_path) -> str:
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def lora_args(**fields):
    return ModelArguments(finetuning="lora", lora_r=2, lora_alpha=4, vkood_config=dict(VKOOD), **fields)


def adapted_modules(model):
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}


def test_the_factory_adapts_exactly_what_the_model_method_names(text_model):
    args = lora_args(vision_config=dict(RESNET), text_model=text_model, image_size=32, lora_layers=[1])
    built = build_model(args, "vqa", {0: "yes", 1: "no"})
    assert built.model.config.pretrained_backbones == ["text_model"]
    pattern = built.model.lora_target_modules(None, [1])
    expected = {f"base_model.model.{name}" for name, _ in built.model.named_modules() if re.fullmatch(pattern, name)}
    model = apply_finetuning(built, args)
    assert adapted_modules(model) == expected
    assert expected and all(".text_model.encoder.layer.1." in name for name in expected)
    assert {name.rsplit(".", 1)[-1] for name in expected} == {"query", "key", "value"}  # the model's lora_projections


def test_a_continued_run_trains_the_from_scratch_backbone_in_full(text_model, tmp_path):
    first = build_model(
        lora_args(vision_config=dict(RESNET), text_model=text_model, image_size=32), "vqa", {0: "a", 1: "b"}
    )
    first.model.save_pretrained(tmp_path)
    first.processor.save_pretrained(tmp_path)

    continued = build_model(lora_args(init_from=str(tmp_path)), "vqa")
    assert continued.pretrained_backbones == ("text_model",)
    model = apply_finetuning(continued, lora_args(init_from=str(tmp_path)))
    vision = {
        name: p for name, p in model.named_parameters() if ".vision_model." in name and ".original_module." not in name
    }
    assert vision and all(p.requires_grad for p in vision.values())  # the ResNet keeps learning in full
    assert adapted_modules(model) and all(".text_model." in name for name in adapted_modules(model))
    text = [p for name, p in model.named_parameters() if ".text_model." in name and "lora_" not in name]
    assert text and not any(p.requires_grad for p in text)  # the pretrained text encoder is adapted, not retrained


def test_a_model_without_pretrained_backbones_refuses_lora():
    model = VKOODForQuestionAnswering(tiny_vkood_config(num_labels=2))
    assert model.config.pretrained_backbones == []
    with pytest.raises(ValueError, match="pretrained backbone"):
        model.lora_target_modules()

"""Every trainable weight gets a gradient from one backward pass (DDP with find_unused_parameters=False requires it),
for each head, with CLIP vision + BERT or RoBERTa text backbones, under full fine-tuning and under LoRA."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modeling_vkood import VKOODForImagesAndTextClassification, VKOODForImageTextRetrieval, VKOODForQuestionAnswering
from tests.utils.tiny import tiny_batch, tiny_vkood_config

TEXT_BACKBONES = {
    "bert": {},
    "roberta": {"pad_token_id": 1, "max_position_embeddings": 130, "type_vocab_size": 1},
}
METER_LAYOUT = {"classifier_head": "meter", "token_types": ["text", "image", "second_image", "knowledge"]}
HEADS = {  # (model class, its labels, config fields)
    "vqa": (VKOODForQuestionAnswering, lambda batch: {"labels": torch.rand(3, 3)}, {}),
    "nlvr2": (VKOODForImagesAndTextClassification, lambda batch: {"labels": torch.tensor([0, 1, 1])}, {}),
    "nlvr2_meter": (
        VKOODForImagesAndTextClassification,
        lambda batch: {"labels": torch.tensor([0, 1, 1])},
        METER_LAYOUT,
    ),
    "snli_ve": (
        VKOODForImagesAndTextClassification,
        lambda batch: {"labels": torch.tensor([0, 2, 1])},
        {"num_images": 1},
    ),
    "retrieval": (
        VKOODForImageTextRetrieval,
        lambda batch: {"image_ids": torch.tensor([0, 1, 2]), "return_loss": True},
        {},
    ),
    "retrieval_rank_output": (
        VKOODForImageTextRetrieval,
        lambda batch: {"image_ids": torch.tensor([0, 1, 2]), "return_loss": True},
        {"retrieval_score": "rank_output"},
    ),
}


def tiny_model(head, text_type, finetuning):
    text = dict(
        model_type=text_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=30522,
        max_position_embeddings=128,
    )
    text.update(TEXT_BACKBONES[text_type])
    config = tiny_vkood_config(
        text_config=text,
        num_labels=3,
        pretrained_backbones=["vision_model", "text_model"],
        ood_config=dict(max_iter=3),
        **HEADS[head][2],
    )
    model = HEADS[head][0](config)
    model.activation_checkpointing_enable()
    if finetuning == "lora":
        lora = LoraConfig(r=2, target_modules=model.lora_target_modules(), modules_to_save=model.modules_to_save())
        return get_peft_model(model, lora)
    return model.requires_grad_(True)


@pytest.mark.parametrize("finetuning", ["full", "lora"])
@pytest.mark.parametrize("text_type", sorted(TEXT_BACKBONES))
@pytest.mark.parametrize("head", sorted(HEADS))
def test_one_backward_reaches_every_trainable_parameter(head, text_type, finetuning):
    torch.manual_seed(0)
    model = tiny_model(head, text_type, finetuning).train()
    batch = tiny_batch(pairs=head.startswith("nlvr2"))
    batch.update(HEADS[head][1](batch))
    model(**batch).loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(name for name, p in trainable.items() if p.grad is None)
    assert not missing, f"no gradient for {missing}"
    names = " ".join(trainable)
    assert ("lora_A" in names) == (finetuning == "lora") and ("post_layernorm" in names) == (finetuning == "full")

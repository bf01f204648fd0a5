"""PEFT LoRA on VK-OOD-BLIP with the model's own targets: BLIP's attention projections (vision `qkv`, the question
encoder's and answer decoder's query/key/value) get adapters, the VK-OOD modules (knowledge projection, OOD layer) are
trained in full, a training step moves both, and the merged model gives the adapted model's outputs."""

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from modeling_vkood import VKOODBlipForQuestionAnswering, VKOODBlipProcessor
from tests.utils.tiny_blip import blip_image_processor, blip_tokenizer, save_tiny_blip


@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory, minilm_path):
    folder = save_tiny_blip(tmp_path_factory.mktemp("tiny_blip"), minilm_path)
    model = VKOODBlipForQuestionAnswering.from_pretrained(folder)
    processor = VKOODBlipProcessor.from_model_config(blip_image_processor(), blip_tokenizer(minilm_path), model.config)
    return model, processor


def batch(processor):
    inputs = dict(
        processor(
            text=["what colour is it?", "how many legs?"],
            knowledge=[["red is a colour"], ["a dog has four legs", "two is a number"]],
            answers=["red", "four"],
        )
    )
    inputs["pixel_values"] = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return inputs


def test_lora_adapts_blips_attention_and_trains_the_vkood_modules_in_full(model_and_processor):
    model, processor = model_and_processor
    pattern = model.lora_target_modules()
    attention = {name for name, _ in model.named_modules() if re.fullmatch(pattern, name)}
    expected = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (
            name.endswith(".self_attn.qkv")
            or re.search(r"\.(attention|crossattention)\.self\.(query|key|value)$", name)
        )
    }
    assert attention == expected and len(expected) == 2 * 1 + 2 * 6 + 2 * 6
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=pattern, modules_to_save=model.modules_to_save())
    )
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    adapted = {name.split(".lora_")[0].removeprefix("base_model.model.") for name in trainable if ".lora_" in name}
    assert adapted == expected
    full = {name for name in trainable if ".lora_" not in name}
    assert full and all(".modules_to_save." in name for name in full)
    assert {name.split(".modules_to_save.")[0].removeprefix("base_model.model.") for name in full} == {
        "knowledge_projection",
        "ood",
    }

    inputs = batch(processor)
    before = {
        name: parameter.detach().clone() for name, parameter in peft_model.named_parameters() if name in trainable
    }
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    loss = peft_model(**inputs).loss
    loss.backward()
    optimizer.step()
    moved = {name for name, parameter in peft_model.named_parameters() if name in before
             and not torch.equal(parameter, before[name])}  # fmt: skip
    assert any(".lora_B." in name for name in moved)
    assert any("knowledge_projection.modules_to_save" in name for name in moved)
    assert any("ood.modules_to_save.default.projection" in name for name in moved)

    peft_model.eval()
    with torch.no_grad():
        adapted_logits = peft_model(**inputs).logits
        merged = peft_model.merge_and_unload()
        assert isinstance(merged, VKOODBlipForQuestionAnswering)
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**inputs).logits, adapted_logits, rtol=1e-4, atol=1e-5)

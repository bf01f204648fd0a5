"""LoRA adapters on both encoders with the VK-OOD modules fully trained: one Trainer step, then merge."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from modeling_vkood import VKOODForImagesAndTextClassification, VKOODForImageTextRetrieval, VKOODForQuestionAnswering
from tests.utils.tiny import TinyVQARows, stack, tiny_batch, tiny_vkood_config


def test_lora_trainer_step_updates_adapters_and_vkood_modules_then_merges(tmp_path):
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(
        tiny_vkood_config(num_labels=5, pretrained_backbones=["vision_model", "text_model"])
    )
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=model.lora_target_modules(), modules_to_save=model.modules_to_save()
    )
    peft_model = get_peft_model(model, lora)
    targeted = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert any(".vision_model." in name and name.endswith("q_proj") for name in targeted)
    assert any(".text_model." in name and name.endswith("value") for name in targeted)
    assert not any("fusion_layers" in name for name in targeted)
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert any("ood" in name and "threshold" in name for name in trainable)
    assert not any("vision_model.encoder" in name and "lora" not in name for name in trainable)
    before = {
        name: parameter.detach().clone() for name, parameter in peft_model.named_parameters() if parameter.requires_grad
    }

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    Trainer(model=peft_model, args=args, train_dataset=TinyVQARows(4), data_collator=stack).train()

    changed = {
        name
        for name, parameter in peft_model.named_parameters()
        if name in before and not torch.equal(parameter, before[name])
    }
    assert any("lora_B" in name and "text_model" in name for name in changed)
    assert any("lora_B" in name and "vision_model" in name for name in changed)
    assert any("modules_to_save" in name and "ood" in name for name in changed)
    assert any("modules_to_save" in name and "classifier" in name for name in changed)
    assert any("modules_to_save" in name and "fusion_layers" in name for name in changed)

    peft_model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        expected = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()
        assert isinstance(merged, VKOODForQuestionAnswering)
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model_class", [VKOODForQuestionAnswering, VKOODForImagesAndTextClassification, VKOODForImageTextRetrieval]
)
def test_lora_trains_every_weight_outside_the_backbones(model_class):
    """Nothing VK-OOD adds (the retrieval temperature included) may stay frozen under LoRA."""
    model = model_class(tiny_vkood_config(num_labels=2, pretrained_backbones=["vision_model", "text_model"]))
    lora = LoraConfig(r=4, target_modules=model.lora_target_modules(), modules_to_save=model.modules_to_save())
    peft_model = get_peft_model(model, lora)
    frozen = {name for name, parameter in peft_model.named_parameters() if not parameter.requires_grad}
    outside = {name for name in frozen if ".vision_model." not in name and ".text_model." not in name}
    outside = {name for name in outside if ".original_module." not in name}  # PEFT's frozen copies of trained modules
    assert not outside

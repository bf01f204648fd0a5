"""Big-model inference: `from_pretrained(..., device_map=..., offload_folder=...)` with modules offloaded to the disk
(accelerate loads each one in its forward, so the model must call its modules rather than read their weights) gives
the plain model's outputs, for every head; `device_map="auto"` keeps the fusion and OOD layers whole."""

import pytest
import torch

from modeling_vkood import VKOODForImagesAndTextClassification, VKOODForImageTextRetrieval, VKOODForQuestionAnswering
from tests.utils.tiny import tiny_batch, tiny_vkood_config

# Backbones, projections, token types, the OOD layer and a co-attention layer on the disk, the rest on the CPU.
OFFLOADED = {
    "vkood.vision_model": "cpu",
    "vkood.text_model": "disk",
    "vkood.image_projection": "disk",
    "vkood.text_projection": "cpu",
    "vkood.knowledge_projection": "disk",
    "vkood.token_type_embeddings": "disk",
    "vkood.ood": "disk",
    "vkood.fusion_layers.0": "disk",
    "vkood.fusion_layers.1": "cpu",
    "vkood.text_pooler": "disk",
    "vkood.image_pooler": "cpu",
}
HEADS = {  # model class, its head's own modules, config fields, output compared
    "vqa": (VKOODForQuestionAnswering, {"classifier": "disk"}, {"num_labels": 3}, "logits"),
    "nlvr2": (VKOODForImagesAndTextClassification, {"classifier": "disk"}, {"num_labels": 2}, "logits"),
    "retrieval": (
        VKOODForImageTextRetrieval,
        {"image_embedding": "disk", "text_embedding": "cpu", "logit_scale": "disk", "itm_head": "disk"},
        {},
        "itm_logits",
    ),
}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_disk_offloaded_modules_give_the_plain_models_outputs(head, tmp_path):
    model_class, head_map, fields, output = HEADS[head]
    torch.manual_seed(0)
    model = model_class(tiny_vkood_config(**fields)).eval()
    batch = tiny_batch(pairs=head == "nlvr2")
    with torch.no_grad():
        expected = model(**batch)[output]
    model.save_pretrained(tmp_path / "model")
    offloaded = model_class.from_pretrained(
        tmp_path / "model", device_map={**OFFLOADED, **head_map}, offload_folder=tmp_path / "offload"
    ).eval()
    assert offloaded.vkood.ood.projection.weight.device.type == "meta"  # loaded in each forward only
    assert offloaded.vkood.token_type_embeddings.weight.device.type == "meta"
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**batch)[output], expected, rtol=0, atol=0)


def test_auto_device_map_keeps_the_fusion_and_ood_layers_whole(tmp_path):
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(tiny_vkood_config(num_labels=3)).eval()
    assert {"VKOODFusionLayer", "ImplicitOODLayer"} <= set(model._no_split_modules)
    batch = tiny_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "model")
    # 4 MB of the tiny model's 4.3: part of the vision tower stays on the CPU, the rest goes to the disk
    split = VKOODForQuestionAnswering.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "4MB"}, offload_folder=tmp_path / "offload"
    ).eval()
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    assert not any(name.startswith(("vkood.ood.", "vkood.fusion_layers.0.")) for name in split.hf_device_map)
    with torch.no_grad():
        torch.testing.assert_close(split(**batch).logits, expected, rtol=0, atol=0)

"""Shared by test_retrieval_distributed.py and its torchrun worker: one tiny retrieval model, batch and gallery."""

import torch
from transformers import AutoTokenizer, CLIPImageProcessorPil

from modeling_vkood import VKOODForImageTextRetrieval, VKOODProcessor
from modeling_vkood.knowledge import KnowledgeBase
from tests.utils.tiny import tiny_batch, tiny_vkood_config

GRADIENT_PARAMETERS = (
    "image_embedding.weight",
    "text_embedding.weight",
    "logit_scale.log_scale",
    "vkood.image_projection.weight",
    "vkood.text_projection.weight",
)
# image 1 has a caption on each process: a positive pair across processes
IMAGE_IDS = [0, 1, 2, 1, 3, 4]


def tiny_retrieval_model():
    """Without dropout anywhere, so that train and eval mode compute the same (deterministic) function."""
    text = dict(
        model_type="bert",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=30522,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return VKOODForImageTextRetrieval(
        tiny_vkood_config(
            text_config=text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, ood_config=dict(max_iter=3)
        )
    )


def itc_batch():
    batch = tiny_batch(batch_size=len(IMAGE_IDS), seed=3)
    batch["image_ids"] = torch.tensor(IMAGE_IDS)
    return batch


def itc_gradients(model, batch):
    """(ITC loss, {name: gradient}) of one forward/backward of the ITC loss alone."""
    model.zero_grad()
    loss = model(**batch, return_loss=True).itc_loss
    loss.backward()
    parameters = dict(model.named_parameters())
    return loss, {name: parameters[name].grad.detach().clone() for name in GRADIENT_PARAMETERS}


def gallery_inputs(model, tokenizer_path):
    """evaluate_retrieval's arguments (less the accelerator) for a 5-image, 10-caption gallery."""
    generator = torch.Generator().manual_seed(5)
    words = ["a red circle", "a blue square", "a green dog", "a cat on a mat", "a cup of tea"]
    rows = [
        {"image": torch.randn(3, 32, 32, generator=generator), "captions": [words[i], f"{words[(i + 1) % 5]} here"]}
        for i in range(5)
    ]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = VKOODProcessor.from_model_config(
        image_processor, AutoTokenizer.from_pretrained(tokenizer_path), model.config
    )
    return dict(
        model=model,
        dataset=rows,
        pixels=torch.stack,
        processor=processor,
        knowledge_base=KnowledgeBase.starter(),
        max_knowledge_items=3,
        batch_size=2,
        k_test=3,
    )

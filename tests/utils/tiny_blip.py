"""A tiny BLIP VQA model in the real format (transformers' `BlipForQuestionAnswering.save_pretrained`) with a BLIP-style
tokenizer (MiniLM's BERT vocabulary plus [DEC] and [ENC], as BLIP's), and its VK-OOD processor, for CPU tests."""

from pathlib import Path

import torch
from transformers import AutoTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor

# BLIP's text vocabulary: BERT's 30,522 tokens, then [DEC] (the decoder's start token) and [ENC].
BLIP_VOCAB_SIZE = 30524
DECODER_START = 30522
IMAGE_SIZE = 32
INIT = 0.2


def tiny_blip_config(**text_overrides) -> BlipConfig:
    """Two-layer vision tower, question encoder and answer decoder, all of width 32 (BLIP's decoder cross-attends to
    the question states with the vision width, so the widths must agree as in the real checkpoints)."""
    text = dict(
        vocab_size=BLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=DECODER_START,
        sep_token_id=102,
        pad_token_id=0,
        **text_overrides,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        # BLIP's vision default (1e-10) gives near-identical image tokens; a real scale gives the gate something
        # to score against
        initializer_range=INIT,
    )
    return BlipConfig(text_config=text, vision_config=vision, initializer_range=INIT)


def blip_tokenizer(minilm_path):
    """MiniLM's BERT tokenizer with BLIP's two added tokens: [DEC] (id 30522, its bos token) and [ENC] (30523)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert tokenizer.bos_token_id == DECODER_START and len(tokenizer) == BLIP_VOCAB_SIZE
    return tokenizer


def blip_image_processor() -> BlipImageProcessor:
    return BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def save_tiny_blip(folder: Path, minilm_path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny `BlipForQuestionAnswering` (weights, config, generation config) with its
    image processor and tokenizer, as a Hub BLIP VQA checkpoint is laid out."""
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(tiny_blip_config())
    model.save_pretrained(folder)
    blip_image_processor().save_pretrained(folder)
    blip_tokenizer(minilm_path).save_pretrained(folder)
    return folder

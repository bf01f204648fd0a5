"""Tiny models, inputs and datasets for CPU tests."""


def tiny_vkood_config(**overrides):
    """A VK-OOD config small enough for CPU tests: 2-layer CLIP vision (32 px) and BERT text encoders of width 32.

    Its OOD layer projects to 8 dimensions and scores with GEM (the paper's layer, which most tests were written
    for); a given `ood_config` dict updates those settings rather than replacing them."""
    from modeling_vkood import VKOODConfig

    ood_config = {"projection_dim": 8, "score": "gem", **overrides.pop("ood_config", {})}
    settings = dict(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(
            model_type="bert",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=30522,
            max_position_embeddings=128,
        ),
        hidden_size=32,
        num_fusion_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        ood_config=ood_config,
        max_knowledge_items=4,
        knowledge_max_length=8,
        projection_dim=16,
        k_test=3,
    )
    settings.update(overrides)
    return VKOODConfig(**settings)


def tiny_decoder_config(**overrides):
    """`decoder_config` of a tiny `VKOODForConditionalGeneration`: a 2-layer BERT decoder of width 32 over the
    BERT / MiniLM vocabulary, starting, ending and padding with [CLS], [SEP], [PAD] as the MiniLM tokenizer does."""
    settings = dict(
        model_type="bert",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=30522,
        max_position_embeddings=64,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
    )
    settings.update(overrides)
    return settings


def tiny_batch(batch_size=3, items=4, item_length=5, seed=0, pairs=False):
    """Random model inputs for `tiny_vkood_config` models; example 0 and 1 share an item, the last has none."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    image_shape = (batch_size, 2, 3, 32, 32) if pairs else (batch_size, 3, 32, 32)
    knowledge_ids = torch.randint(1000, 2000, (batch_size, items, item_length), generator=generator)
    knowledge_ids[1, 0] = knowledge_ids[0, 0]
    knowledge_mask = torch.ones(batch_size, items, dtype=torch.long)
    knowledge_mask[-1] = 0
    knowledge_mask[0, -1] = 0
    return dict(
        pixel_values=torch.randn(image_shape, generator=generator),
        input_ids=torch.randint(1000, 2000, (batch_size, 7), generator=generator),
        attention_mask=torch.ones(batch_size, 7, dtype=torch.long),
        knowledge_input_ids=knowledge_ids,
        knowledge_attention_mask=torch.ones(batch_size, items, item_length, dtype=torch.long),
        knowledge_mask=knowledge_mask,
    )


def save_tiny_bert(folder, minilm_path) -> str:
    """A 2-layer BERT with MiniLM's vocabulary and tokenizer saved in `folder`: a "pretrained" text backbone for
    LoRA."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(folder)
    return str(folder)


class TinyVQARows:
    """`tiny_batch` rows with soft-score labels over `num_labels` answers, as a map-style dataset for a Trainer."""

    def __init__(self, size, num_labels=5, seed=0):
        import torch

        batch = tiny_batch(batch_size=size, seed=seed)
        batch["labels"] = torch.rand(size, num_labels, generator=torch.Generator().manual_seed(1))
        self.rows = [{key: value[i] for key, value in batch.items()} for i in range(size)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def stack(rows):
    """Collator of `TinyVQARows`: every field stacked."""
    import torch

    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def tiny_ood_layer(**ood_overrides):
    """The OOD layer of `tiny_vkood_config` (GEM, d' = 8, on width-32 tokens), its `ImplicitOODConfig` updated by
    `ood_overrides`."""
    from modeling_vkood import ImplicitOODLayer

    config = tiny_vkood_config(ood_config=ood_overrides)
    return ImplicitOODLayer(config.ood_config, config.hidden_size)
